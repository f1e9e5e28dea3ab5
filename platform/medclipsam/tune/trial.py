"""One trial: a point of the space scored on the labelled cases, with the runners' own stages.

The cases are read once (``slices.case_slices``); a trial gives copies of their rows the cached
saliency maps, turns them into coarse masks and prompts (``stages.add_text_prompts``), has the
SAM service decode them (``stages.add_masks``) and scores the assembled masks as a run scores
its cases (``assembly.case_mask``, ``eval.evaluation.score_mask``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ..config import TaskConfig
from ..domain.cohort import read_labelled_cohort
from ..domain.images import MedicalImage, read_mask
from ..errors import InputError
from ..eval.evaluation import score_mask
from ..eval.metrics import dice
from ..pipeline.assembly import case_mask
from ..pipeline.slices import NO_MAP, SOURCE_TEXT, CaseTask, SliceRow, case_slices
from ..pipeline.stages import add_text_prompts
from ..prompts.types import SlicePrompts
from .services import Key, row_key
from .space import trial_config

SCORES = ("dsc", "nsd", "dsc_coarse")


@dataclass(frozen=True)
class TuneCase:
    """A labelled case as every trial scores it."""

    case_id: str
    rows: list[SliceRow]  # its slices, as the read stage made them
    truth: MedicalImage


def prepare_cases(config: TaskConfig, input_uri: str, gt_uri: str | None) -> list[TuneCase]:
    """The labelled cases read once, with their truths; unlabelled or unreadable ones are an error."""
    cases = []
    for case in read_labelled_cohort(input_uri, gt_uri, "tuning"):
        rows = case_slices(CaseTask(case.case_id, case.uri, case.gt_uri), config.image, SOURCE_TEXT)
        if rows[0].error:
            raise InputError(f"{case.uri}: {rows[0].error}")
        cases.append(TuneCase(case.case_id, rows, read_mask(case.gt_uri)))
    return cases


def slice_images(cases: list[TuneCase]) -> dict[Key, np.ndarray]:
    return {row_key(r): r.image for case in cases for r in case.rows}


def score_settings(config: TaskConfig, cases: list[TuneCase], maps: dict[Key, np.ndarray | None],
                   masks_for: Callable[[dict[Key, SlicePrompts | None]], dict[Key, np.ndarray]],
                   tolerance: float) -> dict[str, float]:
    """Mean DSC and NSD of the SAM masks (and DSC of the coarse masks) of ``cases`` under ``config``."""
    per_case = [[replace(r, saliency=NO_MAP if maps[row_key(r)] is None else maps[row_key(r)]) for r in case.rows]
                for case in cases]
    for rows in per_case:
        add_text_prompts(rows, config.coarse, config.visual_prompts, keep_coarse=True)
    masks = masks_for({row_key(r): r.prompts for rows in per_case for r in rows})
    dscs, nsds, coarse_dscs = [], [], []
    for case, rows in zip(cases, per_case, strict=True):
        for row in rows:
            row.mask = masks[row_key(row)]
        scores = score_mask(case_mask(rows) > 0, case.case_id, case.truth, tolerance)
        dscs.append(scores.dsc)
        nsds.append(scores.nsd)
        coarse_dscs.append(dice(case_mask(rows, "coarse") > 0, case.truth.array > 0))
    return {"dsc": float(np.mean(dscs)), "nsd": float(np.mean(nsds)), "dsc_coarse": float(np.mean(coarse_dscs))}


def run_trial(settings: dict, base: dict, cases: list[TuneCase], saliency, sam, tolerance: float,
              cache: bool) -> None:
    """A Ray Tune trial: the settings of one point of the space, scored; reported to Tune."""
    import ray
    from ray import tune

    config = trial_config(base, settings["settings"])
    keys = [row_key(r) for case in cases for r in case.rows]
    maps = ray.get(saliency.maps_for.remote(config.text.clip_model, config.saliency.model_dump(),
                                            list(config.text.prompts), keys, cache))
    sam_settings = config.sam.model_dump()
    scores = score_settings(config, cases, maps,
                            lambda prompts: ray.get(sam.masks_for.remote(prompts, sam_settings, cache)), tolerance)
    tune.report(scores)
