"""Decoding pair images to CLIP inputs, in Ray Data tasks (pure functions on numpy batches)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from ..domain.images import read_image
from ..errors import MedClipSamError
from ..ops.slicing import to_rgb, window_to_uint8
from ..ops.transforms import ShortSideCrop


def clip_pixels(image: np.ndarray, size: int, mean, std) -> np.ndarray:
    """``H x W[ x 3]`` image -> ``3 x S x S`` float32 CLIP input (short side resize + centre crop)."""
    rgb = to_rgb(window_to_uint8(image))
    x = torch.as_tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
    x = ShortSideCrop(size).apply_image(x)[0]
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)).numpy()


def _middle_slice(array: np.ndarray, is_volume: bool) -> np.ndarray:
    return array[array.shape[0] // 2] if is_volume else array


def readable(batch):
    """Adds ``ok`` to a pyarrow batch: whether each row's image can be read (missing, corrupt: False)."""
    ok = []
    for uri in batch["image"].to_pylist():
        try:
            read_image(str(uri))
            ok.append(True)
        except (MedClipSamError, OSError, RuntimeError, ValueError):
            ok.append(False)
    return batch.append_column("ok", pa.array(ok, type=pa.bool_()))


def decode(batch: dict[str, np.ndarray], size: int, mean, std) -> dict[str, np.ndarray]:
    """Adds ``pixels`` (``N x 3 x S x S``); a volume contributes its middle slice."""
    pixels = []
    for uri in batch["image"]:
        image = read_image(str(uri))
        pixels.append(clip_pixels(_middle_slice(image.array, image.is_volume), size, mean, std))
    return {"caption": batch["caption"], "pixels": np.stack(pixels).astype(np.float32)}
