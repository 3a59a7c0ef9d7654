"""Reading ``torch.save`` files, official PyTorch Lightning checkpoints included, without running
code from them.

``torch.load(weights_only=True)`` accepts tensors and plain containers only. A Lightning 1.3
checkpoint (the official HAT files) also pickles the *classes* of its callbacks, as the keys of
``checkpoint["callbacks"]`` (e.g. ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``).
The globals a zip checkpoint names are listed without unpickling it; each Lightning callback class
among them is bound to an inert stand-in class made here (no Lightning install is needed and none
of its code runs), and the few other harmless names of such checkpoints (:data:`PLAIN_GLOBALS`) to
plain Python types. Any other global refuses the file, naming it, before anything is unpickled.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

# A class defined in a module of ``pytorch_lightning.callbacks``.
CALLBACK_CLASS = re.compile(r"pytorch_lightning\.callbacks(?:\.[a-z_][a-z0-9_]*)*\.[A-Z]\w*")
# Hyper-parameters: an argparse Namespace, or sacred's read-only config containers (METER, which
# HAT builds on, is configured with sacred), read as the plain dict and list they wrap.
PLAIN_GLOBALS: dict[str, Any] = {
    "argparse.Namespace": argparse.Namespace,
    "sacred.config.custom_containers.ReadOnlyDict": dict,
    "sacred.config.custom_containers.ReadOnlyList": list,
}
# How every legacy (pre-zip) torch.save file starts: pickle protocol 2, then its magic number.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
READ_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, TypeError, ValueError)
TRUST_HINT = (
    "Reading it would run code stored in the file. Only if you trust its source, pass "
    "--trust-checkpoint."
)


class CheckpointReadError(RuntimeError):
    """The checkpoint file cannot be read safely (or at all) as asked."""


class CallbackStandIn:
    """Stands in for a Lightning callback class named in a checkpoint; it is only ever a dict key
    (calling it with arguments fails, so a file cannot use it to do anything)."""


def stand_in(full_name: str) -> type:
    """An inert class that prints and compares by ``full_name``'s module and name."""
    module, _, name = full_name.rpartition(".")
    return type(name, (CallbackStandIn,), {"__module__": module, "__qualname__": name})


def bindings(names: list[str]) -> tuple[list[tuple[Any, str]], list[str]]:
    """What each global a checkpoint names (beyond torch's own allow-list) is read as, and the
    names that are refused."""
    bound, refused = [], []
    for name in names:
        if CALLBACK_CLASS.fullmatch(name):
            bound.append((stand_in(name), name))
        elif name in PLAIN_GLOBALS:
            bound.append((PLAIN_GLOBALS[name], name))
        else:
            refused.append(name)
    return bound, refused


def _globals_named(path: Path) -> list[str]:
    """The globals outside torch's allow-list that a zip checkpoint's pickle names (not run)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except READ_ERRORS as err:
        raise CheckpointReadError(f"{path} is not a readable PyTorch checkpoint: {err}") from err


def read_checkpoint(path: str | Path, trust: bool = False) -> Any:
    """``torch.load`` under the allow-list; with ``trust``, a plain ``torch.load`` of a file that
    needs more (runs code from the file: trusted sources only).

    Zip checkpoints are memory-mapped, so optimizer states that are never used stay on disk.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with path.open("rb") as fh:
            if fh.read(len(LEGACY_MAGIC)) != LEGACY_MAGIC:
                raise CheckpointReadError(
                    f"{path} is not a PyTorch checkpoint: neither a torch.save zip nor a legacy "
                    "torch.save file (a truncated download, or an HTML error page?)"
                )
    # A legacy file's globals cannot be listed without unpickling it: only plain ones may load.
    bound, refused = bindings(_globals_named(path) if is_zip else list(PLAIN_GLOBALS))
    if refused and not trust:
        raise CheckpointReadError(
            f"{path} refers to {', '.join(refused)}: more than tensors, plain containers and "
            f"Lightning callback keys. {TRUST_HINT}"
        )
    if refused:
        return _load_trusted(path, is_zip)
    try:
        with torch.serialization.safe_globals(bound):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:  # a legacy file naming other globals
        if trust:
            return _load_trusted(path, is_zip)
        named = re.search(r"GLOBAL (\S+)", str(err))
        reason = f"it refers to {named[1]}" if named else str(err).splitlines()[0]
        raise CheckpointReadError(f"{path} cannot be read safely: {reason}. {TRUST_HINT}") from err
    except READ_ERRORS as err:
        raise CheckpointReadError(
            f"{path} cannot be read as a PyTorch checkpoint (corrupt or truncated?): "
            f"{type(err).__name__}: {err}"
        ) from err


def _load_trusted(path: Path, mmap: bool) -> Any:
    """Plain ``torch.load``: unpickles anything, running whatever code the file holds."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except ModuleNotFoundError as err:
        raise CheckpointReadError(
            f"{path} needs the Python module {err.name!r} to be unpickled: install it, or re-save "
            "only its state_dict"
        ) from err
