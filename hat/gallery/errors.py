"""What can be wrong with a gallery on disk. Both errors mean: do not use it, build it again."""

from __future__ import annotations

from pathlib import Path


class CacheError(RuntimeError):
    """A gallery directory is incomplete, truncated or does not match its manifest."""


class CorruptionError(CacheError):
    """Stored bytes differ from what was written (same size, other content).

    ``gallery`` is the gallery folder, ``name`` the damaged file or segment folder below it.
    """

    def __init__(self, gallery: Path, name: str, problem: str):
        super().__init__(
            f"{gallery / name} {problem}: the gallery cache changed after it was built"
        )
        self.gallery = gallery
        self.name = name

    @property
    def segment(self) -> str | None:
        """The damaged segment (other galleries may share it through hard links), if it is one."""
        parts = Path(self.name).parts
        return parts[1] if len(parts) > 1 and parts[0] == "segments" else None
