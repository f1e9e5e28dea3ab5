"""Prompts derived from binary masks (oracle prompts from labels, coarse masks from saliency)."""

from __future__ import annotations

import numpy as np

from ..domain.images import MedicalImage
from ..ops.slicing import take_slice
from .types import SlicePrompts


def bounding_box(mask: np.ndarray, margin: float = 0.0, min_size: float = 0.0) -> np.ndarray | None:
    """(x0, y0, x1, y1) of the foreground pixel centres, widened by ``margin`` and clipped to the image.

    ``min_size`` widens a box thinner than that (a one-pixel-wide object) symmetrically, so the
    box keeps x1 > x0 and y1 > y0 as SAM's prompt needs.
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    h, w = mask.shape
    x0, x1 = _span(cols.min(), cols.max(), margin, min_size, w)
    y0, y1 = _span(rows.min(), rows.max(), margin, min_size, h)
    return np.array([x0, y0, x1, y1], dtype=np.float64)


def _span(lo: float, hi: float, margin: float, min_size: float, size: int) -> tuple[float, float]:
    lo, hi = float(lo) - margin, float(hi) + margin
    if hi - lo < min_size:
        grow = (min_size - (hi - lo)) / 2.0
        lo, hi = lo - grow, hi + grow
    return max(lo, 0.0), min(hi, size - 1.0)


def box_prompts_from_mask(mask: np.ndarray, margin: float = 0.0) -> SlicePrompts | None:
    """One box around all foreground of a 2D mask, or None when the mask is empty."""
    box = bounding_box(mask, margin)
    if box is None:
        return None
    return SlicePrompts(boxes=box[None])


def label_boxes(label: MedicalImage, axis: int = 0, margin: float = 0.0,
                key_slices: int = 0) -> dict[int | None, SlicePrompts]:
    """One box per labelled slice of a volume (or of a labelled 2D image, key None): oracle prompts.

    ``key_slices`` N > 0 keeps the N slices of largest truth area (ties to the lower slice): the key
    slices a propagation starts from."""
    planes = {None: label.array} if not label.is_volume else {
        index: take_slice(label.array, index, axis) for index in range(label.array.shape[axis])}
    if key_slices and label.is_volume:
        areas = {k: int(np.count_nonzero(p)) for k, p in planes.items()}
        chosen = sorted((k for k in areas if areas[k]), key=lambda k: (-areas[k], k))[:key_slices]
        planes = {k: planes[k] for k in sorted(chosen)}
    out: dict[int | None, SlicePrompts] = {}
    for key, plane in planes.items():
        box = bounding_box(plane, margin, min_size=1.0)
        if box is not None:
            out[key] = SlicePrompts(boxes=box[None])
    return out
