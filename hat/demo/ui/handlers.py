"""How the page's handlers run: a refusal as an error toast, model calls on threads of their own,
under ZeroGPU's ``@spaces.GPU`` where there is one."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import html
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import gradio as gr

from hat.demo import InputError

try:  # Hugging Face ZeroGPU: model work runs under @spaces.GPU; elsewhere it is a no-op.
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(fn: Callable) -> Callable:
        return fn


CONCURRENCY = 2  # model calls at once; more only split the same cores
MODEL_THREADS = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="model")
# Inputs reach the handlers as sent (no per-component preprocessing thread hops); images
# unprocessed also let load_image give every refusal its reason. The page's events are
# private; the named API endpoints are their JSON twins on hidden triggers.
PAGE_EVENT = dict(preprocess=False, api_visibility="private")
API_EVENT = dict(preprocess=False, postprocess=False)


def user_errors(fn: Callable) -> Callable:
    """Show an :class:`InputError` as a Gradio error; escaped, since toasts render HTML."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            raise gr.Error(html.escape(str(exc), quote=False)) from None

    return wrapper


def on_model_threads(fn: Callable) -> Callable:
    """Run ``fn`` on one of :data:`MODEL_THREADS`, handed over by the event loop directly.

    Gradio would run it on any of its ~40 worker threads, and glibc may keep the freed memory of
    a query's large tensors in an arena per thread that ran one; two long-lived threads keep it
    twice at most.
    """

    @functools.wraps(fn)
    async def on_a_model_thread(*args, **kwargs):
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(MODEL_THREADS, call)

    return on_a_model_thread


def table(results) -> dict:
    return {"headers": results.headers, "data": results.rows}
