"""The README's demo: the sample volumes as a cohort, and box prompts taken from their labels.

The demo pseudo-labels the sample volumes text-driven, each with the prompts of the task config
that fits it. Where BiomedCLIP cannot be had, it runs the same pipeline with boxes from the labels:
those scores are an oracle-prompt upper bound for the SAM backend, not a zero-shot result.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from .config import load_config
from .images import MedicalImage, read_mask
from .inputs import list_cases
from .prompts.csv_prompts import BOX_COLUMNS
from .prompts.from_mask import bounding_box
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


# Which task config's prompts fit which sample volume (by case_id prefix).
SAMPLE_TASKS = {"brain": "brain_tumor_mri.yaml", "breast": "breast_mri.yaml", "lung": "lung_nodule_ct.yaml"}


def demo_cohort_csv(samples: Path, configs: Path) -> str:
    """A cohort manifest of the sample volumes: uri, gt_uri, and the fitting task config's prompts."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case_id", "uri", "gt_uri", "prompt"])
    labels = list_cases(str(samples / "labels"))
    for case_id, uri in list_cases(str(samples / "images")).items():
        task = next((name for prefix, name in SAMPLE_TASKS.items() if case_id.startswith(prefix)), None)
        prompts = load_config(configs / task).text.prompts if task else []
        writer.writerow([case_id, uri, labels.get(case_id, ""), json.dumps(prompts) if prompts else ""])
    return buffer.getvalue()
