"""Where and how much: the default device, free memory, block sizes, OOM-halving, malloc tuning,
cores and work on another thread.

Library code asks these questions in one place; process-wide settings (:func:`keep_freed_memory`)
are left to the programs that own the process (the ``hat`` command, ``app.py``, benchmarks).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: ``hat`` starts without it
    import torch

# fp32 bytes of the features of one scoring block: adapts to free memory, never above this.
MAX_BLOCK_BYTES = 1 << 30
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters

_freed_memory_kept = False


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container sets it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def in_grad_mode(fn: Callable) -> Callable:
    """``fn``, to run on another thread in this thread's grad and inference modes (PyTorch keeps
    them per thread)."""
    import torch

    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(*args, **kwargs)

    return run


def free_memory(device: torch.device) -> int:
    """Bytes that may be used now on ``device`` (free GPU memory, or available RAM)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def block_size(item_bytes: int, device: torch.device) -> int:
    """Items per scoring block: a quarter of free memory at most, so no gallery can exhaust it."""
    budget = min(MAX_BLOCK_BYTES, free_memory(device) // 4)
    return max(1, budget // max(item_bytes, 1))


def run_in_pieces(fn: Callable[[Any], Any], batch: Any, size: int) -> Iterator[tuple[slice, Any]]:
    """``fn`` on ``batch[:size]``-style pieces; a piece that runs out of GPU memory is halved."""
    import torch

    start = 0
    while start < len(batch):
        piece = slice(start, min(start + size, len(batch)))
        try:
            result = fn(batch[piece])
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            torch.cuda.empty_cache()
            size //= 2
            continue
        yield piece, result
        start = piece.stop


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of giving it back to the OS at once.

    A query allocates ~100 MB of short-lived fp32 features; by default glibc unmaps them on free
    and the next query page-faults them back, which costs as much CPU as the scoring itself
    (benchmarks/query_latency.py). Process-wide, so only a program's start-up calls it; later
    calls do nothing. Returns whether the setting is in effect (False without glibc).
    """
    global _freed_memory_kept
    if not _freed_memory_kept:
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return False
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 25)  # glibc's maximum: 32 MiB blocks from the heap
        _freed_memory_kept = True
    return True


ENCODE_PRECISIONS = ("auto", "fp32", "bf16")
ENCODE_PRECISION_ENV = "HAT_ENCODE_PRECISION"


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), as torch detects them."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def encode_dtype(device: torch.device, precision: str | None = None) -> torch.dtype | None:
    """The dtype the towers' matrix products run in when encoding (autocast), None for fp32.

    ``auto`` (the default; the ``HAT_ENCODE_PRECISION`` environment variable overrides it) is
    bfloat16 on a CPU with AMX tiles: oneDNN runs bf16 products there over ten times as fast as
    fp32 on one core, so encoding an image takes about half the time (its backbone levels a
    third), and the retrieval figures stay those of fp32 (reports/README.md). Elsewhere fp32: a
    CPU without AMX runs bf16 no faster, and on a GPU it is not measured here.
    """
    import torch

    precision = precision or os.environ.get(ENCODE_PRECISION_ENV) or "auto"
    if precision not in ENCODE_PRECISIONS:
        raise ValueError(f"encode precision must be one of {ENCODE_PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if device.type == "cpu" and cpu_has_amx() else "fp32"
    return torch.bfloat16 if precision == "bf16" else None
