"""The Gradio demo's testable logic: input checks, safe uploads, alignment-map pictures, engine.

:mod:`hat.demo.ui` lays these out as the page, one module a tab, and ``app.py`` serves it; nothing
else here imports gradio.
"""


class InputError(ValueError):
    """A request the demo cannot serve; the message tells the person what to change."""
