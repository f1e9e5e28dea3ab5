"""Merging SAM's multimask output (K candidate masks per prompt) into one probability map."""

from __future__ import annotations

import numpy as np

from ..config import MERGE_METHODS


def merge_candidates(probs: np.ndarray, scores: np.ndarray, method: str = "mean", threshold: float = 0.5) -> np.ndarray:
    """``K x H x W`` probabilities and ``K`` IoU scores -> ``H x W`` probabilities.

    mean: plain average; weighted: average weighted by the (clipped, non-negative) scores;
    staple: SimpleITK's STAPLE estimate from the K thresholded masks.
    """
    if probs.ndim != 3:
        raise ValueError(f"expected K x H x W candidates, got shape {probs.shape}")
    if probs.shape[0] == 1:
        return probs[0]
    if method == "mean":
        return probs.mean(axis=0)
    if method == "weighted":
        weights = np.clip(np.asarray(scores, dtype=np.float64), 0.0, None)
        if weights.sum() <= 0:
            weights = np.ones_like(weights)
        return np.tensordot(weights / weights.sum(), probs, axes=1).astype(probs.dtype)
    if method == "staple":
        import SimpleITK as sitk

        binaries = [(p > threshold).astype(np.uint8) for p in probs]
        if not any(b.any() for b in binaries):
            return np.zeros(probs.shape[1:], dtype=probs.dtype)
        images = [sitk.GetImageFromArray(b) for b in binaries]
        estimate = sitk.STAPLE(images, 1.0)
        return sitk.GetArrayFromImage(estimate).astype(probs.dtype)
    raise ValueError(f"unknown merge method '{method}'; choose from {', '.join(MERGE_METHODS)}")
