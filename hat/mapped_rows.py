"""Rows of a memory-mapped array left where they lie, for a kernel that reads them in place."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MappedRows:
    """Rows ``rows`` of a C-contiguous array ``(N, ...)``, not copied out: a gallery segment's
    memory-mapped int8 regions of a query's candidates, already checked, which the AMX tile
    kernel reads where they lie (:func:`hat.native.i2t_tile_scores`). Shaped like the tensor
    that :meth:`gathered` copies out for anything else."""

    array: np.ndarray
    rows: np.ndarray  # int64
    device = torch.device("cpu")
    requires_grad = False

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.array.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return torch.from_numpy(np.empty(0, self.array.dtype)).dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> MappedRows:
        return MappedRows(self.array, np.atleast_1d(self.rows[index]))

    def addresses(self) -> np.ndarray:
        """Where each row starts in memory."""
        row_bytes = self.array.itemsize * int(np.prod(self.array.shape[1:]))
        return self.array.ctypes.data + self.rows.astype(np.uint64) * np.uint64(row_bytes)

    def gathered(self) -> torch.Tensor:
        return torch.from_numpy(self.array[self.rows])

    def float(self) -> torch.Tensor:
        return self.gathered().float()

    def to(self, device: torch.device | str) -> MappedRows | torch.Tensor:
        return self if torch.device(device).type == "cpu" else self.gathered().to(device)
