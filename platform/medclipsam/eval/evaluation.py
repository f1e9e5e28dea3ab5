"""Scoring predicted masks against ground truth, paired by case_id (never by listing order)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..domain.images import MedicalImage, read_mask
from ..domain.inputs import list_cases
from ..errors import InputError
from ..storage.access import reading
from .metrics import CaseMetrics, case_metrics, summarise

DEFAULT_TOLERANCE = 2.0  # pixels for 2D images, millimetres for volumes
GEOMETRY_CHECKS = ("warn", "fail", "ignore")  # what a prediction whose geometry differs from its truth gets


@dataclass
class EvaluationRow:
    case_id: str
    pred_uri: str
    gt_uri: str
    dsc: float = float("nan")
    nsd: float = float("nan")
    hd95: float = float("nan")
    tolerance: float = DEFAULT_TOLERANCE
    status: str = "ok"
    error: str = ""
    warning: str = ""  # e.g. the prediction's spacing differs from the truth's (scored voxel by voxel anyway)


def score_mask(pred: np.ndarray, pred_uri: str, truth: MedicalImage, tolerance: float) -> CaseMetrics:
    """Metrics of a predicted mask against a ground truth read with ``read_mask`` (its spacing for volumes)."""
    if pred.shape != truth.array.shape:
        raise InputError(
            f"{pred_uri}: shape {pred.shape} does not match ground truth {truth.uri} shape {truth.array.shape}"
        )
    spacing = truth.spacing_array_order if truth.is_volume else (1.0, 1.0)
    return case_metrics(pred > 0, truth.array, tolerance, spacing)


def geometry_mismatch(pred: MedicalImage, truth: MedicalImage) -> str:
    """How the prediction's spacing, origin or direction differs from the truth's ('' if they agree).

    Masks are compared voxel by voxel, so a mask written on another grid scores as if it were on
    the truth's: worth a word, or a failure, rather than silence."""
    for name in ("spacing", "origin", "direction"):
        a, b = getattr(pred, name), getattr(truth, name)
        if len(a) != len(b) or not np.allclose(a, b, rtol=1e-4, atol=1e-4):
            shown = [tuple(round(float(v), 4) for v in x) for x in (a, b)]
            return f"{name} {shown[0]} differs from the ground truth's {shown[1]}"
    return ""


def evaluate_case(case_id: str, pred_uri: str, gt_uri: str, tolerance: float, geometry: str = "warn",
                  gt_segment: str | None = None) -> EvaluationRow:
    row = EvaluationRow(case_id, pred_uri, gt_uri, tolerance=tolerance)
    try:
        pred = read_mask(pred_uri)
        truth = read_mask(gt_uri, like=pred, segment=gt_segment)  # a SEG truth is laid onto the prediction's grid
        mismatch = geometry_mismatch(pred, truth) if geometry != "ignore" else ""
        if mismatch and geometry == "fail":
            row.status, row.error = "error", f"{pred_uri}: {mismatch}"
            return row
        row.warning = f"{pred_uri}: {mismatch}" if mismatch else ""
        metrics = score_mask(pred.array, pred_uri, truth, tolerance)
        row.dsc, row.nsd, row.hd95 = metrics.dsc, metrics.nsd, metrics.hd95
    except Exception as exc:  # recorded per case so the rest are still scored
        row.status, row.error = "error", str(exc)
    return row


def evaluate(pred: str, gt: str, tolerance: float = DEFAULT_TOLERANCE, geometry: str = "warn",
             gt_segment: str | None = None) -> tuple[list[EvaluationRow], dict[str, float]]:
    """Score every predicted case that has a ground truth of the same case_id.

    Returns the per-case rows and a summary (means over scored cases; HD95 over finite values).
    Cases present on only one side are listed with status ``missing_gt`` / ``missing_pred``.
    ``geometry``: a prediction whose spacing, origin or direction differs from its truth's gets a
    warning (``warn``), fails (``fail``) or passes unremarked (``ignore``).
    """
    if not tolerance > 0:
        raise InputError(f"the NSD tolerance must be above 0 (got {tolerance})")
    if geometry not in GEOMETRY_CHECKS:
        raise InputError(f"geometry check must be one of {', '.join(GEOMETRY_CHECKS)}")
    with reading(pred, "predictions folder"):
        predictions = list_cases(pred)
    with reading(gt, "ground-truth folder"):
        truths = list_cases(gt)
    rows: list[EvaluationRow] = []
    for case_id in sorted(set(predictions) | set(truths)):
        if case_id not in truths:
            rows.append(EvaluationRow(case_id, predictions[case_id], "", status="missing_gt",
                                      error=f"no ground truth for case '{case_id}' under {gt}"))
        elif case_id not in predictions:
            rows.append(EvaluationRow(case_id, "", truths[case_id], status="missing_pred",
                                      error=f"no prediction for case '{case_id}' under {pred}"))
        else:
            rows.append(evaluate_case(case_id, predictions[case_id], truths[case_id], tolerance, geometry,
                                      gt_segment))
    scored = [r for r in rows if r.status == "ok"]
    summary = {
        "n_scored": float(len(scored)),
        "dsc": float(np.mean([r.dsc for r in scored])) if scored else float("nan"),
        "nsd": float(np.mean([r.nsd for r in scored])) if scored else float("nan"),
        "hd95": summarise([r.hd95 for r in scored]),
    }
    return rows, summary


def write_table(rows: list[EvaluationRow], uri: str) -> None:
    """Per-case metrics as Parquet (``.parquet``) or CSV (anything else)."""
    table = pa.Table.from_pylist([r.__dict__ for r in rows])
    buffer = io.BytesIO()
    if uri.endswith(".parquet"):
        pq.write_table(table, buffer)
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, buffer)
    storage.write_bytes_atomic(uri, buffer.getvalue())
