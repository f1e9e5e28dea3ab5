"""Text mode on a volume with propagation: which slices M2IB reads, where the target is, which seed.

M2IB is the expensive step of text mode (an optimisation per slice), and a chain needs prompts on
one slice only. So M2IB runs on a sparse, evenly spaced subset of the slices (``sampled_slices``);
each sampled slice's map says how clearly the target stands out there (``presence``); the
``count`` sampled slices where it stands out most become the key slices the chains start from
(``strongest``), and a chain may end at a sampled slice where it does not stand out at all.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def sampled_slices(n_slices: int, every: int) -> list[int]:
    """``max(1, n_slices // every)`` slices ``every`` apart, centred in the volume (so never more than
    one slice in ``every``, and the margins, where a target is least likely, are sampled least); a
    volume shorter than ``every``: its middle slice."""
    if n_slices <= 0:
        return []
    count = max(1, n_slices // every)
    start = (n_slices - 1 - (count - 1) * every) // 2
    return list(range(start, start + count * every, every))


def presence(saliency: np.ndarray | None, coarse: np.ndarray) -> float:
    """How clearly the coarse mask's region stands out in the saliency map: the map's mean inside the
    mask less its mean outside (maps are in [0, 1]; 0 for a constant map or an empty or full mask)."""
    if saliency is None or not saliency.size or not coarse.any() or coarse.all():
        return 0.0
    return float(saliency[coarse].mean()) - float(saliency[~coarse].mean())


def strongest(scores: Mapping[int, float], count: int, min_presence: float) -> list[int]:
    """The ``count`` slices of highest presence at or above ``min_presence`` (a tie to the lower
    slice), in slice order; ``scores`` holds the sampled slices whose coarse mask gave prompts."""
    present = [(-score, index) for index, score in scores.items() if score >= min_presence]
    return sorted(index for _, index in sorted(present)[:count])
