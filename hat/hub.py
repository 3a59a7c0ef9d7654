"""Fail fast and clearly when weights would have to come from a hub that cannot be reached."""

from __future__ import annotations

import os
import socket

HUB_HOST = "huggingface.co"


class PretrainedUnavailableError(RuntimeError):
    """Pretrained weights or files were asked for but neither the hub nor a local path has them."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the HF hub answers a TCP connect within ``timeout`` and offline mode is off."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def require_hub(what: str, option: str) -> None:
    """Raise at once (instead of minutes of retries) when ``what`` needs an unreachable hub."""
    if not hub_reachable():
        raise PretrainedUnavailableError(
            f"{what} must be downloaded from {HUB_HOST}, which is not reachable (or HF_HUB_OFFLINE "
            f"is set). Pass a local copy with {option} PATH."
        )
