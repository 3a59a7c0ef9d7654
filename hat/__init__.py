"""HAT: Hierarchical Alignment Transformers for cross-modal (image ↔ text) retrieval.

The public names are imported lazily so that light commands (dataset builders, ``--help``) do
not pay for importing torch, timm and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "HATConfig": "hat.config",
    "get_preset": "hat.config",
    "list_presets": "hat.config",
    "create_model": "hat.factory",
    "load_model": "hat.factory",
    "Encoder": "hat.encoder",
    "HATModel": "hat.model",
    "ImageFeatures": "hat.model",
    "TextFeatures": "hat.model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hat' has no attribute {name!r}")
