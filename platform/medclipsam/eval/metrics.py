"""Overlap and surface metrics per case, with the method's conventions for empty masks.

DSC is computed directly; NSD and HD95 use MONAI's surface-distance implementations with the
image spacing (array axis order), so tolerances and distances are in physical units (pixels for
2D images of unit spacing, millimetres for volumes).

Empty masks: both empty -> DSC 1, NSD 1, HD95 0; exactly one empty -> DSC 0, NSD 0, HD95 inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


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


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(mask.astype(bool))[None, None]


def normalized_surface_dice(
    pred: np.ndarray, truth: np.ndarray, tolerance: float, spacing: Sequence[float] | None = None
) -> float:
    """Fraction of both boundaries lying within ``tolerance`` of the other boundary."""
    from monai.metrics import compute_surface_dice

    p_any, t_any = bool(pred.any()), bool(truth.any())
    if not p_any and not t_any:
        return 1.0
    if p_any != t_any:
        return 0.0
    value = compute_surface_dice(
        _one_hot(pred), _one_hot(truth), class_thresholds=[float(tolerance)], include_background=True,
        spacing=list(spacing) if spacing is not None else None,
    )
    return float(value.reshape(-1)[0])


def hausdorff95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile symmetric Hausdorff distance between the two boundaries."""
    from monai.metrics import compute_hausdorff_distance

    p_any, t_any = bool(pred.any()), bool(truth.any())
    if not p_any and not t_any:
        return 0.0
    if p_any != t_any:
        return math.inf
    value = compute_hausdorff_distance(
        _one_hot(pred), _one_hot(truth), include_background=True, percentile=95,
        spacing=list(spacing) if spacing is not None else None,
    )
    return float(value.reshape(-1)[0])


def case_metrics(
    pred: np.ndarray, truth: np.ndarray, tolerance: float = 2.0, spacing: Sequence[float] | None = None
) -> CaseMetrics:
    """DSC, NSD at ``tolerance`` and HD95 for one case; ``spacing`` in array axis order."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {truth.shape}")
    return CaseMetrics(
        dice(pred, truth),
        normalized_surface_dice(pred, truth, tolerance, spacing),
        hausdorff95(pred, truth, spacing),
    )


def summarise(values: Sequence[float]) -> float:
    """Mean over finite values (HD95 is infinite where one mask is empty); NaN when none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan
