"""Warnings a case's record carries: masks a user would call failures although SAM ran.

A case whose prompts its backend handles poorly (points alone on a model trained with boxes), or
whose mask fills little of a prompt box, still gets its mask and status ``ok``; the warnings say
why it deserves a look, in the manifest's ``warnings`` column and the command's summary.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import SAM_BACKENDS
from ..domain.records import WARNING_SEPARATOR
from ..prompts.types import SlicePrompts

POINTS_ONLY = "points only"
SMALL_MASK = "small mask"
SEPARATOR = WARNING_SEPARATOR


def _where(key: int | None) -> str:
    return "" if key is None else f" on slice {key}"


def box_fill(mask: np.ndarray, box) -> float:
    """The fraction of a box's pixels (x0, y0, x1, y1; the pixels it covers) that the mask fills."""
    height, width = mask.shape
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    if x1 <= x0 or y1 <= y0:
        return 0.0
    return float(mask[y0:y1, x0:x1].mean())


def case_warnings(prompts: dict[int | None, SlicePrompts], masks: dict[int | None, np.ndarray], backend: str,
                  min_box_fill: float) -> list[str]:
    """Each warning a sentence starting with its kind (``POINTS_ONLY``, ``SMALL_MASK``), slices in order;
    none holds ``SEPARATOR``, which joins them in the record."""
    found: list[str] = []
    spec = SAM_BACKENDS.get(backend)
    points_only = [k for k, p in prompts.items() if len(p.points) and not len(p.boxes)]
    if spec is not None and spec.boxes_only and points_only:
        slices = "" if points_only == [None] else f" on {len(points_only)} slice(s)"
        found.append(f"{POINTS_ONLY}{slices}: {backend} was trained with box prompts, so points alone give poor "
                     "masks: give boxes")
    for key, slice_prompts in prompts.items():
        for box in slice_prompts.boxes:
            fill = box_fill(masks[key], box)
            if fill < min_box_fill:
                found.append(f"{SMALL_MASK}{_where(key)}: the mask fills {fill:.1%} of its prompt box "
                             f"({', '.join(f'{v:g}' for v in box)}), under {min_box_fill:.0%}")
    return found


def summary(warnings_by_case: dict[str, str], shown: int = 3) -> list[str]:
    """One line per kind of warning over a run's cases: how many, which, and the first one's words."""
    kinds: dict[str, list[tuple[str, str]]] = {}
    for case_id, text in sorted(warnings_by_case.items()):
        for warning in filter(None, text.split(SEPARATOR)):
            kind = warning.split(":", 1)[0].split(" on ")[0]
            cases = kinds.setdefault(kind, [])
            if not cases or cases[-1][0] != case_id:
                cases.append((case_id, warning))
    lines = []
    for kind, cases in sorted(kinds.items()):
        names = ", ".join(c for c, _ in cases[:shown]) + (f" and {len(cases) - shown} more" if len(cases) > shown
                                                            else "")
        lines.append(f"{len(cases)} case(s) with a {kind} warning ({names}); {cases[0][0]}: {cases[0][1]}")
    return lines
