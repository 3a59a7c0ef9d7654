"""Regions of a compressed (``pq``) gallery as its codes, decoded only where scoring needs it."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import torch

from hat import native


@dataclass(frozen=True)
class Codebook:
    """A product quantiser's centroids ``(M, 256, dsub)`` (sub-vector m of a region is
    ``centroids[m, code_m]``), with what scoring from codes takes of them, laid out once:
    the centroids by dimension ``(M, dsub, 256)``, their squared norms ``(M, 256)``, and
    faiss's quantiser of them (its decode is the fastest without :mod:`hat.native`)."""

    centroids: torch.Tensor
    by_dimension: torch.Tensor
    squares: torch.Tensor
    quantizer: faiss.ProductQuantizer

    @classmethod
    def of(cls, centroids: torch.Tensor) -> Codebook:
        centroids = centroids.float().contiguous()
        subs, count, dsub = centroids.shape
        quantizer = faiss.ProductQuantizer(subs * dsub, subs, count.bit_length() - 1)
        faiss.copy_array_to_vector(centroids.numpy().ravel(), quantizer.centroids)
        by_dimension = centroids.permute(0, 2, 1).contiguous()
        return cls(centroids, by_dimension, centroids.square().sum(dim=2), quantizer)


@dataclass(frozen=True)
class CodedRegions:
    """Images' regions as product-quantisation codes ``(I, K, M)``, shaped like their
    coordinates ``(I, K, M · dsub (+ 1))``: region k of image i is ``shift[i]`` plus its codes'
    centroids (``codebook.centroids[m, codes[i, k, m]]``, m = 1..M, one after the other), then
    ``length[i]`` along the image's own row where given (:class:`hat.gallery.codecs.PQCodec`;
    the rows are the level's :class:`~hat.alignment.Basis`). An image → text query's caption
    scores them from the codes on one CPU thread (:func:`hat.alignment.level_scores`): a table
    of its words' products with the centroids (0.5-2 MB, whatever the number of candidates)
    stands in for the decoded coordinates (~10 MB per level for a query's 100 candidates).
    Anything else takes :meth:`decoded`. Images are indexed by slices or index tensors."""

    codes: torch.Tensor  # (I, K, M) uint8
    codebook: Codebook
    shift: torch.Tensor  # (I, M · dsub) fp32
    length: torch.Tensor | None = None  # (I,) fp32
    dtype = torch.float32
    requires_grad = False

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def shape(self) -> torch.Size:
        n_img, n_reg, subs = self.codes.shape
        width = subs * self.codebook.centroids.shape[2] + (self.length is not None)
        return torch.Size((n_img, n_reg, width))

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index) -> CodedRegions:
        length = None if self.length is None else self.length[index]
        return CodedRegions(self.codes[index], self.codebook, self.shift[index], length)

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The coordinates ``(I, K, M · dsub (+ 1))`` and their norms ``(I, K)``, in one C pass
        where :mod:`hat.native` is built."""
        if self.codes.numel() and (kernels := native.kernels()) is not None:
            codes = self.codes.cpu().numpy()
            centroids = self.codebook.centroids.numpy()
            return native.pq_coordinates(kernels, codes, centroids, self.shift, self.length)
        n_img, n_reg, subs = self.codes.shape
        codes = self.codes.cpu().numpy().reshape(-1, subs)
        picked = torch.from_numpy(self.codebook.quantizer.decode(codes))  # (I K, M dsub)
        coordinates = torch.empty(self.shape)
        kept = picked.shape[1]
        torch.add(picked.view(n_img, n_reg, kept), self.shift[:, None], out=coordinates[..., :kept])
        if self.length is not None:
            coordinates[..., kept] = self.length[:, None]
        return coordinates, torch.linalg.vector_norm(coordinates, dim=2)

    def float(self) -> torch.Tensor:
        return self.decoded()[0]

    def to(self, device: torch.device | str) -> CodedRegions | torch.Tensor:
        return self if torch.device(device).type == "cpu" else self.float().to(device)
