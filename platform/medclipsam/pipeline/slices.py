"""A case as slice rows (plain dicts): the columns, and the read stage that makes them.

A case becomes one row per 2D slice (a 2D image is one row, ``slice = -1``); the model stages
(``stages``) add columns; ``assembly`` puts a case's rows back together. A failure is recorded in
the row's ``error`` column and the row travels on untouched, so one bad case never stops a batch.
The single-process runner and the Ray runner call exactly these functions.

This module and ``assembly`` load no model code (no torch): Ray's read and write tasks import
them, and a task's memory is taken from the model actors.

Columns: case_id, uri, gt_uri, prompt (JSON list of sentences, text mode), slice, n_slices,
geometry (JSON), overlay (keep the picture for an overlay), image (``H x W x 3`` uint8), error,
seconds_read, prompts (JSON of the slice's SAM prompts, "" for none), oracle_prompts (the label's
boxes, for stage attribution, "" for none); then saliency (``H x W``
float32), coarse (``H x W`` bool), seconds_saliency, clip_model, clip_sha256 (text mode); then
mask (``H x W`` bool), seconds_embed, seconds_decode, backend, checkpoint, checkpoint_sha256.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..config import ImageConfig
from ..domain.images import MedicalImage, read_image, read_mask
from ..errors import StorageUnavailable
from ..ops.slicing import model_inputs, slice_keys
from ..prompts.csv_prompts import PromptRow, prompts_for_case
from ..prompts.from_mask import label_boxes
from ..prompts.types import SlicePrompts

SOURCE_TEXT = "text"  # prompts from M2IB saliency of the text prompts (zero-shot)
SOURCE_LABELS = "labels"  # box prompts from the ground-truth labels (oracle)
SOURCE_FILES = "files"  # box/point prompts from CSV files
SOURCES = (SOURCE_TEXT, SOURCE_LABELS, SOURCE_FILES)
NO_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)
NO_MAP = np.zeros((0, 0), dtype=np.float32)
NO_MASK = np.zeros((0, 0), dtype=bool)

Row = dict


@dataclass(frozen=True)
class CaseTask:
    """One case as the first stage receives it (plain values, so it travels through Ray Data)."""

    case_id: str
    uri: str
    gt_uri: str = ""
    prompt: str = ""  # JSON list of sentences (text mode)
    overlay: bool = False  # keep the pictures for an overlay
    prompt_rows: str = ""  # JSON: {"boxes": [...], "points": [...]} CSV rows of this case (files mode)


def rows_to_json(boxes: list[PromptRow], points: list[PromptRow]) -> str:
    """A case's prompt CSV rows as ``CaseTask.prompt_rows``."""
    def plain(rows: list[PromptRow]) -> list[list]:
        return [[r.source, r.line, r.case_id, r.slice_index, list(r.values)] for r in rows]

    return json.dumps({"boxes": plain(boxes), "points": plain(points)})


def _prompts_from_rows(text: str, image: MedicalImage, axis: int) -> dict[int | None, SlicePrompts]:
    data = json.loads(text) if text else {"boxes": [], "points": []}
    grouped: tuple[dict, dict] = (defaultdict(list), defaultdict(list))
    for kind, by_slice in zip(("boxes", "points"), grouped, strict=True):
        for source, line, case_id, index, values in data[kind]:
            by_slice[index].append(PromptRow(source, line, case_id, index, tuple(values)))
    return prompts_for_case(grouped[0], grouped[1], image.array.shape, image.is_volume, axis)


def geometry_of(image: MedicalImage, axis: int) -> str:
    return json.dumps({"is_volume": image.is_volume, "shape": list(image.array.shape), "axis": axis,
                       "spacing": list(image.spacing), "origin": list(image.origin),
                       "direction": list(image.direction)})


def reference_image(geometry: str) -> MedicalImage:
    """A stand-in for the source image that carries its geometry but no pixels (for ``write_mask``)."""
    g = json.loads(geometry)
    pixels = np.broadcast_to(np.zeros((), dtype=np.uint8), tuple(g["shape"]))
    return MedicalImage(pixels, g["is_volume"], tuple(g["spacing"]), tuple(g["origin"]), tuple(g["direction"]))


def _base_row(task: CaseTask) -> Row:
    return {"case_id": task.case_id, "uri": task.uri, "gt_uri": task.gt_uri, "prompt": task.prompt,
            "slice": -1, "n_slices": 1, "geometry": "", "overlay": task.overlay, "image": NO_IMAGE,
            "error": "", "seconds_read": 0.0, "prompts": "", "oracle_prompts": ""}


def failed_read(task: CaseTask, error: str, seconds: float = 0.0) -> Row:
    """The one row of a case that could not be read: it flows through the stages as an error."""
    return {**_base_row(task), "error": error, "seconds_read": seconds}


def _given_prompts(task: CaseTask, image: MedicalImage, source: str, settings: ImageConfig,
                   box_margin: float) -> dict[int | None, SlicePrompts]:
    """The prompts a case brings with it: boxes from its labels, or rows of the prompt files."""
    if source == SOURCE_FILES:
        return _prompts_from_rows(task.prompt_rows, image, settings.axis)
    if source != SOURCE_LABELS:
        return {}
    if not task.gt_uri:
        raise ValueError("box prompts from labels need a ground truth (gt_uri) for this case")
    label = read_mask(task.gt_uri)
    expected = image.array.shape if image.is_volume else image.array.shape[:2]
    if label.array.shape != expected:
        raise ValueError(f"ground truth {task.gt_uri} has shape {label.array.shape}, image {expected}")
    return label_boxes(label, settings.axis, box_margin)


def _truth_boxes(task: CaseTask, image: MedicalImage, settings: ImageConfig,
                 box_margin: float) -> dict[int | None, SlicePrompts]:
    """The label's boxes for stage attribution; a truth that cannot be used costs only the
    attribution (assembly reports the truth's problem when it scores the case)."""
    try:
        return _given_prompts(task, image, SOURCE_LABELS, settings, box_margin)
    except StorageUnavailable:  # not the truth's fault: the case fails, and a resume redoes it
        raise
    except Exception:
        return {}


def _prompt_json(prompt: SlicePrompts | None) -> str:
    return "" if prompt is None or prompt.is_empty() else json.dumps(prompt.to_record(precise=True))


def case_slices(task: CaseTask, settings: ImageConfig, source: str, box_margin: float = 2.0,
                oracle: bool = False) -> list[Row]:
    """Read a case and cut it into windowed ``H x W x 3`` slices; one error row if it cannot be read.

    With ``source`` labels or files, the slices' SAM prompts are attached here. With ``oracle``
    (stage attribution), the boxes of the case's labels travel beside them as ``oracle_prompts``.
    """
    start = time.perf_counter()
    try:
        image = read_image(task.uri)
        keys = slice_keys(image, settings.axis)
        prompts = _given_prompts(task, image, source, settings, box_margin)
        truth_boxes = _truth_boxes(task, image, settings, box_margin) if oracle and task.gt_uri else {}
        inputs = model_inputs(image, keys, settings)
        geometry = geometry_of(image, settings.axis)
    except Exception as exc:  # recorded in the row: the case ends as an error row of the manifest
        return [failed_read(task, str(exc), time.perf_counter() - start)]
    share = (time.perf_counter() - start) / len(keys)
    rows = []
    for key, pixels in zip(keys, inputs, strict=True):
        rows.append({**_base_row(task), "slice": -1 if key is None else key, "n_slices": len(keys),
                     "geometry": geometry, "image": pixels, "seconds_read": share,
                     "prompts": _prompt_json(prompts.get(key)), "oracle_prompts": _prompt_json(truth_boxes.get(key))})
    return rows
