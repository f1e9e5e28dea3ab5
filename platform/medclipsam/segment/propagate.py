"""A volume segmented from prompts on a few key slices: each chain carries its mask slice by slice.

From each prompted (key) slice a chain runs in both directions along the slicing axis. The next
slice is prompted with the previous slice's mask (``carried_prompts``: a widened box per component,
optionally a point inside it and the previous low-resolution logits as SAM's dense prompt); the
chain ends at the first slice whose mask fails the stop rule (``stop_reason``), or before a slice
where text mode's saliency saw no target (``absent``). With several key slices, each slice belongs
to the nearest one's chain (a tie to the lower slice), so a prompt on another slice corrects the
chain from there on. Only visited slices are embedded: SAM's cost grows
with the target's extent, not the volume's.

Pure: images and prompts in, masks out; no files, Ray or MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from scipy import ndimage

from ..config import PropagationConfig, SamConfig
from ..models.sam_backends import ImageEmbedding, PromptableSegmenter
from ..ops.postprocess import binarise
from ..prompts.from_mask import bounding_box
from ..prompts.types import SlicePrompts
from .sam import merged_probability, prompt_arrays


@dataclass
class Decoded:
    """One slice's mask, SAM's mean IoU estimate over its prompts, and its low-resolution logits."""

    mask: np.ndarray
    score: float
    logits: torch.Tensor | None


@dataclass
class Propagated:
    """Masks of the slices the chains kept; the slices SAM ran on; why each chain ended."""

    masks: dict[int, np.ndarray] = field(default_factory=dict)
    visited: list[int] = field(default_factory=list)
    ends: dict[tuple[int, int], str] = field(default_factory=dict)  # (key slice, direction) -> reason
    seconds: dict[str, float] = field(default_factory=lambda: {"embed": 0.0, "decode": 0.0})


def owners(n_slices: int, keys: Sequence[int]) -> np.ndarray:
    """For each slice, the key slice whose chain decides it: the nearest (a tie to the lower one)."""
    ordered = np.asarray(sorted(keys))
    index = np.arange(n_slices)[:, None]
    return ordered[np.argmin(np.abs(index - ordered[None, :]), axis=1)]


def carried_prompts(previous: np.ndarray, settings: PropagationConfig) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Boxes ``N x 4`` (one per component of ``previous`` of at least ``min_component`` pixels, each side
    moved out by ``box_margin`` of its size) and, with ``points``, one point each ``N x 1 x 2`` at the
    component's innermost pixel; None when nothing is left to carry."""
    labels, count = ndimage.label(previous, structure=np.ones((3, 3)))
    boxes, points = [], []
    for component in range(1, count + 1):
        region = labels == component
        if region.sum() < settings.min_component:
            continue
        tight = bounding_box(region, 0.0, min_size=1.0)
        width, height = tight[2] - tight[0], tight[3] - tight[1]
        grow = np.array([-width, -height, width, height]) * settings.box_margin
        h, w = previous.shape
        boxes.append(np.clip(tight + grow, 0.0, [w - 1, h - 1, w - 1, h - 1]))
        if settings.points:
            inside = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
            y, x = np.unravel_index(int(np.argmax(inside)), inside.shape)
            points.append([[float(x), float(y)]])
    if not boxes:
        return None
    return np.asarray(boxes, dtype=np.float64), (np.asarray(points) if settings.points else None)


def overlap(mask: np.ndarray, previous: np.ndarray) -> float:
    """|mask & previous| / the smaller area: 1 for a mask nested in the previous one, or around it."""
    smaller = min(int(mask.sum()), int(previous.sum()))
    return float(np.logical_and(mask, previous).sum()) / smaller if smaller else 0.0


def contrast(image: np.ndarray, mask: np.ndarray, ring: int) -> float:
    """The mask's mean grey level less that of the ``ring`` pixels around it (0 for an empty mask)."""
    grey = image[..., 0] if image.ndim == 3 else image
    around = ndimage.binary_dilation(mask, iterations=ring) & ~mask
    if not mask.any() or not around.any():
        return 0.0
    return float(grey[mask].mean()) - float(grey[around].mean())


def stop_reason(decoded: Decoded, previous: np.ndarray, settings: PropagationConfig,
                relative_contrast: float = 1.0) -> str:
    """Why a slice's mask ends its chain ("" when it does not). ``relative_contrast``: the mask's
    contrast with its surroundings as a share of the key slice's (SAM past the target's end still
    outlines something in the carried box, but no longer something that stands out as the target did)."""
    area = int(decoded.mask.sum())
    if area < settings.min_area:
        return "empty"
    if decoded.score < settings.min_score:
        return "score"
    if overlap(decoded.mask, previous) < settings.min_overlap:
        return "overlap"
    if area > settings.max_growth * previous.sum():
        return "growth"
    if relative_contrast < settings.min_contrast:
        return "contrast"
    return ""


def _decode(segmenter: PromptableSegmenter, embedding: ImageEmbedding, boxes: np.ndarray | None,
            points: np.ndarray | None, labels: np.ndarray | None, sam: SamConfig,
            mask_input: torch.Tensor | None = None) -> Decoded:
    """Each prompt decoded (candidates merged), the union binarised; the logits kept for the next slice."""
    n = len(boxes) if boxes is not None else len(points)
    dense = None if mask_input is None else mask_input.expand(n, -1, -1, -1)
    probs, scores, logits = segmenter.decode_with_logits(embedding, boxes, points, labels, sam.multimask, dense)
    mask = binarise(merged_probability(probs, scores, sam), sam.threshold, sam.keep_components)
    best = logits[torch.arange(n), torch.as_tensor(scores.argmax(axis=1))]  # each prompt's likeliest candidate
    return Decoded(mask, float(scores.max(axis=1).mean()), best.max(dim=0, keepdim=True).values[:, None])


def decode_given(segmenter: PromptableSegmenter, embedding: ImageEmbedding, prompts: SlicePrompts,
                 sam: SamConfig) -> Decoded:
    """A key slice under its given prompts, decoded as ``segment.sam`` decodes them."""
    return _decode(segmenter, embedding, *prompt_arrays(prompts), sam)


def propagate(segmenter: PromptableSegmenter, images: Sequence[np.ndarray], keys: dict[int, SlicePrompts],
              sam: SamConfig, settings: PropagationConfig, absent: frozenset[int] = frozenset()) -> Propagated:
    """Masks for the slices the chains from ``keys`` (slice index -> prompts) reach; ``images`` are a
    volume's ``H x W x 3`` slices in order. With ``settings.stop_at_absent``, a chain ends before a
    slice of ``absent`` (where text mode's saliency found no target) without embedding it."""
    out = Propagated()
    stops = absent if settings.stop_at_absent else frozenset()
    keys = {k: p for k, p in keys.items() if not p.is_empty()}
    if not keys:
        return out
    owner = owners(len(images), list(keys))

    def embed(index: int) -> ImageEmbedding:
        start = time.perf_counter()
        embedding = segmenter.embed([images[index]])[0]
        out.visited.append(index)
        out.seconds["embed"] += time.perf_counter() - start
        return embedding

    def timed(step: Callable[[], Decoded]) -> Decoded:
        start = time.perf_counter()
        decoded = step()
        out.seconds["decode"] += time.perf_counter() - start
        return decoded

    for key in sorted(keys):
        embedding = embed(key)
        seed = timed(partial(decode_given, segmenter, embedding, keys[key], sam))
        if seed.mask.sum() < settings.min_area:
            out.ends[(key, 0)] = "empty"
            continue
        out.masks[key] = seed.mask
        reference = contrast(images[key], seed.mask, settings.contrast_ring)
        for direction in (-1, 1):
            out.ends[(key, direction)] = _chain(segmenter, images, key, direction, seed, reference, owner, embed,
                                                timed, sam, settings, out.masks, stops)
    return out


def _chain(segmenter: PromptableSegmenter, images: Sequence[np.ndarray], key: int, direction: int, seed: Decoded,
           reference: float, owner: np.ndarray, embed: Callable[[int], ImageEmbedding],
           timed: Callable[[Callable[[], Decoded]], Decoded], sam: SamConfig, settings: PropagationConfig,
           masks: dict[int, np.ndarray], absent: frozenset[int]) -> str:
    """One direction of a key slice's chain; returns why it ended ("edge", "territory", "absent" or a
    stop reason)."""
    previous, index = seed, key + direction
    while True:
        if not 0 <= index < len(images):
            return "edge"
        if owner[index] != key:
            return "territory"
        if index in absent:
            return "absent"
        carried = carried_prompts(previous.mask, settings)
        if carried is None:
            return "empty"
        boxes, points = carried
        labels = None if points is None else np.ones(points.shape[:2], dtype=np.int64)
        dense = previous.logits if settings.mask_prompt else None
        embedding = embed(index)
        decoded = timed(partial(_decode, segmenter, embedding, boxes, points, labels, sam, dense))
        # a key slice whose mask hardly stands out (under one grey level) gives the contrast check nothing
        relative = contrast(images[index], decoded.mask, settings.contrast_ring) / reference \
            if abs(reference) >= 1.0 else 1.0
        reason = stop_reason(decoded, previous.mask, settings, relative)
        if reason:
            return reason
        masks[index] = decoded.mask
        previous, index = decoded, index + direction
