"""Shared by the benchmark scripts: timing statistics, the machine's state, JSON reports, models.

Benchmarks are scripts (``python benchmarks/<name>.py``), never timed tests. Each prints its
figures and writes them as JSON (``--out``, default ``benchmarks/results/<name>.json``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the figures depend on: CPU count, torch threads, load (other jobs share the CPU)."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def stats_ms(seconds: list[float]) -> dict:
    """p50 / p95 / min in milliseconds."""
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "min_ms": round(float(ms.min()), 2),
        "n": len(ms),
    }


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, list]:
    """Run every variant once per round, ``repeats`` rounds, so that load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return times


def gemm_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GEMM rate (FLOP/s) at the current thread count: this machine's compute bound."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def write_report(name: str, report: dict, out: str | None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **report}, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def demo_architecture_model(checkpoint: str | None = None):
    """The demo checkpoint when given, else its architecture (``hat-tuxpaint``) with random image
    weights and the packaged MiniLM text tower: speed and storage do not depend on the weights.
    """
    from hat import create_model, load_model

    if checkpoint:
        return load_model(checkpoint)
    from hat.demo_build.dinov2_onnx import find_minilm_dir

    torch.manual_seed(0)
    model, tokenizer = create_model("hat-tuxpaint", pretrained_text=str(find_minilm_dir()))
    return model.eval(), tokenizer


def save_demo_architecture_model(directory: Path, checkpoint: str | None = None) -> Path:
    """A checkpoint folder to build galleries from (the given one, or the random demo model)."""
    if checkpoint:
        return Path(checkpoint)
    model, tokenizer = demo_architecture_model()
    return model.save_pretrained(directory, tokenizer)
