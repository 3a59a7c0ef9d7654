"""The Gradio demo's testable logic: input checks, safe uploads, alignment-map pictures, engine.

``app.py`` only wires these into a UI; nothing here imports gradio.
"""


class InputError(ValueError):
    """A request the demo cannot serve; the message tells the person what to change."""
