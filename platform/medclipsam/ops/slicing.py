"""Volumes to 2D slices and back, and intensity windowing to 8-bit.

A volume ``Z x Y x X`` is cut along ``axis`` (0 = SimpleITK's first array axis); slice ``i``
is ``np.take(volume, i, axis)``, whose rows and columns are the remaining axes in order.
``stack_slices`` is the exact inverse of ``take_slice`` over all indices; ``model_inputs`` and
``assemble_mask`` are the same pair for a whole case (image -> windowed RGB slices -> masks -> mask).

NaN and infinite voxels take no part in a window's statistics and map to its low end (black); a
slice that is mostly non-finite is an ``InputError`` naming the file and the slice, since its
picture would be nothing but those holes.
"""

from __future__ import annotations

import numpy as np

from ..config import CT_WINDOWS, ImageConfig, WindowConfig
from ..domain.images import MedicalImage, check_finite


def num_slices(volume: np.ndarray, axis: int) -> int:
    return volume.shape[axis]


def take_slice(volume: np.ndarray, index: int, axis: int = 0) -> np.ndarray:
    """Slice ``index`` along ``axis`` of a 3D array."""
    if not 0 <= index < volume.shape[axis]:
        raise IndexError(f"slice {index} outside 0..{volume.shape[axis] - 1} along axis {axis}")
    return np.take(volume, index, axis=axis)


def stack_slices(slices: list[np.ndarray], axis: int = 0) -> np.ndarray:
    """Inverse of ``take_slice`` over all indices: re-stack 2D slices along ``axis``."""
    return np.stack(slices, axis=axis)


def window_to_uint8(image: np.ndarray, window: WindowConfig | None = None) -> np.ndarray:
    """Map an image (2D, or 2D with channels) to uint8.

    8-bit input is returned unchanged: its display range is already fixed. Otherwise the
    preset window, or the slice's own percentiles, are stretched to 0..255. A constant slice
    maps to zeros. NaN and infinite values are left out of the percentiles (one NaN would make
    them NaN and the slice black) and map to 0, the low end.
    """
    if image.dtype == np.uint8:
        return image
    window = window or WindowConfig()
    data = image.astype(np.float64)
    finite = np.isfinite(data) if image.dtype.kind in "fc" else None
    if finite is not None and finite.all():
        finite = None
    values = data if finite is None else data[finite]
    if values.size == 0:
        return np.zeros(image.shape, dtype=np.uint8)
    if window.preset is not None:
        centre, width = CT_WINDOWS[window.preset]
        lo, hi = centre - width / 2.0, centre + width / 2.0
    else:
        lo, hi = np.percentile(values, [window.lower_percentile, window.upper_percentile])
        if hi <= lo:
            lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(image.shape, dtype=np.uint8)
    scaled = (np.clip(data, lo, hi) - lo) / (hi - lo) * 255.0
    if finite is not None:
        scaled[~finite] = 0.0
    return np.round(scaled).astype(np.uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """``H x W`` or ``H x W x 3`` uint8 to ``H x W x 3``."""
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 3:
        return image
    raise ValueError(f"expected H x W or H x W x 3, got shape {image.shape}")


def slice_keys(image: MedicalImage, axis: int) -> list[int | None]:
    """Every slice index of a volume along ``axis``, or ``[None]`` for a 2D image."""
    return list(range(image.array.shape[axis])) if image.is_volume else [None]


def model_inputs(image: MedicalImage, keys: list[int | None], settings: ImageConfig) -> list[np.ndarray]:
    """``H x W x 3`` uint8 inputs for the given slice indices (None: the 2D image itself).

    A slice (or 2D image) that is mostly NaN or infinite is an ``InputError`` naming the file and
    the slice: the model would see only the holes, and answer with garbage marked ok.
    """
    if not image.is_volume:
        check_finite(image.array, image.uri)
        return [to_rgb(window_to_uint8(image.array, settings.window)) for _ in keys]
    inputs = []
    for key in keys:
        pixels = take_slice(image.array, key, settings.axis)
        check_finite(pixels, image.uri, f" of slice {key} (axis {settings.axis})")
        inputs.append(to_rgb(window_to_uint8(pixels, settings.window)))
    return inputs


def assemble_mask(image: MedicalImage, masks: dict[int | None, np.ndarray], axis: int) -> np.ndarray:
    """Full-size mask: the given slices from ``masks``, empty elsewhere (inverse of ``model_inputs``)."""
    if not image.is_volume:
        return masks.get(None, np.zeros(image.array.shape[:2], dtype=bool))
    out = np.zeros(image.array.shape, dtype=np.uint8)
    for index, mask in masks.items():
        selector: list[slice | int] = [slice(None)] * 3
        selector[axis] = index
        out[tuple(selector)] = mask
    return out
