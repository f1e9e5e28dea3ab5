"""The model stages on slice rows: M2IB saliency, prompts from saliency, SAM masks.

Each adds columns to the rows made by ``slices.case_slices`` and records a failure in the row's
``error`` column instead of raising. The single-process runner and the Ray actors call exactly
these functions; they are the only pipeline steps that need torch.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import numpy as np

from ..config import CoarseMaskConfig, SaliencyConfig, SamConfig, VisualPromptConfig
from ..models.biomedclip import ClipModel
from ..models.sam_backends import PromptableSegmenter
from ..prompts.from_saliency import prompts_from_saliency
from ..prompts.types import SlicePrompts
from ..saliency.maps import saliency_maps
from ..segment.sam import segment_prompt_sets
from .slices import NO_IMAGE, NO_MAP, NO_MASK, Row


def add_saliency(clip: ClipModel, rows: list[Row], settings: SaliencyConfig) -> list[Row]:
    """M2IB saliency for every readable row; rows sharing a prompt are optimised as one batch."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        row.update(saliency=NO_MAP, seconds_saliency=0.0, clip_model=clip.uri, clip_sha256=clip.sha256)
        if not row["error"]:
            groups[row["prompt"]].append(index)
    for prompt, members in groups.items():
        start = time.perf_counter()
        try:
            maps = saliency_maps(clip, [rows[i]["image"] for i in members], json.loads(prompt), settings)
        except Exception as exc:  # e.g. out of memory: the rows carry the error on
            for i in members:
                rows[i]["error"] = f"saliency: {exc}"
            continue
        share = (time.perf_counter() - start) / len(members)
        for i, saliency in zip(members, maps, strict=True):
            rows[i]["saliency"] = saliency.values if not saliency.constant else NO_MAP
            rows[i]["seconds_saliency"] = share
    return rows


def add_text_prompts(rows: list[Row], coarse: CoarseMaskConfig, visual: VisualPromptConfig,
                     keep_saliency: bool = False, keep_coarse: bool = False) -> list[Row]:
    """SAM prompts from each row's saliency map (coarse mask, components, boxes/points).

    Constant maps travel as an empty array: no coarse mask, no prompts.
    """
    for row in rows:
        row["coarse"] = NO_MASK
        if not row["error"]:
            values = row["saliency"] if row["saliency"].size else None
            mask, found = prompts_from_saliency(row["image"], values, coarse, visual)
            row["prompts"] = "" if found.is_empty() else json.dumps(found.to_record(precise=True))
            if keep_coarse:
                row["coarse"] = mask
        if not keep_saliency:
            row["saliency"] = NO_MAP
    return rows


def add_masks(segmenter: PromptableSegmenter, rows: list[Row], settings: SamConfig,
              attribution: bool = False) -> list[Row]:
    """SAM masks for the prompted rows (others get an empty mask); images are dropped unless drawn.

    With ``attribution``, every row also gets ``oracle_mask``: SAM prompted with its label's boxes
    (``oracle_prompts``; an empty mask where the label has none), from the same image embedding.
    """
    def prompts_of(row: Row, column: str) -> SlicePrompts:
        text = row.get(column, "")
        return SlicePrompts.from_record(json.loads(text)) if text else SlicePrompts()

    todo = [i for i, row in enumerate(rows)
            if not row["error"] and (row["prompts"] or (attribution and row.get("oracle_prompts")))]
    seconds = {"embed": 0.0, "decode": 0.0}
    masks: list[list[np.ndarray]] = [[], []]
    try:
        if todo:
            sets = [[prompts_of(rows[i], "prompts") for i in todo]]
            if attribution:
                sets.append([prompts_of(rows[i], "oracle_prompts") for i in todo])
            masks, seconds = segment_prompt_sets(segmenter, [rows[i]["image"] for i in todo], sets, settings)
    except Exception as exc:
        for i in todo:
            rows[i]["error"] = f"SAM: {exc}"
        todo, masks = [], [[], []]
    found = dict(zip(todo, masks[0], strict=True))
    oracle = dict(zip(todo, masks[1], strict=True)) if attribution and todo else {}
    for index, row in enumerate(rows):
        shape = row["image"].shape[:2]
        empty = np.zeros(shape, dtype=bool) if not row["error"] else NO_MASK
        row["mask"] = found[index] if index in found and row["prompts"] else empty
        row["oracle_mask"] = oracle.get(index, empty) if attribution else NO_MASK
        row["seconds_embed"] = seconds["embed"] / len(todo) if index in found else 0.0
        row["seconds_decode"] = seconds["decode"] / len(todo) if index in found else 0.0
        row.update(backend=segmenter.name, checkpoint=segmenter.checkpoint,
                   checkpoint_sha256=segmenter.checkpoint_sha256)
        if not row["overlay"]:
            row["image"] = NO_IMAGE
    return rows
