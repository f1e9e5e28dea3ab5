"""Text-conditioned saliency maps for 2D images at their own resolution (pure stage function)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..config import SaliencyConfig
from ..models.biomedclip import ClipModel
from ..ops.transforms import LongestSidePad, ShortSideCrop, Stretch
from .m2ib import m2ib_maps
from .vision_split import VisionSplit

GEOMETRIES = ("crop", "pad", "stretch")


@dataclass
class SaliencyMap:
    """A map in [0, 1] at the input image's size; ``constant`` when M2IB gave no contrast at all."""

    values: np.ndarray  # H x W float32
    constant: bool


def clip_geometry(name: str, size: int) -> ShortSideCrop | LongestSidePad | Stretch:
    """crop: CLIP's own preprocessing (short side, centre crop); pad: longest side + pad; stretch."""
    if name == "crop":
        return ShortSideCrop(size)
    if name == "pad":
        return LongestSidePad(size)
    if name == "stretch":
        return Stretch(size)
    raise ValueError(f"unknown saliency geometry '{name}'; choose from {', '.join(GEOMETRIES)}")


def clip_inputs(clip: ClipModel, images: Sequence[np.ndarray], geometry) -> torch.Tensor:
    """``H x W x 3`` uint8 images -> normalised ``Bx3xSxS`` model input."""
    mean = torch.tensor(clip.mean, device=clip.device).view(1, 3, 1, 1)
    std = torch.tensor(clip.std, device=clip.device).view(1, 3, 1, 1)
    batch = []
    for image in images:
        x = torch.as_tensor(image, dtype=torch.float32, device=clip.device).permute(2, 0, 1)[None] / 255.0
        batch.append(geometry.apply_image(x))
    return (torch.cat(batch) - mean) / std


def normalise_map(values: np.ndarray) -> SaliencyMap:
    lo, hi = float(values.min()), float(values.max())
    if not np.isfinite(hi - lo) or hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return SaliencyMap(np.zeros(values.shape, np.float32), True)
    return SaliencyMap(((values - lo) / (hi - lo)).astype(np.float32), False)


def saliency_maps(
    clip: ClipModel,
    images: Sequence[np.ndarray],
    text: str | list[str],
    settings: SaliencyConfig | None = None,
) -> list[SaliencyMap]:
    """M2IB maps for ``H x W x 3`` uint8 images, upsampled bilinearly and mapped back to each image."""
    params = settings or SaliencyConfig()
    split = VisionSplit(clip.model.visual, params.layer)
    transform = clip_geometry(params.geometry, clip.image_size)
    batch_size = params.batch_size
    text_embedding = clip.text_embedding(text)
    out: list[SaliencyMap] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        grid = m2ib_maps(split, clip_inputs(clip, chunk, transform), text_embedding, params)
        for image, values in zip(chunk, grid, strict=True):
            full = transform.invert_masks(values[None, None].float(), image.shape[:2])[0, 0]
            out.append(normalise_map(full.cpu().numpy()))
    return out
