"""nnU-Net's planning and preprocessing of an exported dataset, through its Python API: the
fingerprint with nnU-Net's own integrity check, the default planner, the 2d configuration."""

from __future__ import annotations

from ..errors import InputError
from .nnunet_env import CONFIGURATION


def plan_and_preprocess(dataset_id: int, processes: int = 1) -> str:
    """What ``nnUNetv2_plan_and_preprocess -d ID -c 2d --verify_dataset_integrity`` does; returns
    the plans identifier. Runs inside ``nnunet_environment``."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    try:
        extract_fingerprints([dataset_id], num_processes=processes, check_dataset_integrity=True, clean=True,
                             verbose=False, show_progress_bar=False)
    except (AssertionError, RuntimeError) as exc:
        raise InputError(f"nnU-Net's dataset integrity check failed: {exc}") from exc
    plans = plan_experiments([dataset_id])
    preprocess([dataset_id], plans, configurations=[CONFIGURATION], num_processes=[processes], verbose=False,
               show_progress_bar=False)
    return plans
