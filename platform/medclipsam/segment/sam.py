"""Prompted segmentation of 2D images: embed once, decode every prompt, merge, binarise.

Pure stage functions: arrays in, arrays out; no files, Ray or MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from ..config import SamConfig
from ..models.sam_backends import PromptableSegmenter
from ..ops.merge import merge_candidates
from ..ops.postprocess import binarise
from ..prompts.types import SlicePrompts


def prompt_arrays(prompts: SlicePrompts) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The decoder's boxes ``N x 4``, points ``N x P x 2`` and labels ``N x P`` for a slice's prompts:
    each box with all points (the points repeated per box); with no box, the points as one prompt."""
    points = labels = None
    if len(prompts.points):
        points, labels = prompts.points[None], prompts.labels[None]
    if not len(prompts.boxes):
        return None, points, labels
    n = len(prompts.boxes)
    if points is not None:
        points, labels = np.repeat(points, n, axis=0), np.repeat(labels, n, axis=0)
    return prompts.boxes, points, labels


def merged_probability(probs: np.ndarray, scores: np.ndarray, params: SamConfig) -> np.ndarray:
    """``H x W``: each prompt's candidates merged, the prompts' union by max."""
    merged = [merge_candidates(p, s, params.merge, params.threshold) for p, s in zip(probs, scores, strict=True)]
    return np.max(np.stack(merged), axis=0)


def probability_for_prompts(
    segmenter: PromptableSegmenter, embedding, prompts: SlicePrompts, params: SamConfig
) -> np.ndarray:
    """``H x W`` foreground probability: each box (with all points) decoded, candidates merged, union by max."""
    probs, scores = segmenter.decode(embedding, *prompt_arrays(prompts), params.multimask)
    return merged_probability(probs, scores, params)


def segment_prompt_sets(
    segmenter: PromptableSegmenter,
    images: Sequence[np.ndarray],
    prompt_sets: Sequence[Sequence[SlicePrompts]],
    params: SamConfig | None = None,
) -> tuple[list[list[np.ndarray]], dict[str, float]]:
    """Binary masks for several prompt sets per image (e.g. from saliency and from the truth), each
    image embedded once: ``masks[k][i]`` is image ``i`` under ``prompt_sets[k][i]``.

    Returns the masks and the seconds spent embedding and decoding.
    """
    for prompts in prompt_sets:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompt sets")
    params = params or SamConfig()
    start = time.perf_counter()
    prompted = [i for i in range(len(images))  # only these need the encoder
                if any(not prompts[i].is_empty() for prompts in prompt_sets)]
    per_call = params.images_per_call(str(segmenter.device))
    embeddings = dict(zip(prompted, segmenter.embed([images[i] for i in prompted], per_call), strict=True))
    embedded = time.perf_counter()
    masks: list[list[np.ndarray]] = []
    for prompts in prompt_sets:
        masks.append([])
        for index, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            if index not in embeddings or prompt.is_empty():
                masks[-1].append(np.zeros(image.shape[:2], dtype=bool))
                continue
            prob = probability_for_prompts(segmenter, embeddings[index], prompt, params)
            masks[-1].append(binarise(prob, params.threshold, params.keep_components))
    done = time.perf_counter()
    return masks, {"embed": embedded - start, "decode": done - embedded}


def segment_images(
    segmenter: PromptableSegmenter,
    images: Sequence[np.ndarray],
    prompts: Sequence[SlicePrompts],
    params: SamConfig | None = None,
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Binary masks (``H x W`` bool) for ``H x W x 3`` uint8 images, one prompt set each.

    Returns the masks and the seconds spent embedding and decoding.
    """
    masks, seconds = segment_prompt_sets(segmenter, images, [prompts], params)
    return masks[0], seconds
