"""A case as slice rows (``SliceRow``), and the read stage that makes them.

A case becomes one row per 2D slice (a 2D image is one row, ``slice = -1``); the model stages
(``stages``) fill in their fields; ``assembly`` puts a case's rows back together. A failure is
recorded in the row's ``error`` and the row travels on untouched, so one bad case never stops a
batch. The single-process runner and the Ray runner call exactly these functions, on these
objects; only Ray's boundary turns them into plain columns (``SliceRow.to_columns``).

This module and ``assembly`` load no model code (no torch): Ray's read and write tasks import
them, and a task's memory is taken from the model actors.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

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


@dataclass(frozen=True)
class Geometry:
    """Where a case's pixels lie: what a mask needs to be written back in place."""

    is_volume: bool
    shape: tuple[int, ...]  # the source array's shape (``H x W[ x C]`` or ``Z x Y x X``)
    axis: int  # the axis a volume is sliced along
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: MedicalImage, axis: int) -> Geometry:
        return cls(image.is_volume, tuple(image.array.shape), axis, tuple(image.spacing), tuple(image.origin),
                   tuple(image.direction))

    def reference_image(self) -> MedicalImage:
        """A stand-in for the source image that carries its geometry but no pixels (for ``write_mask``)."""
        pixels = np.broadcast_to(np.zeros((), dtype=np.uint8), self.shape)
        return MedicalImage(pixels, self.is_volume, self.spacing, self.origin, self.direction)

    def to_json(self) -> str:
        return json.dumps({"is_volume": self.is_volume, "shape": list(self.shape), "axis": self.axis,
                           "spacing": list(self.spacing), "origin": list(self.origin),
                           "direction": list(self.direction)})

    @classmethod
    def from_json(cls, text: str) -> Geometry:
        g = json.loads(text)
        return cls(bool(g["is_volume"]), tuple(int(v) for v in g["shape"]), int(g["axis"]), tuple(g["spacing"]),
                   tuple(g["origin"]), tuple(g["direction"]))


@dataclass
class SliceRow:
    """One 2D slice of a case on its way through the stages; each stage fills in its fields.

    Arrays are ``H x W`` planes of the slice (empty, ``0 x 0``, where a stage has not run, dropped
    them, or the row failed).
    """

    # -- the case, from its CaseTask
    case_id: str
    uri: str  # the source image
    gt_uri: str = ""  # its ground truth ("" for none)
    sentences: tuple[str, ...] = ()  # the text prompts M2IB reads (text mode)
    overlay: bool = False  # keep the picture for the case's overlay
    # -- the read stage (slices.case_slices)
    slice: int = -1  # index along the slicing axis; -1 for a 2D image
    n_slices: int = 1  # slices of the case: its last one in completes the case
    geometry: Geometry | None = None  # None where the case could not be read
    # ``H x W x 3`` uint8, windowed; dropped after SAM unless drawn
    image: np.ndarray = field(default_factory=lambda: NO_IMAGE)
    error: str = ""  # why this row failed ("" while it has not); it then travels on untouched
    seconds_read: float = 0.0  # this slice's share of reading the case
    prompts: SlicePrompts | None = None  # SAM's prompts (from labels, files or saliency); None for none
    oracle_prompts: SlicePrompts | None = None  # the label's boxes, for stage attribution
    # -- saliency, and prompts from it (stages.add_saliency, add_text_prompts; text mode)
    # M2IB map in [0, 1], float32; empty where constant or not kept
    saliency: np.ndarray = field(default_factory=lambda: NO_MAP)
    coarse: np.ndarray = field(default_factory=lambda: NO_MASK)  # the coarse mask (bool), when kept
    seconds_saliency: float = 0.0
    m2ib_ran: bool = False  # M2IB ran on this slice (text mode; propagated: the sampled slices only)
    # propagated text mode, a sampled slice: how clearly the target stands out in its map
    # (``prompts.key_slices.presence``); NaN where its coarse mask gave no prompts, or not sampled
    presence: float = math.nan
    clip_model: str = ""  # the CLIP model's URI and weights' SHA-256
    clip_sha256: str = ""
    # -- SAM (stages.add_masks)
    # SAM's mask (bool); all False where the slice had no prompts
    mask: np.ndarray = field(default_factory=lambda: NO_MASK)
    # SAM prompted with ``oracle_prompts`` (attribution only)
    oracle_mask: np.ndarray = field(default_factory=lambda: NO_MASK)
    seconds_embed: float = 0.0
    seconds_decode: float = 0.0
    sam_ran: bool = False  # SAM's image encoder ran on this slice
    backend: str = ""  # the SAM backend, its checkpoint and the checkpoint's SHA-256
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    node: str = ""  # the Ray node whose SAM actor ran on it ("" in-process)

    @property
    def key(self) -> int | None:
        """The slice's key in a case's planes (None for a 2D image), as ``ops.slicing`` takes them."""
        return None if self.slice < 0 else self.slice

    @property
    def text_prompt(self) -> str:
        """The sentences as the case record keeps them (JSON; "" for none)."""
        return json.dumps(list(self.sentences)) if self.sentences else ""

    def to_columns(self) -> dict[str, Any]:
        """Plain values (Ray Data's columns, a staged slice's meta): arrays as they are; geometry,
        prompts and sentences as JSON text ("" for none)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["geometry"] = self.geometry.to_json() if self.geometry is not None else ""
        out["prompts"], out["oracle_prompts"] = _prompts_text(self.prompts), _prompts_text(self.oracle_prompts)
        out["sentences"] = json.dumps(list(self.sentences))
        return out

    @classmethod
    def from_columns(cls, columns: Mapping[str, Any]) -> SliceRow:
        """The inverse of ``to_columns``; numpy scalars become Python values, absent columns their defaults."""
        values = {}
        for name, value in columns.items():
            if name in _DECODE:
                values[name] = _DECODE[name](value.item() if isinstance(value, np.generic) else value)
        return cls(**values)


ARRAY_FIELDS = ("image", "saliency", "coarse", "mask", "oracle_mask")


def _prompts_text(prompts: SlicePrompts | None) -> str:
    """Exact JSON of prompts (every float's shortest repr), so a row decodes to the same numbers."""
    if prompts is None:
        return ""
    return json.dumps({"boxes": prompts.boxes.tolist(), "points": prompts.points.tolist(),
                       "labels": prompts.labels.tolist()})


def _prompts_of(text: str) -> SlicePrompts | None:
    return SlicePrompts.from_record(json.loads(text)) if text else None


_DECODE: dict[str, Any] = {
    **dict.fromkeys(("case_id", "uri", "gt_uri", "error", "clip_model", "clip_sha256", "backend", "checkpoint",
                     "checkpoint_sha256", "node"), str),
    **dict.fromkeys(("slice", "n_slices"), int),
    **dict.fromkeys(("seconds_read", "seconds_saliency", "seconds_embed", "seconds_decode", "presence"), float),
    **dict.fromkeys(ARRAY_FIELDS, lambda v: v),
    **dict.fromkeys(("overlay", "sam_ran", "m2ib_ran"), bool),
    "sentences": lambda text: tuple(json.loads(text)) if text else (),
    "geometry": lambda text: Geometry.from_json(text) if text else None,
    "prompts": _prompts_of,
    "oracle_prompts": _prompts_of,
}


def row_prompts(prompts: SlicePrompts | None) -> SlicePrompts | None:
    """Prompts as a row carries them: None for none; float64 boxes and points, int64 labels, at the
    precision ``SlicePrompts.to_record(precise=True)`` gives (what stages have always exchanged, so
    masks and records stay bit for bit those of earlier runs)."""
    if prompts is None or prompts.is_empty():
        return None
    return SlicePrompts.from_record(prompts.to_record(precise=True))


def _prompts_from_rows(text: str, image: MedicalImage, axis: int) -> dict[int | None, SlicePrompts]:
    data = json.loads(text) if text else {"boxes": [], "points": []}
    grouped: tuple[dict, dict] = (defaultdict(list), defaultdict(list))
    for kind, by_slice in zip(("boxes", "points"), grouped, strict=True):
        for source, line, case_id, index, values in data[kind]:
            by_slice[index].append(PromptRow(source, line, case_id, index, tuple(values)))
    return prompts_for_case(grouped[0], grouped[1], image.array.shape, image.is_volume, axis)


def _case_row(task: CaseTask, **values) -> SliceRow:
    sentences = tuple(json.loads(task.prompt)) if task.prompt else ()
    return SliceRow(task.case_id, task.uri, task.gt_uri, sentences, task.overlay, **values)


def failed_read(task: CaseTask, error: str, seconds: float = 0.0) -> SliceRow:
    """The one row of a case that could not be read: it flows through the stages as an error."""
    return _case_row(task, error=error, seconds_read=seconds)


def _given_prompts(task: CaseTask, image: MedicalImage, source: str, settings: ImageConfig,
                   box_margin: float, key_slices: int = 0) -> dict[int | None, SlicePrompts]:
    """The prompts a case brings with it: boxes from its labels, or rows of the prompt files."""
    if source == SOURCE_FILES:
        return _prompts_from_rows(task.prompt_rows, image, settings.axis)
    if source != SOURCE_LABELS:
        return {}
    if not task.gt_uri:
        raise ValueError("box prompts from labels need a ground truth (gt_uri) for this case")
    label = read_mask(task.gt_uri, like=image)
    expected = image.array.shape if image.is_volume else image.array.shape[:2]
    if label.array.shape != expected:
        raise ValueError(f"ground truth {task.gt_uri} has shape {label.array.shape}, image {expected}")
    return label_boxes(label, settings.axis, box_margin, key_slices)


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


def case_slices(task: CaseTask, settings: ImageConfig, source: str, box_margin: float = 2.0,
                oracle: bool = False, key_slices: int = 0) -> list[SliceRow]:
    """Read a case and cut it into windowed ``H x W x 3`` slices; one error row if it cannot be read.

    With ``source`` labels or files, the slices' SAM prompts are attached here. With ``oracle``
    (stage attribution), the boxes of the case's labels travel beside them as ``oracle_prompts``.
    ``key_slices`` N > 0 gives the labels' boxes on the N slices of largest truth area only.
    """
    start = time.perf_counter()
    try:
        image = read_image(task.uri)
        keys = slice_keys(image, settings.axis)
        prompts = _given_prompts(task, image, source, settings, box_margin, key_slices)
        truth_boxes = _truth_boxes(task, image, settings, box_margin) if oracle and task.gt_uri else {}
        inputs = model_inputs(image, keys, settings)
        geometry = Geometry.of(image, settings.axis)
    except Exception as exc:  # recorded in the row: the case ends as an error row of the manifest
        return [failed_read(task, str(exc), time.perf_counter() - start)]
    share = (time.perf_counter() - start) / len(keys)
    return [_case_row(task, slice=-1 if key is None else key, n_slices=len(keys), geometry=geometry, image=pixels,
                      seconds_read=share, prompts=row_prompts(prompts.get(key)),
                      oracle_prompts=row_prompts(truth_boxes.get(key)))
            for key, pixels in zip(keys, inputs, strict=True)]
