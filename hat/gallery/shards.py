"""Distributed gallery builds: the processes of a ``torchrun`` group share the encoding.

``torchrun --nproc_per_node N -m hat index build ...`` runs
:func:`~hat.gallery.builder.build_gallery_distributed` in every process, a :class:`Team` each.
Rank 0 leads: it alone reopens a cached gallery, finds the images earlier galleries hold (donors),
creates the staging folder, links donor segments and writes items, rows, indexes and the manifest
(:func:`hat.gallery.builder.build_gallery`). The images no donor holds are split into contiguous
chunks, one per rank; each rank encodes its chunk into a segment of its own in the staging folder
(:func:`hat.gallery.staging.stage_segment`), which is why the cache must be one folder that every
process sees at the same path (on several nodes: a shared file system). The other ranks only
encode: they wait for the leader's jobs and return the gallery it announces.

Every exchange is a small Python object over the default process group (gloo is enough: no
tensors travel). A failure is never left for the others to wait on: a rank whose encoding fails
reports it in the gather that ends the job, so the leader raises it; a leader that fails, at any
step, announces it, so every rank raises. A process that dies outright is noticed by torchrun,
which stops the others; the process group's timeout bounds any other wait.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hat.distributed import DistInfo
from hat.gallery.collection import Collection, ImageEntry
from hat.gallery.manifest import FileEntry
from hat.gallery.reader import BuildReport, Gallery, open_gallery
from hat.gallery.staging import Encode, Staged, file_table, stage_segment


class TeamError(RuntimeError):
    """Another process of the build failed; the message says which and why."""


def chunk(items: list, rank: int, size: int) -> list:
    """The ``rank``-th of ``size`` contiguous, near-equal slices of ``items`` (rank 0's first)."""
    return items[rank * len(items) // size : (rank + 1) * len(items) // size]


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


class Team:
    """This process's part in a build: alone (every step here), leader (rank 0) or worker."""

    def __init__(self, info: DistInfo | None = None):
        self.info = info or DistInfo()
        self.agreed = False  # until then a failing rank only exits (torchrun stops the others)

    @property
    def leads(self) -> bool:
        return self.info.is_main

    def _from_leader(self, message: Any = None) -> Any:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _gather(self, item: Any) -> list[Any]:
        out: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(out, item)
        return out

    def agree(self, key: str) -> None:
        """Every rank must build the same gallery: same images, checkpoint and settings."""
        if not self.info.enabled:
            return
        keys = self._gather(key)
        if len(set(keys)) > 1:
            raise TeamError(
                f"the ranks computed different gallery keys ({', '.join(keys)}): every process "
                "must see the same images (paths, sizes, mtimes), checkpoint and cache folder"
            )
        self.agreed = True

    def _encode_share(
        self, staging: Path, entries: list[ImageEntry], encode: Encode
    ) -> tuple[list[tuple], Exception | None]:
        """Encode this rank's chunk of ``entries``; every rank then learns what all did (a staged
        dict and file table each) or who failed and why."""
        failure = None
        try:
            share = chunk(entries, self.info.rank, self.info.world_size)
            staged = stage_segment(staging, share, encode)
            names = {found.segment for found in staged.values() if found}
            files = {
                f"segments/{name}/{file}": info
                for name in names
                for file, info in file_table(staging / "segments" / name, {}).items()
            }
            report: tuple = (True, staged, files)
        except Exception as exc:  # every rank hears of it, then it is raised
            report, failure = (False, _describe(exc), None), exc
        return self._gather(report), failure

    def encode(
        self, staging: Path, collection: Collection, located: dict[tuple, Any], encode: Encode
    ) -> tuple[Staged, dict[str, FileEntry]]:
        """Leader: have every rank encode its chunk of the images not ``located`` into segments
        of ``staging``; returns where each one's features are and the segments' file tables.
        Alone: nothing (:func:`~hat.gallery.builder.write_gallery` encodes them itself)."""
        new = [i for i, e in enumerate(collection.entries) if e.fingerprint not in located]
        if not self.info.enabled or not new:
            return {}, {}
        self._from_leader(("encode", str(staging.absolute()), new))  # cwd may differ per node
        reports, failure = self._encode_share(staging, [collection.entries[i] for i in new], encode)
        if failure is not None:
            raise failure
        errors = [
            f"rank {rank}: {report[1]}" for rank, report in enumerate(reports) if not report[0]
        ]
        if errors:
            raise TeamError("encoding failed on " + "; ".join(errors))
        staged, files = {}, {}
        for _, part, table in reports:
            # named as the leader names the folder: write_gallery tells staged segments by it
            staged.update({k: v and replace(v, directory=staging) for k, v in part.items()})
            files.update(table)
        return staged, files

    def follow(self, collection: Collection, encode: Encode) -> Gallery:
        """Worker: encode the leader's jobs until it announces the gallery (or its failure)."""
        failure = None
        while True:
            job = self._from_leader()
            if job[0] == "encode":
                _, staging, new = job
                entries = [collection.entries[i] for i in new]
                failure = self._encode_share(Path(staging), entries, encode)[1] or failure
            elif job[0] == "done":
                _, directory, report = job
                gallery = open_gallery(directory)
                gallery.report = BuildReport(**report)
                return gallery
            else:
                raise TeamError(f"rank 0 failed: {job[1]}") from failure

    def run(self, build: Callable[[Team], Gallery]) -> Gallery:
        """Leader: ``build`` and announce how it ended, however it ended. Others: ``build``."""
        if not self.leads:
            return build(self)
        try:
            gallery = build(self)
        except BaseException as exc:
            if self.agreed:  # the others wait for the leader's word
                self._from_leader(("failed", _describe(exc)))
            raise
        report = asdict(gallery.report) if gallery.report else {"cache_hit": True}
        self._from_leader(("done", str(gallery.directory.absolute()), report))
        return gallery
