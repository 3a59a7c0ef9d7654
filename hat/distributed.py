"""Minimal DistributedDataParallel plumbing for ``torchrun`` (NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import os
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


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
