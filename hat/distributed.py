"""Minimal DistributedDataParallel plumbing for ``torchrun`` (NCCL on GPU, gloo on CPU).

A process must not reach interpreter shutdown with the process group's threads still running:
gloo's worker thread releases each finished collective, and releasing a tensor that Python has
already dropped takes the GIL; during shutdown Python ends such a thread with ``pthread_exit``,
whose unwinding through a ``noexcept`` frame aborts the process ("terminate called without an
active exception", exit -6) although its work is done. A rank that leaves right after its last
collective (a follower, while rank 0 writes the checkpoint) hits that window now and then.
:func:`process_group` closes it: every rank meets at a barrier, then the group is destroyed and
its threads joined while the interpreter still runs.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(
    device: str, backend: str | None = None, timeout: timedelta | None = None
) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else run alone.

    ``backend`` defaults to NCCL on GPU, gloo on CPU; ``timeout`` (how long a collective waits
    for the other ranks) to torch's default.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), world_size)
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
    backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
    dist.init_process_group(backend=backend, timeout=timeout)
    return info


def replicas_in_sync(model: torch.nn.Module, info: DistInfo) -> bool:
    """True when every process holds the same parameters (a cheap guard against DDP bugs)."""
    if not info.enabled:
        return True
    params = [p.detach().double() for p in model.parameters()]
    fingerprint = torch.stack([torch.stack([p.sum(), p.abs().sum()]) for p in params]).flatten()
    fingerprint = fingerprint.to(params[0].device)
    reference = fingerprint.clone()
    dist.broadcast(reference, src=0)
    same = torch.tensor([float(torch.equal(fingerprint, reference))], device=fingerprint.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


@contextmanager
def process_group(
    device: str, backend: str | None = None, timeout: timedelta | None = None
) -> Iterator[DistInfo]:
    """Run the block in torchrun's process group (:func:`init_distributed`) and leave it cleanly.

    When the block ends normally every rank waits for the others, so none tears the group down
    while another still talks to it; then the group is destroyed. When it raises, the rank
    leaves at once (the others may never reach a barrier) and torchrun stops them.
    """
    info = init_distributed(device, backend, timeout)
    try:
        yield info
    except BaseException:
        leave(info)
        raise
    if info.enabled:
        dist.barrier()
    leave(info)


def leave(info: DistInfo) -> None:
    """Destroy the process group and free it now, so that its threads stop here.

    ``destroy_process_group`` only drops the registry's references; the group lives on while
    anything else holds it, such as a ``DistributedDataParallel`` wrapper inside a reference
    cycle (a training run and its bound methods), and only a garbage collection frees those.
    """
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()
