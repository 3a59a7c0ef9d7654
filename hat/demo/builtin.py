"""The built-in gallery while the demo runs: checked in full in the background after start-up
(opening only checked sizes), and rebuilt when its files turn out damaged, by that check or by a
query's row checks. Damaged bytes are never served; the app keeps answering meanwhile, with a
message for searches of this gallery."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Callable

from hat.demo import InputError
from hat.gallery import CacheError, CorruptionError, Gallery, discard
from hat.gallery.reader import read_manifest
from hat.search import Searcher

CHECKING, VERIFIED = "checking its files", "files verified"
REBUILDING = (
    "The built-in gallery's stored features were found damaged; it is being rebuilt: try again "
    "in a minute."
)


def _lower_priority() -> None:
    """Let queries go first (on Linux a thread has a nice value of its own)."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _damage(error: CacheError) -> str:
    """What is damaged, without the server's paths (``/info`` shows it to anyone)."""
    if isinstance(error, CorruptionError):
        return f"{error.name} changed after it was built"
    return "a stored file is missing or truncated"


def _replaced(gallery: Gallery) -> bool:
    """Whether ``gallery``'s folder now holds another finished gallery (a new build's)."""
    try:
        return read_manifest(gallery.directory) != gallery.manifest
    except CacheError:
        return False


def _log(message: str) -> None:
    print(f"HAT demo: {message}", file=sys.stderr, flush=True)


class BuiltinGallery:
    """The current built-in gallery and its searcher; ``build`` makes (or reopens) the gallery,
    ``searcher`` the searcher of one. ``status`` says how it stands (``/info`` shows it; the
    console gets the details)."""

    def __init__(self, build: Callable[[], Gallery], searcher: Callable[[Gallery], Searcher]):
        self._build, self._searcher = build, searcher
        self.gallery = build()
        self.searcher = searcher(self.gallery)
        self.status = CHECKING
        self._usable = True
        self._closed = False
        self._rebuild_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._verify, args=(self.gallery,), daemon=True).start()

    def current(self) -> Gallery:
        """The gallery to search now; refused while a damaged one is being rebuilt."""
        with self._lock:
            if self._usable:
                return self.gallery
            if self.status.startswith("rebuilding"):
                raise InputError(REBUILDING)
            raise InputError(
                f"The built-in gallery cannot be used ({self.status}): restart the app."
            )

    def _verify(self, gallery: Gallery) -> None:
        _lower_priority()
        try:
            gallery.verify()
        except CacheError as exc:
            self.damaged(gallery, exc)
            return
        with self._lock:
            if gallery is self.gallery and self.status == CHECKING:
                self.status = VERIFIED

    def close(self) -> None:
        """From now on, damage found (by the background check still running, say) starts no
        rebuild, and a rebuild under way is waited for: a closed demo must not discard or
        rewrite a cache that a new one may be using."""
        with self._lock:
            self._closed = True
            running = self._rebuild_thread
        if running is not None:
            running.join()

    def damaged(self, gallery: Gallery, error: CacheError) -> None:
        """Stop using ``gallery`` (if it is still the current one) and rebuild it."""
        with self._lock:
            if gallery is not self.gallery or not self._usable or self._closed:
                return
            self._usable = False
            self.status = f"rebuilding: {_damage(error)}"
            self._rebuild_thread = threading.Thread(
                target=self._rebuild, args=(gallery, error), daemon=True
            )
            self._rebuild_thread.start()  # (a close from now on waits for it)
        _log(f"the built-in gallery is damaged ({error}); rebuilding it")

    def _rebuild(self, gallery: Gallery, error: CacheError) -> None:
        if _replaced(gallery):
            _log("another process rebuilt the built-in gallery first: reopening its build")
        elif isinstance(error, CorruptionError):
            discard(error)  # with the galleries sharing a damaged segment: none may be reused
        else:
            shutil.rmtree(gallery.directory, ignore_errors=True)
        try:
            rebuilt = self._build()
            searcher = self._searcher(rebuilt)
        except Exception as exc:  # the app keeps serving the other galleries
            with self._lock:
                self.status = f"rebuild failed: {type(exc).__name__}"
            _log(f"the built-in gallery could not be rebuilt: {exc}")
            return
        with self._lock:
            self.gallery, self.searcher = rebuilt, searcher
            self.status = f"rebuilt: {_damage(error)}"
            self._usable = True
        _log("the built-in gallery was rebuilt")
