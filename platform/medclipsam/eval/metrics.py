"""Overlap and surface metrics per case, with the method's conventions for empty masks.

DSC is computed directly. NSD and HD95 follow MONAI's definitions (``compute_surface_dice`` and
``compute_hausdorff_distance`` without sub-voxel areas): a mask's boundary is the mask minus its
face-connected erosion (outside the image counts as background), and each boundary voxel's
distance is the exact Euclidean distance, in physical units, to the nearest boundary voxel of the
other mask. They are computed with scipy alone, so the pipeline's write tasks score cases without
loading torch or MONAI; the tests hold the values equal to MONAI's. Spacing is in array axis order:
tolerances and distances are pixels for 2D images of unit spacing, millimetres for volumes.

Empty masks: both empty -> DSC 1, NSD 1, HD95 0; exactly one empty -> DSC 0, NSD 0, HD95 inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import KDTree


@dataclass(frozen=True)
class CaseMetrics:
    dsc: float
    nsd: float
    hd95: float


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice similarity coefficient of two binary masks (1.0 when both are empty)."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * float(np.logical_and(pred, truth).sum()) / total


def _boundary_points(mask: np.ndarray, origin: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    edges = mask & ~ndimage.binary_erosion(mask, border_value=0)
    return (np.argwhere(edges) + origin) * spacing


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each boundary voxel of ``pred`` to ``truth``'s boundary, and back.

    Both masks must be non-empty. Only the bounding box of their union (plus one voxel) is
    looked at, which changes no boundary: erosion treats the outside as background either way.
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    scale = np.ones(pred.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if scale.shape != (pred.ndim,):
        raise ValueError(f"spacing {tuple(spacing or ())} does not have one value per axis of {pred.shape}")
    union = np.argwhere(pred | truth)
    low, high = np.maximum(union.min(axis=0) - 1, 0), union.max(axis=0) + 2
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))
    pred_points = _boundary_points(pred[box], low, scale)
    truth_points = _boundary_points(truth[box], low, scale)
    to_truth = KDTree(truth_points, leafsize=32).query(pred_points, k=1)[0]
    to_pred = KDTree(pred_points, leafsize=32).query(truth_points, k=1)[0]
    return to_truth.astype(np.float32), to_pred.astype(np.float32)


def _nsd(to_truth: np.ndarray, to_pred: np.ndarray, tolerance: float) -> float:
    within = int((to_truth <= tolerance).sum()) + int((to_pred <= tolerance).sum())
    return within / (len(to_truth) + len(to_pred))


def _hd95(to_truth: np.ndarray, to_pred: np.ndarray) -> float:
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


def normalized_surface_dice(
    pred: np.ndarray, truth: np.ndarray, tolerance: float, spacing: Sequence[float] | None = None
) -> float:
    """Fraction of both boundaries lying within ``tolerance`` of the other boundary."""
    return case_metrics(pred, truth, tolerance, spacing).nsd


def hausdorff95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile Hausdorff distance: the larger of the two directed 95th percentiles."""
    return case_metrics(pred, truth, 0.0, spacing).hd95


def case_metrics(
    pred: np.ndarray, truth: np.ndarray, tolerance: float = 2.0, spacing: Sequence[float] | None = None
) -> CaseMetrics:
    """DSC, NSD at ``tolerance`` and HD95 for one case; ``spacing`` in array axis order."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {truth.shape}")
    p_any, t_any = bool(pred.any()), bool(truth.any())
    if not p_any and not t_any:
        return CaseMetrics(1.0, 1.0, 0.0)
    if p_any != t_any:
        return CaseMetrics(0.0, 0.0, math.inf)
    to_truth, to_pred = surface_distances(pred, truth, spacing)
    return CaseMetrics(dice(pred, truth), _nsd(to_truth, to_pred, tolerance), _hd95(to_truth, to_pred))


def summarise(values: Sequence[float]) -> float:
    """Mean over finite values (HD95 is infinite where one mask is empty); NaN when none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan
