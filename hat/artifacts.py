"""High-norm "artifact" tokens: regions whose feature norm is an outlier within their image.

ViTs trained without register tokens (DINOv2 among them) recycle a few background patches as
global scratch space; their features have a much larger norm than their neighbours' and they draw
attention whatever the query. In HAT's maps such a region can be the brightest cell of every
word's map, which hides where the rest of the attention goes.

The rule, per image and per level, on the norms of the level features the alignment uses (after
the level norm and projection): a region is an outlier when its modified z-score
0.6745 · (‖v_k‖ − median) / MAD exceeds :data:`OUTLIER_Z` (Iglewicz and Hoaglin's robust rule;
median and MAD over the image's regions, so one image's outliers do not depend on other images).
The score is never changed. The maps outline the outliers and, on request, leave them out of the
colour range; by default they stay in it, because on the demo checkpoint's levels the outliers
mostly lie on the objects, not the background (figures: reports/README.md and
reports/artifact_tokens.json).
"""

from __future__ import annotations

import numpy as np

OUTLIER_Z = 3.5
MAD_TO_SD = 0.6745  # the MAD of a normal distribution is 0.6745 of its standard deviation


def modified_z(norms: np.ndarray) -> np.ndarray:
    """Robust z-scores of ``norms`` along the last axis (0 where the MAD is 0: no spread)."""
    norms = np.asarray(norms, dtype=np.float64)
    median = np.median(norms, axis=-1, keepdims=True)
    mad = np.median(np.abs(norms - median), axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = MAD_TO_SD * (norms - median) / mad
    return np.where(mad > 0, z, 0.0)


def outlier_tokens(norms: np.ndarray, threshold: float = OUTLIER_Z) -> np.ndarray:
    """Boolean mask of the high-norm outliers along the last axis of ``norms``.

    Only high norms count (the artifacts are high-norm); a low-norm region is ordinary.
    """
    return modified_z(norms) > threshold


def display_peak(word_map: np.ndarray, excluded: np.ndarray | None = None) -> tuple[int, int]:
    """``(row, col)`` of the map's peak among the regions not ``excluded`` (all excluded: any)."""
    values = np.asarray(word_map, dtype=np.float64)
    if excluded is not None and not np.all(excluded):
        values = np.where(excluded.reshape(values.shape), -np.inf, values)
    row, col = np.unravel_index(int(np.argmax(values)), values.shape)
    return int(row), int(col)
