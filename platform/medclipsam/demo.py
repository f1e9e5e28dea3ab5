"""The README's demo: box-prompted LiteMedSAM on the sample volumes, boxes taken from the labels.

Boxes come from the ground truth, so the scores are an oracle-prompt upper bound for what the
text-driven path can reach with the same SAM backend, not a zero-shot result.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from . import storage
from .evaluation import EvaluationRow, evaluate
from .images import MedicalImage, read_mask
from .inputs import list_cases
from .manifest import CaseRecord
from .models.sam_backends import PromptableSegmenter
from .prompted_run import SliceSpec, plan_prompted, run_prompted
from .prompts.csv_prompts import BOX_COLUMNS
from .prompts.from_mask import bounding_box
from .samples import fetch_samples
from .segmentation import SegmentationParams
from .slicing import take_slice


def label_boxes(label: MedicalImage, axis: int = 0, margin: float = 0.0) -> list[tuple[int | None, np.ndarray]]:
    """(slice, box) for every labelled slice of a volume, or (None, box) for a labelled 2D image."""
    if not label.is_volume:
        box = bounding_box(label.array, margin, min_size=1.0)
        return [] if box is None else [(None, box)]
    out = []
    for index in range(label.array.shape[axis]):
        box = bounding_box(take_slice(label.array, index, axis), margin, min_size=1.0)
        if box is not None:
            out.append((index, box))
    return out


def oracle_boxes_csv(labels_uri: str, axis: int = 0, margin: float = 0.0) -> str:
    """A boxes CSV (``case_id,slice,x0,y0,x1,y1``) with one box per labelled slice of every label."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(BOX_COLUMNS)
    for case_id, uri in list_cases(labels_uri).items():
        for index, box in label_boxes(read_mask(uri), axis, margin):
            writer.writerow([case_id, "" if index is None else index, *(f"{v:g}" for v in box)])
    return buffer.getvalue()


def run_demo(
    segmenter: PromptableSegmenter,
    output: str,
    spec: SliceSpec = SliceSpec(),
    params: SegmentationParams = SegmentationParams(),
    box_margin: float = 2.0,
    samples: Path | None = None,
    progress=None,
) -> tuple[list[CaseRecord], list[EvaluationRow], dict[str, float]]:
    """Fetch the samples, segment them with label-derived boxes, and score the masks."""
    root = samples or fetch_samples()
    images, labels = str(Path(root) / "images"), str(Path(root) / "labels")
    boxes_uri = storage.join(output, "oracle_boxes.csv")
    storage.write_bytes_atomic(boxes_uri, oracle_boxes_csv(labels, spec.axis, box_margin).encode())
    plan = plan_prompted(images, boxes_csv=boxes_uri)
    records = run_prompted(segmenter, plan, output, spec=spec, params=params, progress=progress)
    rows, summary = evaluate(storage.join(output, "masks"), labels)
    return records, rows, summary
