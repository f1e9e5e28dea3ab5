"""From probability maps to final binary masks."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def keep_largest_components(mask: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest connected components (8-connected in 2D); ``k <= 0`` keeps all."""
    mask = mask.astype(bool)
    if k <= 0 or not mask.any():
        return mask
    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    if count <= k:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    # Stable order: larger first, then lower label, so ties resolve the same way every run.
    keep = np.argsort(-sizes, kind="stable")[:k] + 1
    return np.isin(labels, keep)


def binarise(prob: np.ndarray, threshold: float = 0.5, keep_components: int = 0) -> np.ndarray:
    return keep_largest_components(prob > threshold, keep_components)


def clean_volume(mask: np.ndarray, keep_components: int, fill_holes: bool) -> np.ndarray:
    """A volume's mask cleaned in 3D: the ``keep_components`` largest 26-connected components (0: all),
    then the holes they enclose in 3D filled."""
    cleaned = keep_largest_components(mask, keep_components)
    return ndimage.binary_fill_holes(cleaned) if fill_holes else cleaned
