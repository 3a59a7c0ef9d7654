"""Resumable downloads of large files (Google Drive links or plain HTTP) with a progress bar.

gdown does the transfer: it follows Google Drive's "cannot scan this file for viruses" page,
retries a broken transfer from where it stopped (HTTP Range), and keeps the bytes received so far
in ``<file><random>.part`` beside the target, so that running the same download again, even after
the process was killed, continues it. An unreachable host fails at once (one TCP connect), not
after a minute of retries.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

CONNECT_TIMEOUT = 3.0  # seconds for the reachability check
READ_TIMEOUT = 60.0  # seconds without a byte before a transfer counts as broken
RETRIES = 3  # broken transfers resumed within one call


class DownloadError(RuntimeError):
    """A download failed; the bytes received so far are kept for the next attempt."""


class HostUnreachableError(DownloadError):
    """The host cannot be reached (offline, blocked, or nothing listening)."""


def host_reachable(url: str, timeout: float = CONNECT_TIMEOUT) -> bool:
    """True when ``url``'s host accepts a TCP connection within ``timeout``."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except (OSError, UnicodeError):
        return False
    return True


def partial_files(target: Path) -> list[Path]:
    """What an interrupted download of ``target`` left (gdown's ``<name><8 chars>.part``)."""
    return sorted(target.parent.glob(f"{target.name}{'?' * 8}.part"))


def download(url: str, target: str | Path, progress: bool = True, retries: int = RETRIES) -> Path:
    """Download ``url`` to ``target``, continuing an earlier interrupted download of it."""
    import gdown  # imported here: slow to import, and no other command needs it

    target = Path(target)
    if not host_reachable(url):
        raise HostUnreachableError(f"{urlsplit(url).hostname} is not reachable")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        gdown.download(
            url,
            str(target),
            quiet=not progress,
            resume=True,
            retries=retries,
            timeout=(CONNECT_TIMEOUT * 3, READ_TIMEOUT),
            use_cookies=False,
        )
    except (gdown.exceptions.DownloadError, OSError) as err:
        kept = sum(p.stat().st_size for p in partial_files(target))
        reason = str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__
        raise DownloadError(
            f"downloading {url} failed: {reason}. {kept:,} bytes are kept: the same command "
            "continues from there."
        ) from err
    return target
