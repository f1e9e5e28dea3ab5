"""Overlay pictures: a mask's contour, the ground truth's and the prompts drawn over the image, as PNG.

Colours are from the Okabe-Ito palette, which readers with the common colour-vision deficiencies
can tell apart: the mask orange, the truth sky blue, the prompts yellow (a background point
reddish purple).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..prompts.types import SlicePrompts

MASK_COLOUR = (230, 159, 0)  # orange
TRUTH_COLOUR = (86, 180, 233)  # sky blue
PROMPT_COLOUR = (240, 228, 66)  # yellow: boxes and foreground points
BACKGROUND_POINT_COLOUR = (204, 121, 167)  # reddish purple


def contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The mask's boundary band, ``width`` pixels wide, inside the mask."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def line_width(shape: tuple[int, ...]) -> int:
    """Contours 2 pixels wide on small images, wider on large scans, so they stay visible."""
    return max(2, min(shape[:2]) // 200)


def overlay_png(image: np.ndarray, mask: np.ndarray, truth: np.ndarray | None = None,
                prompts: SlicePrompts | None = None) -> bytes:
    """``H x W x 3`` uint8 image with the mask's contour, the truth's (when given) and the prompts."""
    picture = image.copy()
    width = line_width(image.shape)
    if truth is not None:
        picture[contour(truth, width)] = TRUTH_COLOUR
    picture[contour(mask, width)] = MASK_COLOUR
    drawn = Image.fromarray(picture)
    if prompts is not None:
        _draw_prompts(ImageDraw.Draw(drawn), prompts, width)
    buffer = io.BytesIO()
    drawn.save(buffer, format="PNG")
    return buffer.getvalue()


def _draw_prompts(draw: ImageDraw.ImageDraw, prompts: SlicePrompts, width: int) -> None:
    """Boxes as outlines through their corner pixels; points as squares centred on their pixel."""
    for x0, y0, x1, y1 in np.asarray(prompts.boxes, dtype=float):
        draw.rectangle([round(x0), round(y0), round(x1), round(y1)], outline=PROMPT_COLOUR, width=max(1, width // 2))
    half = width + 1
    for (x, y), label in zip(np.asarray(prompts.points, dtype=float), prompts.labels, strict=True):
        colour = PROMPT_COLOUR if label == 1 else BACKGROUND_POINT_COLOUR
        draw.rectangle([round(x) - half, round(y) - half, round(x) + half, round(y) + half], fill=colour)


def overlay_slice(masks: dict[int, np.ndarray], truths: dict[int, np.ndarray] | None = None) -> int:
    """The slice to draw: most predicted foreground, else most true foreground, else the middle one."""
    keys = sorted(masks)
    for areas in ({k: int(masks[k].sum()) for k in keys}, {k: int(v.sum()) for k, v in (truths or {}).items()}):
        if areas and max(areas.values()) > 0:
            return max(areas, key=lambda k: (areas[k], -k))
    return keys[len(keys) // 2]


def strip_slices(prompted: list[int], key: int, limit: int) -> list[int]:
    """The slices a case's strip shows: every prompted one, or ``limit`` of them evenly spaced (the
    overlay's ``key`` slice among them); just ``key`` when none was prompted."""
    prompted = sorted(prompted)
    if not prompted:
        return [key]
    if len(prompted) <= limit:
        return prompted
    chosen = {prompted[round(i)] for i in np.linspace(0, len(prompted) - 1, max(1, limit))}
    if key in prompted and key not in chosen:
        chosen.remove(min(chosen, key=lambda k: abs(k - key)))
        chosen.add(key)
    return sorted(chosen)
