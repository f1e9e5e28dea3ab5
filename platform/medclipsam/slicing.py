"""Volumes to 2D slices and back, and intensity windowing to 8-bit.

A volume ``Z x Y x X`` is cut along ``axis`` (0 = SimpleITK's first array axis); slice ``i``
is ``np.take(volume, i, axis)``, whose rows and columns are the remaining axes in order.
``stack_slices`` is the exact inverse of ``take_slice`` over all indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: CT window presets as (centre, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
    "abdomen": (60.0, 400.0),
}


@dataclass(frozen=True)
class Window:
    """How to map intensities to 0..255: a CT preset, or per-slice percentiles."""

    preset: str | None = None
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in CT_WINDOWS:
            raise ValueError(f"unknown CT window preset '{self.preset}'; choose from {sorted(CT_WINDOWS)}")
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError(
                f"percentiles must satisfy 0 <= lower < upper <= 100, got "
                f"{self.lower_percentile}, {self.upper_percentile}"
            )


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


def window_to_uint8(image: np.ndarray, window: Window = Window()) -> np.ndarray:
    """Map an image (2D, or 2D with channels) to uint8.

    8-bit input is returned unchanged: its display range is already fixed. Otherwise the
    preset window, or the slice's own percentiles, are stretched to 0..255. A constant slice
    maps to zeros.
    """
    if image.dtype == np.uint8:
        return image
    data = image.astype(np.float64)
    if window.preset is not None:
        centre, width = CT_WINDOWS[window.preset]
        lo, hi = centre - width / 2.0, centre + width / 2.0
    else:
        lo, hi = np.percentile(data, [window.lower_percentile, window.upper_percentile])
        if hi <= lo:
            lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros(image.shape, dtype=np.uint8)
    scaled = (np.clip(data, lo, hi) - lo) / (hi - lo) * 255.0
    return np.round(scaled).astype(np.uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """``H x W`` or ``H x W x 3`` uint8 to ``H x W x 3``."""
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 3:
        return image
    raise ValueError(f"expected H x W or H x W x 3, got shape {image.shape}")
