"""Pickle-free training checkpoints: model folder + optimizer tensors (safetensors) + JSON state.

A resumable checkpoint folder holds ``model/`` (what :meth:`HATModel.save_pretrained` writes),
``optimizer.safetensors`` (every tensor of the optimizer state and the torch RNG states) and
``trainer_state.json`` (epoch, step, best score, param groups, scheduler, Python RNG).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hat.fileio import atomic_directory
from hat.model import HATModel

STATE_NAME = "trainer_state.json"
TENSORS_NAME = "optimizer.safetensors"


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))


def save_training_state(
    directory: str | Path,
    model: HATModel,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: dict[str, Any],
) -> Path:
    """Write a resumable checkpoint; the folder is replaced atomically."""
    with atomic_directory(directory) as staging:
        model.save_pretrained(staging / "model", tokenizer=tokenizer)
        opt = optimizer.state_dict()
        tensors = {
            f"state.{index}.{name}": value.detach().cpu().contiguous()
            for index, values in opt["state"].items()
            for name, value in values.items()
        }
        rng_tensors, rng_meta = _rng_state()
        tensors.update(rng_tensors)
        save_file(tensors, str(staging / TENSORS_NAME))
        state = {
            "progress": progress,
            "param_groups": opt["param_groups"],
            "scheduler": scheduler.state_dict(),
            "rng": rng_meta,
        }
        (staging / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    return Path(directory)


def load_training_state(
    directory: str | Path,
    model: HATModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNGs in place; returns the saved progress dict."""
    directory = Path(directory)
    state_path = directory / STATE_NAME
    if not state_path.is_file():
        raise FileNotFoundError(f"{directory} is not a resumable HAT checkpoint (no {STATE_NAME})")
    state = json.loads(state_path.read_text())
    restored = HATModel.from_pretrained(directory / "model")
    model.load_state_dict(restored.state_dict())
    tensors = load_file(str(directory / TENSORS_NAME))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(tensors, state["rng"])
    return state["progress"]
