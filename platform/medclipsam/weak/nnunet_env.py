"""nnU-Net's environment for one run: its three folders under the run's own work folder, our
trainer folder for its trainer lookup, and its process counts; restored afterwards.

nnU-Net 2.8.1 reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` every time it
uses them (and copies them into a trainer when one is constructed), so they are set around the
calls, never in the user's shell. ``nnUNet_def_n_proc`` is read once, when nnU-Net is first
imported: this module sets its default before any nnU-Net import.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

TRAINERS_DIR = Path(__file__).parent / "nnunet_trainers"
TRAINER_NAME = "nnUNetTrainerCyclic"
CONFIGURATION, FOLD, PLANS = "2d", "all", "nnUNetPlans"
# what a training state holds that resuming applies (nnU-Net 2.8.1's checkpoint keys)
NNUNET_STATE_KEYS = ("network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema",
                     "current_epoch", "init_args")

# nnU-Net's default of 8 worker processes for export and preprocessing is more than a laptop has.
os.environ.setdefault("nnUNet_def_n_proc", str(max(1, min(8, os.cpu_count() or 1))))


def folders(work: str | Path) -> dict[str, str]:
    work = Path(work)
    return {"nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
            "nnUNet_results": str(work / "results")}


@contextlib.contextmanager
def nnunet_environment(work: str | Path | None, augment_processes: int | None = None,
                       compile_network: bool = False) -> Iterator[dict[str, str]]:
    """Point nnU-Net at ``work`` (raw/, preprocessed/, results/) for the duration of the block
    (``None``: only the trainer lookup and compile setting, for prediction).

    ``augment_processes``: nnU-Net's data-augmentation workers (0 runs augmentation in the
    training process; None keeps nnU-Net's own default). Only for training: its planner fails
    with 0. ``compile_network``: torch.compile on GPU (nnU-Net never compiles on CPU).
    """
    values = {**(folders(work) if work is not None else {}), "nnUNet_extTrainer": str(TRAINERS_DIR),
              "nnUNet_compile": "true" if compile_network else "false"}
    if augment_processes is not None:
        values["nnUNet_n_proc_DA"] = str(augment_processes)
    saved = {key: os.environ.get(key) for key in values}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if name in values:
            Path(values[name]).mkdir(parents=True, exist_ok=True)
    os.environ.update(values)
    try:
        yield values
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def trained_folder(work: str | Path, dataset_id: int, name: str) -> Path:
    """nnU-Net's results folder for our trainer, plans and configuration (holds fold_all/)."""
    return (Path(folders(work)["nnUNet_results"]) / dataset_folder_name(dataset_id, name)
            / f"{TRAINER_NAME}__{PLANS}__{CONFIGURATION}")


@contextlib.contextmanager
def stdout_to(log: str | Path) -> Iterator[None]:
    """Send this process's file descriptor 1 (nnU-Net prints there, from its worker processes
    too) to ``log`` for the block; the CLI draws its own progress."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    with open(log, "a") as handle:
        os.dup2(handle.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
