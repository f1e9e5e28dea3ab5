"""Prompts derived from binary masks (oracle prompts from labels, coarse masks from saliency)."""

from __future__ import annotations

import numpy as np

from .types import SlicePrompts


def bounding_box(mask: np.ndarray, margin: float = 0.0) -> np.ndarray | None:
    """(x0, y0, x1, y1) of the foreground pixel centres, widened by ``margin`` and clipped to the image."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    h, w = mask.shape
    return np.array(
        [
            max(cols.min() - margin, 0.0),
            max(rows.min() - margin, 0.0),
            min(cols.max() + margin, w - 1.0),
            min(rows.max() + margin, h - 1.0),
        ],
        dtype=np.float64,
    )


def box_prompts_from_mask(mask: np.ndarray, margin: float = 0.0) -> SlicePrompts | None:
    """One box around all foreground of a 2D mask, or None when the mask is empty."""
    box = bounding_box(mask, margin)
    if box is None:
        return None
    return SlicePrompts(boxes=box[None])
