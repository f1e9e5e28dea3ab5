"""Per-pixel and per-case uncertainty of an ensemble's mean foreground probability.

Per pixel, the binary entropy in bits, H = -[p log2 p + (1 - p) log2 (1 - p)], 0 where p is 0 or
1. Per case, U = 100 * sum(H) / |dilate(mask, 3 x 3) - mask|: the entropy summed over the image
per pixel of the mask's one-pixel outer ring, so a confident mask of any size scores low. NaN for
an empty mask, and for a mask that fills the image (it has no ring). Volumes are dilated slice by
slice (the 2D configuration's view).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.special import xlogy


def binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return (-(xlogy(p, p) + xlogy(1.0 - p, 1.0 - p)) / math.log(2.0)).astype(np.float32)


def outer_ring(mask: np.ndarray) -> np.ndarray:
    """The pixels a 3 x 3 dilation adds to the mask (in-plane only for a volume)."""
    mask = mask.astype(bool)
    structure = np.ones((3, 3), bool) if mask.ndim == 2 else np.ones((1, 3, 3), bool)
    return ndimage.binary_dilation(mask, structure=structure) & ~mask


def case_uncertainty(entropy: np.ndarray, mask: np.ndarray) -> float:
    ring = int(outer_ring(mask).sum())
    if not mask.any() or ring == 0:
        return math.nan
    return 100.0 * float(entropy.sum(dtype=np.float64)) / ring
