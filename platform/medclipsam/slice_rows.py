"""The pseudo-labelling stages as functions on slice rows (plain dicts), free of Ray and MLflow.

A case becomes one row per 2D slice (a 2D image is one row, ``slice = -1``); each stage adds
columns; ``case_assembly`` puts a case's rows back together. A failure is recorded in the row's
``error`` column and the row travels on untouched, so one bad case never stops a batch.

Columns: case_id, uri, gt_uri, prompt (JSON list of sentences, text mode), slice, n_slices,
geometry (JSON), overlay (keep the picture for an overlay), image (``H x W x 3`` uint8), error,
seconds_read; then saliency (``H x W`` float32), seconds_saliency, clip_model, clip_sha256; then
prompts (JSON of the slice's SAM prompts, "" for none); then mask (``H x W`` bool),
seconds_embed, seconds_decode, backend, checkpoint, checkpoint_sha256.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .demo import label_boxes
from .images import MedicalImage, read_image, read_mask
from .models.biomedclip import ClipModel
from .models.sam_backends import PromptableSegmenter
from .prompted_run import SliceSpec, model_inputs
from .prompts.types import SlicePrompts
from .saliency.maps import SaliencyMap, saliency_maps
from .segmentation import SegmentationParams, segment_images
from .text_run import TextSettings, prompts_from_saliency

SOURCE_TEXT = "text"  # prompts from M2IB saliency of the text prompts
SOURCE_LABELS = "labels"  # box prompts from the ground-truth labels (oracle)
NO_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)
NO_MAP = np.zeros((0, 0), dtype=np.float32)
NO_MASK = np.zeros((0, 0), dtype=bool)

Row = dict


@dataclass(frozen=True)
class CaseTask:
    """One case as the pipeline's first stage receives it."""

    case_id: str
    uri: str
    gt_uri: str = ""
    prompt: str = ""  # JSON list of sentences
    overlay: bool = False


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
            "error": "", "seconds_read": 0.0, "prompts": ""}


def case_slices(task: CaseTask, spec: SliceSpec, source: str, box_margin: float = 2.0) -> list[Row]:
    """Read a case and cut it into windowed ``H x W x 3`` slices; one error row if it cannot be read.

    With ``source == "labels"`` the box prompts come from ``gt_uri`` here (one per labelled slice).
    """
    start = time.perf_counter()
    try:
        image = read_image(task.uri)
        keys: list[int | None] = list(range(image.array.shape[spec.axis])) if image.is_volume else [None]
        prompts: dict[int | None, SlicePrompts] = {}
        if source == SOURCE_LABELS:
            if not task.gt_uri:
                raise ValueError("box prompts from labels need a ground truth (gt_uri) for this case")
            label = read_mask(task.gt_uri)
            expected = image.array.shape if image.is_volume else image.array.shape[:2]
            if label.array.shape != expected:
                raise ValueError(f"ground truth {task.gt_uri} has shape {label.array.shape}, image {expected}")
            prompts = {k: SlicePrompts(boxes=box[None]) for k, box in label_boxes(label, spec.axis, box_margin)}
        inputs = model_inputs(image, keys, spec)
        geometry = geometry_of(image, spec.axis)
    except Exception as exc:  # recorded in the row: the case ends as an error row of the manifest
        return [{**_base_row(task), "error": str(exc), "seconds_read": time.perf_counter() - start}]
    share = (time.perf_counter() - start) / len(keys)
    rows = []
    for key, pixels in zip(keys, inputs, strict=True):
        prompt = prompts.get(key)
        rows.append({**_base_row(task), "slice": -1 if key is None else key, "n_slices": len(keys),
                     "geometry": geometry, "image": pixels, "seconds_read": share,
                     "prompts": json.dumps(prompt.to_record()) if prompt is not None else ""})
    return rows


def add_saliency(clip: ClipModel, rows: list[Row], settings: TextSettings) -> list[Row]:
    """M2IB saliency for every readable row; rows sharing a prompt are optimised as one batch."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        row.update(saliency=NO_MAP, seconds_saliency=0.0, clip_model=clip.uri, clip_sha256=clip.sha256)
        if not row["error"]:
            groups[row["prompt"] or json.dumps(list(settings.prompts))].append(index)
    for prompt, members in groups.items():
        start = time.perf_counter()
        try:
            maps = saliency_maps(clip, [rows[i]["image"] for i in members], json.loads(prompt), settings.m2ib,
                                 settings.geometry, settings.saliency_batch_size)
        except Exception as exc:  # e.g. out of memory: the rows carry the error on
            for i in members:
                rows[i]["error"] = f"saliency: {exc}"
            continue
        share = (time.perf_counter() - start) / len(members)
        for i, saliency in zip(members, maps, strict=True):
            rows[i]["saliency"] = saliency.values if not saliency.constant else NO_MAP
            rows[i]["seconds_saliency"] = share
    return rows


def add_text_prompts(rows: list[Row], settings: TextSettings, keep_saliency: bool = False) -> list[Row]:
    """SAM prompts from each row's saliency map (coarse mask, components, boxes/points)."""
    for row in rows:
        if not row["error"]:
            values, constant = row["saliency"], row["saliency"].size == 0  # constant maps travel as NO_MAP
            saliency = SaliencyMap(np.zeros(row["image"].shape[:2], np.float32) if constant else values, constant)
            _, (found,) = prompts_from_saliency([row["image"]], [saliency], settings)
            row["prompts"] = "" if found.is_empty() else json.dumps(found.to_record())
        if not keep_saliency:
            row["saliency"] = NO_MAP
    return rows


def add_masks(segmenter: PromptableSegmenter, rows: list[Row], params: SegmentationParams) -> list[Row]:
    """SAM masks for the prompted rows (others get an empty mask); images are dropped unless drawn."""
    todo = [i for i, row in enumerate(rows) if not row["error"] and row["prompts"]]
    seconds = {"embed": 0.0, "decode": 0.0}
    masks: list[np.ndarray] = []
    try:
        if todo:
            prompts = [SlicePrompts.from_record(json.loads(rows[i]["prompts"])) for i in todo]
            masks, seconds = segment_images(segmenter, [rows[i]["image"] for i in todo], prompts, params)
    except Exception as exc:
        for i in todo:
            rows[i]["error"] = f"SAM: {exc}"
        todo, masks = [], []
    found = dict(zip(todo, masks, strict=True))
    for index, row in enumerate(rows):
        shape = row["image"].shape[:2]
        row["mask"] = found.get(index, np.zeros(shape, dtype=bool) if not row["error"] else NO_MASK)
        row["seconds_embed"] = seconds["embed"] / len(todo) if index in found else 0.0
        row["seconds_decode"] = seconds["decode"] / len(todo) if index in found else 0.0
        row.update(backend=segmenter.name, checkpoint=segmenter.checkpoint,
                   checkpoint_sha256=segmenter.checkpoint_sha256)
        if not row["overlay"]:
            row["image"] = NO_IMAGE
    return rows
