"""Box/point-prompted segmentation of a set of cases, in one process.

read case -> window the prompted slices -> SAM -> re-stack -> write mask -> manifest row.
A failing case becomes an ``error`` row; the other cases go on.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from . import storage
from .case_loop import Progress, record_failure, run_cases
from .errors import MedClipSamError
from .images import MedicalImage, mask_extension, read_image, write_mask
from .inputs import list_cases
from .manifest import STATUS_NO_PROMPTS, STATUS_OK, CaseRecord
from .models.sam_backends import PromptableSegmenter
from .prompts.csv_prompts import (
    CasePromptRows,
    check_case_ids,
    group_by_case,
    prompts_for_case,
    read_box_rows,
    read_point_rows,
)
from .prompts.types import SlicePrompts
from .segmentation import SegmentationParams, segment_images
from .slicing import Window, take_slice, to_rgb, window_to_uint8


@dataclass(frozen=True)
class SliceSpec:
    axis: int = 0
    window: Window = Window()


def model_inputs(image: MedicalImage, keys: list[int | None], spec: SliceSpec) -> list[np.ndarray]:
    """``H x W x 3`` uint8 inputs for the given slice indices (None: the 2D image itself)."""
    if not image.is_volume:
        return [to_rgb(window_to_uint8(image.array, spec.window)) for _ in keys]
    return [to_rgb(window_to_uint8(take_slice(image.array, k, spec.axis), spec.window)) for k in keys]


def assemble_mask(image: MedicalImage, masks: dict[int | None, np.ndarray], axis: int) -> np.ndarray:
    """Full-size mask: prompted slices from ``masks``, empty elsewhere."""
    if not image.is_volume:
        return masks.get(None, np.zeros(image.array.shape[:2], dtype=bool))
    out = np.zeros(image.array.shape, dtype=np.uint8)
    for index, mask in masks.items():
        selector = [slice(None)] * 3
        selector[axis] = index
        out[tuple(selector)] = mask
    return out


def segment_case(
    segmenter: PromptableSegmenter,
    image: MedicalImage,
    prompts: dict[int | None, SlicePrompts],
    spec: SliceSpec,
    params: SegmentationParams,
) -> tuple[np.ndarray, dict[str, float]]:
    """The mask of one case (same shape as the image's pixel grid) and the seconds per stage."""
    keys = sorted((k for k, p in prompts.items() if not p.is_empty()), key=_slice_order)
    inputs = model_inputs(image, keys, spec)
    masks, seconds = segment_images(segmenter, inputs, [prompts[k] for k in keys], params)
    return assemble_mask(image, dict(zip(keys, masks, strict=True)), spec.axis), seconds


def _slice_order(key: int | None) -> int:
    return -1 if key is None else key


def prompt_record(prompts: dict[int | None, SlicePrompts]) -> str:
    """JSON of the prompts per slice ("" for a 2D image), as recorded in the manifest."""
    ordered = sorted(prompts.items(), key=lambda item: _slice_order(item[0]))
    return json.dumps({("" if k is None else str(k)): p.to_record() for k, p in ordered})


def run_case(
    segmenter: PromptableSegmenter,
    case_id: str,
    uri: str,
    rows: tuple[CasePromptRows, CasePromptRows],
    output: str,
    spec: SliceSpec,
    params: SegmentationParams,
) -> CaseRecord:
    record = CaseRecord(
        case_id=case_id, source_uri=uri, backend=segmenter.name,
        checkpoint=segmenter.checkpoint, checkpoint_sha256=segmenter.checkpoint_sha256,
    )
    try:
        t0 = time.perf_counter()
        image = read_image(uri)
        if image.is_volume and not 0 <= spec.axis <= 2:
            raise MedClipSamError(f"slicing axis {spec.axis} is not 0, 1 or 2")
        record.seconds_read = time.perf_counter() - t0
        prompts = prompts_for_case(rows[0], rows[1], image.array.shape, image.is_volume, spec.axis)
        record.prompts = prompt_record(prompts)
        record.n_prompted_slices = sum(not p.is_empty() for p in prompts.values())
        mask, seconds = segment_case(segmenter, image, prompts, spec, params)
        record.seconds_embed, record.seconds_decode = seconds["embed"], seconds["decode"]
        t1 = time.perf_counter()
        record.mask_uri = storage.join(output, "masks", case_id + mask_extension(image))
        write_mask(mask, image, record.mask_uri)
        record.seconds_write = time.perf_counter() - t1
        record.status = STATUS_OK if record.n_prompted_slices else STATUS_NO_PROMPTS
    except Exception as exc:  # one bad case must not stop the cohort; its error goes in the manifest
        record_failure(record, exc)
    return record


@dataclass(frozen=True)
class PromptedPlan:
    """The cases of a run and their prompt rows, checked before any model is loaded."""

    cases: dict[str, str]
    rows: dict[str, tuple[CasePromptRows, CasePromptRows]]


def plan_prompted(input_uri: str, boxes_csv: str | None = None, points_csv: str | None = None) -> PromptedPlan:
    """List the inputs and read the prompt CSVs; every prompt row must name an input case."""
    cases = list_cases(input_uri)
    box_rows = read_box_rows(boxes_csv) if boxes_csv else []
    point_rows = read_point_rows(points_csv) if points_csv else []
    check_case_ids(box_rows, point_rows, set(cases))
    return PromptedPlan(cases, group_by_case(box_rows, point_rows))


def absolute_output(output: str) -> str:
    """Local output folders as absolute paths, so the manifest's mask URIs stand on their own."""
    return output if storage.is_remote(output) else os.path.abspath(output.removeprefix("file://"))


def run_prompted(
    segmenter: PromptableSegmenter,
    plan: PromptedPlan,
    output: str,
    spec: SliceSpec = SliceSpec(),
    params: SegmentationParams = SegmentationParams(),
    progress: Progress | None = None,
) -> list[CaseRecord]:
    """Segment every planned case with its prompts; write masks and the manifest."""
    output = absolute_output(output)

    def run_one(case_id: str, uri: str) -> CaseRecord:
        return run_case(segmenter, case_id, uri, plan.rows.get(case_id, ({}, {})), output, spec, params)

    return run_cases(plan.cases, run_one, output, progress)
