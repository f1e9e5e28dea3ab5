"""Overlay pictures: a mask's contour (and the ground truth's) drawn over the image, as PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage

PRED_COLOUR = (255, 40, 40)  # red
TRUTH_COLOUR = (40, 220, 40)  # green


def contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The mask's boundary band, ``width`` pixels wide, inside the mask."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def overlay_png(image: np.ndarray, mask: np.ndarray, truth: np.ndarray | None = None) -> bytes:
    """``H x W x 3`` uint8 image with the predicted contour in red and the true one in green."""
    picture = image.copy()
    width = max(1, min(image.shape[:2]) // 256)  # stays visible on large scans
    if truth is not None:
        picture[contour(truth, width)] = TRUTH_COLOUR
    picture[contour(mask, width)] = PRED_COLOUR
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_slice(masks: dict[int, np.ndarray], truths: dict[int, np.ndarray] | None = None) -> int:
    """The slice to draw: most predicted foreground, else most true foreground, else the middle one."""
    keys = sorted(masks)
    for areas in ({k: int(masks[k].sum()) for k in keys}, {k: int(v.sum()) for k, v in (truths or {}).items()}):
        if areas and max(areas.values()) > 0:
            return max(areas, key=lambda k: (areas[k], -k))
    return keys[len(keys) // 2]
