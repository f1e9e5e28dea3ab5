"""The model stages on slice rows: M2IB saliency, prompts from saliency, SAM masks.

Each fills in fields of the rows made by ``slices.case_slices`` and records a failure in the
row's ``error`` instead of raising. The single-process runner, the Ray actors and the tuner's
trials call exactly these functions; they are the only pipeline steps that need torch.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from ..config import CoarseMaskConfig, PropagationConfig, SaliencyConfig, SamConfig, VisualPromptConfig
from ..models.biomedclip import ClipModel
from ..models.sam_backends import PromptableSegmenter
from ..prompts.from_saliency import prompts_from_saliency
from ..prompts.key_slices import presence, sampled_slices, strongest
from ..prompts.types import SlicePrompts
from ..saliency.maps import saliency_maps
from ..segment.propagate import propagate
from ..segment.sam import segment_prompt_sets
from .slices import NO_IMAGE, NO_MAP, NO_MASK, SliceRow, row_prompts


def add_saliency(clip: ClipModel, rows: list[SliceRow], settings: SaliencyConfig) -> list[SliceRow]:
    """M2IB saliency for every readable row; rows sharing their sentences are optimised as one batch."""
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        row.saliency, row.seconds_saliency, row.clip_model, row.clip_sha256 = NO_MAP, 0.0, clip.uri, clip.sha256
        if not row.error:
            groups[row.sentences].append(index)
            row.m2ib_ran = True
    for sentences, members in groups.items():
        start = time.perf_counter()
        try:
            maps = saliency_maps(clip, [rows[i].image for i in members], list(sentences), settings)
        except Exception as exc:  # e.g. out of memory: the rows carry the error on
            for i in members:
                rows[i].error = f"saliency: {exc}"
            continue
        share = (time.perf_counter() - start) / len(members)
        for i, saliency in zip(members, maps, strict=True):
            rows[i].saliency = saliency.values if not saliency.constant else NO_MAP
            rows[i].seconds_saliency = share
    return rows


def add_text_prompts(rows: list[SliceRow], coarse: CoarseMaskConfig, visual: VisualPromptConfig,
                     keep_saliency: bool = False, keep_coarse: bool = False) -> list[SliceRow]:
    """SAM prompts from each row's saliency map (coarse mask, components, boxes/points).

    Constant maps travel as an empty array: no coarse mask, no prompts.
    """
    for row in rows:
        row.coarse = NO_MASK
        if not row.error:
            values = row.saliency if row.saliency.size else None
            mask, found = prompts_from_saliency(row.image, values, coarse, visual)
            row.prompts = row_prompts(found)
            if keep_coarse:
                row.coarse = mask
        if not keep_saliency:
            row.saliency = NO_MAP
    return rows


def add_key_slice_prompts(clip: ClipModel, rows: list[SliceRow], saliency: SaliencyConfig, coarse: CoarseMaskConfig,
                          visual: VisualPromptConfig, settings: PropagationConfig, keep_saliency: bool = False,
                          keep_coarse: bool = False) -> list[SliceRow]:
    """Text mode for a volume to propagate: M2IB on the sampled slices only, each one's presence, and
    prompts on the ``text_keys`` where the target stands out most (``prompts.key_slices``); a 2D
    image or a failed case goes through the slice-wise text stages. Rows come back in slice order."""
    if len(rows) == 1 or any(row.error for row in rows):
        return add_text_prompts(add_saliency(clip, rows, saliency), coarse, visual, keep_saliency, keep_coarse)
    ordered = sorted(rows, key=lambda row: row.slice)
    for row in ordered:
        row.clip_model, row.clip_sha256 = clip.uri, clip.sha256
    positions = sampled_slices(len(ordered), settings.text_every)
    sampled = add_text_prompts(add_saliency(clip, [ordered[p] for p in positions], saliency), coarse, visual,
                               keep_saliency=True, keep_coarse=True)
    scores = {}
    for position, row in zip(positions, sampled, strict=True):
        if row.prompts is not None:
            row.presence = scores[position] = presence(row.saliency if row.saliency.size else None, row.coarse)
    keys = set(strongest(scores, settings.text_keys, settings.min_presence))
    for position, row in zip(positions, sampled, strict=True):
        row.prompts = row.prompts if position in keys else None
        row.saliency = row.saliency if keep_saliency else NO_MAP
        row.coarse = row.coarse if keep_coarse else NO_MASK
    return ordered


def absent_slices(rows: list[SliceRow], settings: PropagationConfig) -> frozenset[int]:
    """Positions of the sampled rows where the target was not seen: no prompts from their map, or a
    presence under ``min_presence`` (NaN compares false: not seen)."""
    return frozenset(position for position, row in enumerate(rows)
                     if row.m2ib_ran and not row.presence >= settings.min_presence)


def add_masks(segmenter: PromptableSegmenter, rows: list[SliceRow], settings: SamConfig,
              attribution: bool = False) -> list[SliceRow]:
    """SAM masks for the prompted rows (others get an empty mask); images are dropped unless drawn.

    With ``attribution``, every row also gets ``oracle_mask``: SAM prompted with its label's boxes
    (``oracle_prompts``; an empty mask where the label has none), from the same image embedding.
    When SAM fails on several rows at once, each is tried alone, so the error lands on the rows
    that cause it.
    """
    todo = [i for i, row in enumerate(rows)
            if not row.error and (row.prompts is not None or (attribution and row.oracle_prompts is not None))]
    seconds = {"embed": 0.0, "decode": 0.0}
    masks: list[list[np.ndarray]] = [[], []]
    try:
        if todo:
            sets = [[rows[i].prompts or SlicePrompts() for i in todo]]
            if attribution:
                sets.append([rows[i].oracle_prompts or SlicePrompts() for i in todo])
            masks, seconds = segment_prompt_sets(segmenter, [rows[i].image for i in todo], sets, settings)
    except Exception as exc:
        if len(todo) > 1:  # one image that SAM cannot take must not fail the others of its call
            return [row for one in rows for row in add_masks(segmenter, [one], settings, attribution)]
        for i in todo:
            rows[i].error = f"SAM: {exc}"
        todo, masks = [], [[], []]
    found = dict(zip(todo, masks[0], strict=True))
    oracle = dict(zip(todo, masks[1], strict=True)) if attribution and todo else {}
    for index, row in enumerate(rows):
        empty = np.zeros(row.image.shape[:2], dtype=bool) if not row.error else NO_MASK
        row.mask = found[index] if index in found and row.prompts is not None else empty
        row.oracle_mask = oracle.get(index, empty) if attribution else NO_MASK
        row.seconds_embed = seconds["embed"] / len(todo) if index in found else 0.0
        row.seconds_decode = seconds["decode"] / len(todo) if index in found else 0.0
        row.sam_ran = index in found
        _finished(row, segmenter)
    return rows


def _finished(row: SliceRow, segmenter: PromptableSegmenter) -> None:
    row.backend, row.checkpoint = segmenter.name, segmenter.checkpoint
    row.checkpoint_sha256 = segmenter.checkpoint_sha256
    if not row.overlay:
        row.image = NO_IMAGE


def add_propagated_masks(segmenter: PromptableSegmenter, rows: list[SliceRow], sam: SamConfig,
                         settings: PropagationConfig) -> list[SliceRow]:
    """SAM masks for every row of one case: a volume's along the chains from its prompted slices
    (``segment.propagate``), a 2D image's as ``add_masks`` does. A failure fails every row."""
    if len(rows) == 1 or any(row.error for row in rows):
        return add_masks(segmenter, rows, sam)
    ordered = sorted(rows, key=lambda row: row.slice)
    keys = {position: row.prompts for position, row in enumerate(ordered) if row.prompts is not None}
    try:
        result = propagate(segmenter, [row.image for row in ordered], keys, sam, settings,
                           absent_slices(ordered, settings))
    except Exception as exc:
        for row in ordered:
            row.error = f"SAM (propagation): {exc}"
        return ordered
    visited = set(result.visited)
    share = {k: v / max(len(visited), 1) for k, v in result.seconds.items()}
    for position, row in enumerate(ordered):
        row.mask = result.masks.get(position, np.zeros(row.image.shape[:2], dtype=bool))
        row.sam_ran = position in visited
        row.seconds_embed, row.seconds_decode = (share["embed"], share["decode"]) if row.sam_ran else (0.0, 0.0)
        _finished(row, segmenter)
    return ordered
