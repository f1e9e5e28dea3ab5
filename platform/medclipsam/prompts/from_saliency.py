"""Saliency map -> coarse mask -> visual prompts for SAM."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..config import CoarseMaskConfig, VisualPromptConfig
from ..ops.postprocess import keep_largest_components
from .from_mask import bounding_box
from .types import SlicePrompts

COARSE_METHODS = ("kmeans", "threshold", "crf")
PROMPT_TYPES = ("box", "boxes", "points", "box_points")


def kmeans_foreground(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """Two-cluster k-means on the saliency values; the cluster with the higher centre is foreground."""
    from sklearn.cluster import KMeans

    flat = values.reshape(-1, 1).astype(np.float64)
    if np.ptp(flat) == 0:
        return np.zeros(values.shape, dtype=bool)
    km = KMeans(n_clusters=2, n_init=3, random_state=seed).fit(flat)
    foreground = int(np.argmax(km.cluster_centers_.ravel()))
    return (km.labels_ == foreground).reshape(values.shape)


def crf_foreground(values: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Dense CRF refinement of the saliency map (optional extra: pydensecrf2)."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as exc:
        raise ImportError(
            "coarse mask method 'crf' needs the optional extra: pip install 'medclipsam[crf]' (pydensecrf2)"
        ) from exc
    h, w = values.shape
    probs = np.stack([1.0 - values, values]).astype(np.float32).clip(1e-5, 1.0)
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(unary_from_softmax(probs))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=50, srgb=13, rgbim=np.ascontiguousarray(image), compat=10)
    return np.argmax(np.array(crf.inference(5)).reshape(2, h, w), axis=0).astype(bool)


def coarse_mask(
    saliency: np.ndarray,
    method: str = "kmeans",
    threshold: float = 0.5,
    keep_components: int = 1,
    seed: int = 0,
    image: np.ndarray | None = None,
) -> np.ndarray:
    """Binary coarse mask of the salient structure, keeping the K largest components."""
    if method == "kmeans":
        mask = kmeans_foreground(saliency, seed)
    elif method == "threshold":
        mask = saliency > threshold
    elif method == "crf":
        if image is None:
            raise ValueError("the crf method needs the image")
        mask = crf_foreground(saliency, image)
    else:
        raise ValueError(f"unknown coarse mask method '{method}'; choose from {', '.join(COARSE_METHODS)}")
    return keep_largest_components(mask, keep_components)


def _sample(coords: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if len(coords) == 0 or n <= 0:
        return np.zeros((0, 2))
    picked = rng.choice(len(coords), size=min(n, len(coords)), replace=False)
    return coords[np.sort(picked)][:, ::-1].astype(np.float64)  # (row, col) -> (x, y)


def visual_prompts(
    mask: np.ndarray, kind: str = "box", n_points: int = 5, n_negative: int = 0, seed: int = 0
) -> SlicePrompts | None:
    """SAM prompts from a coarse mask; None when the mask is empty (no target)."""
    if kind not in PROMPT_TYPES:
        raise ValueError(f"unknown prompt type '{kind}'; choose from {', '.join(PROMPT_TYPES)}")
    if not mask.any():
        return None
    prompts = SlicePrompts()
    if kind in ("box", "box_points"):
        prompts.boxes = bounding_box(mask, min_size=1.0)[None]
    elif kind == "boxes":
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        prompts.boxes = np.stack([bounding_box(labels == i, min_size=1.0) for i in range(1, count + 1)])
    if kind in ("points", "box_points"):
        rng = np.random.default_rng(seed)
        positive = _sample(np.argwhere(mask), n_points, rng)
        negative = _sample(np.argwhere(~mask), n_negative, rng)
        prompts.points = np.concatenate([positive, negative])
        prompts.labels = np.concatenate([np.ones(len(positive), np.int64), np.zeros(len(negative), np.int64)])
    return prompts


def prompts_from_saliency(
    image: np.ndarray, saliency: np.ndarray | None, coarse: CoarseMaskConfig, visual: VisualPromptConfig
) -> tuple[np.ndarray, SlicePrompts]:
    """The coarse mask and SAM prompts of one ``H x W x 3`` image from its saliency map.

    ``saliency`` is None where M2IB gave no contrast at all: an empty mask and no prompts, as
    where the coarse mask finds nothing.
    """
    mask = np.zeros(image.shape[:2], dtype=bool)
    if saliency is not None:
        mask = coarse_mask(saliency, coarse.method, coarse.threshold, coarse.keep_components, visual.seed, image)
    found = visual_prompts(mask, visual.type, visual.n_points, visual.n_negative, visual.seed)
    return mask, found if found is not None else SlicePrompts()
