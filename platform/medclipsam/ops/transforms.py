"""Geometric transforms between an image and a model's input, each beside its exact inverse.

A model sees a fixed square input. ``LongestSidePad`` keeps the aspect ratio (resize the
longest side, pad bottom/right: SAM, LiteMedSAM); ``Stretch`` resizes both sides to the
target (MedSAM's published preprocessing). Coordinates are ``x`` (column), ``y`` (row) in
pixels of the original image, with integer values at pixel centres. Resizing with
``align_corners=False`` maps a pixel centre ``x`` to ``(x + 0.5) * scale - 0.5``; the coordinate
transforms use exactly that, so a prompt lands on the same anatomy the resized image shows there.
segment_anything's own ``ResizeLongestSide`` scales coordinates as ``x * scale`` instead; the SAM
ViT backends were trained that way, so ``LongestSidePad(pixel_centres=False)`` reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _scale_centres(coords: np.ndarray, scale_x: float, scale_y: float, pixel_centres: bool = True) -> np.ndarray:
    """Coordinates ``...x2`` (x, y) after resizing by (scale_x, scale_y): pixel centre to pixel centre,
    or (``pixel_centres=False``) plainly multiplied, as segment_anything does."""
    shift = 0.5 if pixel_centres else 0.0
    out = np.asarray(coords, dtype=np.float64).copy()
    out[..., 0] = (out[..., 0] + shift) * scale_x - shift
    out[..., 1] = (out[..., 1] + shift) * scale_y - shift
    return out


@dataclass(frozen=True)
class LongestSidePad:
    """Resize so the longest side is ``target``, then pad bottom/right to ``target x target``."""

    target: int
    pixel_centres: bool = True  # False: prompt coordinates as segment_anything scales them (x * scale)

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        scale = self.target / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def apply_image(self, image: torch.Tensor) -> torch.Tensor:
        """``BxCxHxW`` float -> ``BxCxTxT`` (zero padded)."""
        h, w = image.shape[-2:]
        nh, nw = self.resized_shape(h, w)
        resized = F.interpolate(image, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        return F.pad(resized, (0, self.target - nw, 0, self.target - nh))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``...x2`` (x, y) in original pixels -> model input pixels."""
        h, w = original_size
        nh, nw = self.resized_shape(h, w)
        return _scale_centres(coords, nw / w, nh / h, self.pixel_centres)

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``Nx4`` (x0, y0, x1, y1) -> model input pixels."""
        return self.apply_coords(np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def invert_masks(self, masks: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """``BxKxhxw`` logits over the padded input -> ``BxKxHxW`` over the original image."""
        h, w = original_size
        nh, nw = self.resized_shape(h, w)
        full = F.interpolate(masks, size=(self.target, self.target), mode="bilinear", align_corners=False)
        return F.interpolate(full[..., :nh, :nw], size=(h, w), mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class Stretch:
    """Resize both sides to ``target`` (aspect ratio not kept)."""

    target: int

    def apply_image(self, image: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            image, size=(self.target, self.target), mode="bilinear", align_corners=False, antialias=True
        )

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        h, w = original_size
        return _scale_centres(coords, self.target / w, self.target / h)

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        return self.apply_coords(np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def invert_masks(self, masks: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(masks, size=tuple(original_size), mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class ShortSideCrop:
    """CLIP's preprocessing: resize the short side to ``target`` (bicubic), centre-crop ``target x target``.

    The inverse puts a ``target x target`` map back where the crop came from; the borders the
    model never saw get zero.
    """

    target: int

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        # torchvision's Resize(int): the short side becomes target, the long side is truncated.
        if height <= width:
            return self.target, int(self.target * width / height)
        return int(self.target * height / width), self.target

    def crop_origin(self, height: int, width: int) -> tuple[int, int]:
        rh, rw = self.resized_shape(height, width)
        return round((rh - self.target) / 2.0), round((rw - self.target) / 2.0)

    def apply_image(self, image: torch.Tensor) -> torch.Tensor:
        """``BxCxHxW`` float in [0, 1] -> ``BxCxTxT``."""
        h, w = image.shape[-2:]
        rh, rw = self.resized_shape(h, w)
        resized = F.interpolate(image, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True)
        top, left = self.crop_origin(h, w)
        return resized[..., top : top + self.target, left : left + self.target].clamp(0.0, 1.0)

    def invert_masks(self, maps: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """``BxKxhxw`` maps over the crop -> ``BxKxHxW`` over the original image (zero outside the crop)."""
        h, w = original_size
        rh, rw = self.resized_shape(h, w)
        top, left = self.crop_origin(h, w)
        full = F.interpolate(maps, size=(self.target, self.target), mode="bilinear", align_corners=False)
        canvas = maps.new_zeros((*maps.shape[:-2], rh, rw))
        canvas[..., top : top + self.target, left : left + self.target] = full
        return F.interpolate(canvas, size=(h, w), mode="bilinear", align_corners=False)
