"""Text-conditioned saliency maps for 2D images at their own resolution (pure stage function)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..config import SaliencyConfig
from ..models.biomedclip import ClipModel
from ..ops.transforms import LongestSidePad, ShortSideCrop, Stretch
from .m2ib import m2ib_maps
from .vision_split import VisionSplit

GEOMETRIES = ("crop", "pad", "stretch", "cover")


@dataclass
class SaliencyMap:
    """A map in [0, 1] at the input image's size; ``constant`` when M2IB gave no contrast at all."""

    values: np.ndarray  # H x W float32
    constant: bool


def clip_geometry(name: str, size: int) -> ShortSideCrop | LongestSidePad | Stretch:
    """crop: CLIP's own preprocessing (short side, centre crop); pad: longest side + pad; stretch.
    (cover: square windows, each seen as ``crop`` sees a square image.)"""
    if name in ("crop", "cover"):
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


def cover_windows(height: int, width: int) -> list[tuple[int, int, int]]:
    """``(top, left, side)`` of the fewest square windows (side = the short side) that cover the
    image, evenly spaced along its long side; one window for a square image."""
    side, long = min(height, width), max(height, width)
    n = math.ceil(long / side)
    starts = [0] if n == 1 else [round(i * (long - side) / (n - 1)) for i in range(n)]
    return [(start, 0, side) if height > width else (0, start, side) for start in starts]


class TokenCache:
    """The image tower's tokens after the bottleneck layer, per (layer, geometry, image key): they
    depend on neither the text nor M2IB's settings, so a search over those computes them once."""

    def __init__(self) -> None:
        self.tokens: dict[tuple, torch.Tensor] = {}

    def get(self, clip: ClipModel, split: VisionSplit, images: Sequence[np.ndarray], geometry,
            keys: Sequence[Hashable], layer: int, name: str) -> torch.Tensor:
        wanted = [(clip.uri, layer, name, key) for key in keys]
        missing = [i for i, k in enumerate(wanted) if k not in self.tokens]
        if missing:
            with torch.no_grad():
                found = split.prefix(clip_inputs(clip, [images[i] for i in missing], geometry))
            for i, tokens in zip(missing, found, strict=True):
                self.tokens[wanted[i]] = tokens
        return torch.stack([self.tokens[k] for k in wanted])


def _chunk_maps(clip: ClipModel, split: VisionSplit, images: Sequence[np.ndarray], transform,
                keys: Sequence[Hashable] | None, cache: TokenCache, text: torch.Tensor,
                params: SaliencyConfig) -> torch.Tensor:
    """M2IB on one batch: from the cached tokens when the images have keys, else from the pixels."""
    if keys is None:
        return m2ib_maps(split, clip_inputs(clip, images, transform), text, params)
    tokens = cache.get(clip, split, images, transform, keys, params.layer, params.geometry)
    return m2ib_maps(split, None, text, params, tokens)


def _cover_maps(clip: ClipModel, split: VisionSplit, images: Sequence[np.ndarray], text_embedding: torch.Tensor,
                params: SaliencyConfig, transform: ShortSideCrop, keys: Sequence[Hashable] | None,
                cache: TokenCache) -> list[SaliencyMap]:
    """M2IB on every window of every image; each map mapped back and averaged where windows overlap."""
    pieces = [(i, window) for i, image in enumerate(images) for window in cover_windows(*image.shape[:2])]
    sums = [np.zeros(image.shape[:2], np.float64) for image in images]
    counts = [np.zeros(image.shape[:2], np.int32) for image in images]
    for start in range(0, len(pieces), params.batch_size):
        chunk = pieces[start : start + params.batch_size]
        crops = [images[i][top : top + side, left : left + side] for i, (top, left, side) in chunk]
        window_keys = None if keys is None else [(keys[i], window) for i, window in chunk]
        grid = _chunk_maps(clip, split, crops, transform, window_keys, cache, text_embedding, params)
        for (i, (top, left, side)), values in zip(chunk, grid, strict=True):
            window = transform.invert_masks(values[None, None].float(), (side, side))[0, 0].cpu().numpy()
            sums[i][top : top + side, left : left + side] += window
            counts[i][top : top + side, left : left + side] += 1
    return [normalise_map(total / count) for total, count in zip(sums, counts, strict=True)]


def saliency_maps(
    clip: ClipModel,
    images: Sequence[np.ndarray],
    text: str | list[str],
    settings: SaliencyConfig | None = None,
    keys: Sequence[Hashable] | None = None,
    cache: TokenCache | None = None,
) -> list[SaliencyMap]:
    """M2IB maps for ``H x W x 3`` uint8 images, upsampled bilinearly and mapped back to each image.

    With ``keys`` (one per image) and a ``cache``, the tokens before the bottleneck are computed
    once per image and layer across calls (a settings search).
    """
    params = settings or SaliencyConfig()
    split = VisionSplit(clip.model.visual, params.layer)
    transform = clip_geometry(params.geometry, clip.image_size)
    batch_size = params.batch_size
    text_embedding = clip.text_embedding(text)
    cache = cache or TokenCache()
    if params.geometry == "cover":
        return _cover_maps(clip, split, images, text_embedding, params, transform, keys, cache)
    out: list[SaliencyMap] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        grid = _chunk_maps(clip, split, chunk, transform, None if keys is None else keys[start : start + batch_size],
                           cache, text_embedding, params)
        for image, values in zip(chunk, grid, strict=True):
            full = transform.invert_masks(values[None, None].float(), image.shape[:2])[0, 0]
            out.append(normalise_map(full.cpu().numpy()))
    return out
