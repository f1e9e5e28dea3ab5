"""Weak training: export -> plan and preprocess -> nnU-Net on Ray Train -> the ensemble folder.

Driver (``run_weak_training``): collect the training cases, export and preprocess them in a local
work folder (reused by a rerun with the same cases), open or reopen the MLflow run, run
``TorchTrainer`` with one worker per GPU (one CPU worker without GPUs), then write
``ensemble.json`` next to the members and optionally register the ensemble. On one node the
workers run on the driver's node; on more, the preprocessed dataset is shipped through the output
(``weak.shipping``) and the workers may run, or run again after a node is lost, on any node.
Workers (``train_loop``): build ``nnUNetTrainerCyclic`` through nnU-Net's trainer lookup, continue
from Ray's last checkpoint if there is one (the one before it if it is corrupt), and train. After
every epoch rank 0 uploads a kept member to ``<output>/ensemble/fold_all/`` at once, logs the
epoch to MLflow, and reports a Ray checkpoint holding the state to continue from; a killed run
resumes at the next epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import storage
from ..errors import InputError, ModelError
from ..models.checkpoints import read_torch_checkpoint, restore_newest, sha256_of
from ..runs import tracking
from ..runs.ray_session import alive_nodes, ensure_ray
from ..runs.tracking import KIND_WEAK
from ..storage.fetch import cache_slot
from .dataset import TrainingCase, export_dataset
from .ensemble import ENSEMBLE_DIR, ENSEMBLE_FILE, FINAL
from .nnunet_env import (
    CONFIGURATION,
    FOLD,
    NNUNET_STATE_KEYS,
    TRAINER_NAME,
    dataset_folder_name,
    nnunet_environment,
    stdout_to,
)
from .planning import plan_and_preprocess
from .schedule import kept_epochs, member_name
from .settings import WeakConfig
from .shipping import Shipped, pack, unpack

RUN_ID_FILE = "mlflow_run_id"
RUN_FILE = "weak_run.json"  # the settings and cases an output is trained with
NNUNET_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")


@dataclass
class WeakTrainResult:
    output: str
    ensemble_uri: str
    run_id: str
    cases: list[str]
    skipped: dict[str, str]
    members: list[str]
    metrics: dict
    seconds: float
    model_uri: str = ""
    version: str = ""
    work: str = ""


def work_folder(output: str) -> Path:
    """The local folder nnU-Net works in for ``output`` (raw, preprocessed, results)."""
    return cache_slot("weak", output)


def _prepared_key(cases: list[TrainingCase], config: WeakConfig) -> str:
    return json.dumps({"cases": [[c.case_id, c.image_uri, c.label_uri] for c in cases],
                       "data": config.data.model_dump()}, sort_keys=True)


def prepare(cases: list[TrainingCase], work: Path, config: WeakConfig, processes: int = 1,
            progress: Callable[[str], None] | None = None) -> tuple[list[str], dict[str, str]]:
    """Export, plan and preprocess into ``work`` unless a previous run did it for the same cases."""
    marker = work / "prepared.json"
    key = _prepared_key(cases, config)
    if marker.exists():
        done = json.loads(marker.read_text())
        if done["key"] == key:
            return done["cases"], done["skipped"]
    data = config.data
    name = dataset_folder_name(data.dataset_id, data.dataset_name)
    for stale in (work / "raw" / name, work / "preprocessed" / name):  # an earlier export of other cases
        shutil.rmtree(stale, ignore_errors=True)
    with nnunet_environment(work) as env:
        if progress:
            progress(f"exporting {len(cases)} case(s) as nnU-Net dataset {name}")
        summary = export_dataset(cases, env["nnUNet_raw"], data.dataset_id, data.dataset_name, data.normalization,
                                 data.min_mask_pixels)
        if progress:
            progress(f"planning and preprocessing ({len(summary.cases)} case(s), configuration {CONFIGURATION})")
        with stdout_to(work / "nnunet.log"):
            plan_and_preprocess(data.dataset_id, processes)
    marker.write_text(json.dumps({"key": key, "cases": summary.cases, "skipped": summary.skipped}))
    return summary.cases, summary.skipped


def _configure(trainer, config: WeakConfig) -> None:
    t = config.training
    trainer.num_epochs, trainer.cycles, trainer.keep_per_cycle = t.epochs, t.cycles, t.keep_per_cycle
    trainer.gamma, trainer.schedule, trainer.kept_rule = t.gamma, t.schedule, t.kept_epochs
    trainer.initial_lr = t.initial_lr
    trainer.num_iterations_per_epoch = t.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = t.val_iterations_per_epoch


def _epoch_metrics(trainer, epoch: int) -> dict:
    value = trainer.logger.get_value
    return {"epoch": epoch, "train_loss": float(value("train_losses", step=-1)),
            "val_loss": float(value("val_losses", step=-1)), "lr": float(value("lrs", step=-1)),
            "pseudo_dice": float(value("mean_fg_dice", step=-1)),
            "ema_pseudo_dice": float(value("ema_fg_dice", step=-1)),
            "epoch_seconds": float(value("epoch_end_timestamps", step=-1) - value("epoch_start_timestamps", step=-1))}


RESUME_STATE = "train_state.pth"


def check_resume_state(folder: Path) -> Path:
    """The nnU-Net training state (``train_state.pth``) of a Ray checkpoint folder, checked: a missing,
    truncated or unreadable file, or one without the state nnU-Net loads, is a ``CorruptCheckpoint``
    naming it, one that would run code an ``UnsafeCheckpoint``. The tensors are memory-mapped, not
    read: ``resume_from`` loads them."""
    path = Path(folder) / RESUME_STATE
    read_torch_checkpoint(path, NNUNET_STATE_KEYS, mmap=True)
    return path


def resume_from(trainer, folder: Path) -> int:
    """Load a checked Ray checkpoint folder into the nnU-Net trainer; the epoch it continues at.

    A corrupt state (``check_resume_state``) leaves the trainer as it was, and ``train_loop`` tries
    the previous checkpoint Ray Train kept (2 are), or starts from scratch when none is usable,
    with a warning (see ``restore_newest``)."""
    path = check_resume_state(folder)
    # loaded here with weights_only (nnU-Net's own load of a path would unpickle anything), then handed over
    trainer.load_checkpoint(read_torch_checkpoint(path, NNUNET_STATE_KEYS, map_location=trainer.device))
    return trainer.current_epoch


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker. Resumes from the newest usable Ray checkpoint (see ``resume_from``)."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    config = WeakConfig.model_validate(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.training.seed + rank)
    np.random.seed(config.training.seed + rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(loop_config["cpus_per_worker"])))
    members = storage.join(loop_config["ensemble_uri"], f"fold_{FOLD}")
    work = _worker_folder(loop_config)
    with nnunet_environment(work, augment_processes=loop_config["augment_processes"],
                            compile_network=device.type == "cuda"):
        from nnunetv2.run.run_training import get_trainer_from_args

        with stdout_to(work / f"train_rank{rank}.log"):
            trainer = get_trainer_from_args(str(config.data.dataset_id), CONFIGURATION, FOLD, TRAINER_NAME,
                                            device=device)
        _configure(trainer, config)
        # the newest Ray checkpoint whose state reads; a corrupt one is reported and the previous one used
        restore_newest(ray.train.get_checkpoint(), lambda folder: resume_from(trainer, folder),
                       what=f"weak training (worker {rank})")
        if rank == 0:
            tracking.attach(loop_config["tracking_uri"], loop_config["run_id"])

        def after_epoch(trainer, epoch: int) -> None:
            metrics = {**_epoch_metrics(trainer, epoch), "start_epoch": start_epoch}
            if rank != 0:
                ray.train.report(metrics)
                return
            if trainer.keeps(epoch):
                storage.upload_file_atomic(trainer.member_path(epoch), storage.join(members, member_name(epoch)))
            tracking.log_metrics({k: v for k, v in metrics.items() if k not in ("epoch", "start_epoch")}, step=epoch)
            with tempfile.TemporaryDirectory() as folder:
                trainer.save_resume_state(str(Path(folder) / RESUME_STATE))
                (Path(folder) / "metrics.json").write_text(json.dumps(metrics))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

        trainer.epoch_end_hook = after_epoch
        start_epoch = trainer.current_epoch
        with stdout_to(work / f"train_rank{rank}.log"):
            trainer.run_training()
        if rank == 0:
            base = Path(trainer.output_folder_base)
            for name in NNUNET_FILES:
                storage.upload_file_atomic(base / name, storage.join(loop_config["ensemble_uri"], name))
            storage.upload_file_atomic(Path(trainer.output_folder) / FINAL, storage.join(members, FINAL))
            tracking.end_run()


def _worker_folder(loop_config: dict) -> Path:
    """Where this worker's nnU-Net works: the driver's work folder on the driver's node (or when
    nothing was shipped), else a folder of this node's own under it holding the shipped dataset."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    work = Path(loop_config["work"])
    if loop_config["shipped"] is None or here == loop_config["driver_node"]:
        return work
    return unpack(Shipped(**loop_config["shipped"]), work / "nodes" / here[:16])


def _sha256(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def write_manifest(ensemble_uri: str, config: WeakConfig, cases: list[str]) -> list[str]:
    """``ensemble.json``: the cycle members (as the keep rule names them), the final checkpoint, the
    SHA-256 of each, and the settings they were trained with."""
    t = config.training
    names = [member_name(e) for e in kept_epochs(t.epochs, t.cycles, t.keep_per_cycle, t.kept_epochs)]
    folder = storage.join(ensemble_uri, f"fold_{FOLD}")
    missing = [n for n in [*names, FINAL] if not storage.exists(storage.join(folder, n))]
    if missing:
        raise ModelError(f"weak training ended without member checkpoint(s) {', '.join(missing[:3])} under {folder}")
    manifest = {"members": names, "final": FINAL, "threshold": config.ensemble.threshold,
                "default_members": config.ensemble.members,
                "sha256": {n: _sha256(storage.join(folder, n)) for n in [*names, FINAL]},
                "training": t.model_dump(), "data": config.data.model_dump(), "cases": cases,
                "trainer": TRAINER_NAME, "configuration": CONFIGURATION, "fold": FOLD}
    storage.write_bytes_atomic(storage.join(ensemble_uri, ENSEMBLE_FILE), json.dumps(manifest, indent=1).encode())
    return names


def _check_same_run(output: str, config: WeakConfig, cases: list[str] | None = None) -> None:
    """A rerun continues the training of ``output``; with other settings or cases it would mix two
    runs in one ensemble, so it is refused. Called with ``cases=None`` before the export (the
    settings), then with the exported cases (recorded by the first run)."""
    uri = storage.join(output, RUN_FILE)
    current = {"training": config.training.model_dump(exclude={"augment_processes"}),
               "data": config.data.model_dump()}
    if cases is not None:
        current["cases"] = cases
    if storage.exists(uri):
        before = json.loads(storage.read_bytes(uri))
        changed = [k for k in current if before.get(k) != current[k]]
        if changed:
            raise InputError(f"{uri}: this output was trained with other {' and '.join(changed)}; "
                             "use a new --output (or delete this one) to train with these")
    elif cases is not None:
        storage.write_bytes_atomic(uri, json.dumps(current, indent=1).encode())


def run_weak_training(cases: list[TrainingCase], skipped_before: dict[str, str], output: str, config: WeakConfig,
                      source: str, workers: int = 1, use_gpu: bool = False, register: str | None = None,
                      callbacks: list | None = None,
                      progress: Callable[[str], None] | None = None,
                      connect: Callable[[], None] | None = None, work: Path | None = None) -> WeakTrainResult:
    """Train the ensemble on ``cases`` and write it to ``<output>/ensemble``; a rerun resumes.

    The dataset is exported and preprocessed before ``connect`` (joining or starting Ray) is
    called: nnU-Net forks worker processes, and a fork of a process that holds Ray inherits
    Ray's signal handlers (each terminated worker then prints a SIGTERM trace).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if workers > 1 and not use_gpu:
        raise InputError("--workers > 1 needs --gpu: nnU-Net's data parallelism is one GPU per worker")
    start = time.perf_counter()
    output = storage.absolute(output)  # workers write members there, from other working directories
    work = Path(work) if work is not None else work_folder(output)
    _check_same_run(output, config)  # before the export, which would replace the one being resumed
    used, skipped = prepare(cases, work, config, processes=max(1, min(8, os.cpu_count() or 1)), progress=progress)
    ensure_ray(connect)
    here, cpus = _this_node()
    # On one node the workers run where the data is; on more, any node may run them (and run them
    # again after a node is lost), so the preprocessed dataset is shipped through the output.
    shipped = None
    if alive_nodes() > 1:
        shipped = pack(work, dataset_folder_name(config.data.dataset_id, config.data.dataset_name), output)
        cpus = _smallest_node_cpus()
    skipped = {**skipped_before, **skipped}
    ensemble_uri = storage.join(output, ENSEMBLE_DIR)
    _check_same_run(output, config, used)
    uri = tracking.use_store(config.tracking.uri)
    run_id = tracking.run_in_file(  # a rerun continues the same MLflow run
        storage.join(output, RUN_ID_FILE), config.tracking.experiment, f"weak-{config.data.dataset_name}",
        {"source": source, "output": output, "workers": workers, "use_gpu": use_gpu,
         **config.model_dump(exclude={"tracking", "prediction"})},
        {"training_cases": len(used), "skipped_cases": len(skipped)})
    cpus_per_worker = 1.0 if use_gpu else max(1.0, cpus - 1.0)
    loop_config = {"config": config.model_dump(), "work": str(work), "ensemble_uri": ensemble_uri,
                   "tracking_uri": uri, "run_id": run_id, "cpus_per_worker": cpus_per_worker,
                   "augment_processes": config.training.augment_processes,
                   "shipped": shipped.to_dict() if shipped else None, "driver_node": _node_id()}
    if progress:
        progress(f"training {config.training.epochs} epoch(s) on {workers} {'GPU' if use_gpu else 'CPU'} worker(s)")
    if progress and shipped:
        progress(f"the preprocessed dataset goes to workers on other nodes through {storage.redact_uri(shipped.uri)}")
    # on one node the workers run on it, where the preprocessed data is (nnU-Net reads it from local disk)
    pin = {} if shipped else {f"node:{here}": 0.001}
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={
            **({"GPU": 1.0, "CPU": 1.0} if use_gpu else {"CPU": cpus_per_worker}), **pin}),
        # Ray Train's checkpoints live with the output, so a rerun from any machine continues there.
        # Two are kept: when the last one is corrupt, the resume falls back to the one before.
        run_config=RunConfig(name="weak", storage_path=storage.join(storage.absolute(output), "ray_train"),
                             failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks or [])),
    )
    metrics = _fit(trainer, output)
    members = write_manifest(ensemble_uri, config, used)
    out = WeakTrainResult(output, ensemble_uri, run_id, used, skipped, members, metrics,
                          time.perf_counter() - start, work=str(work))
    if register:
        out.version = register_ensemble(ensemble_uri, run_id, register, metrics)
        out.model_uri = f"models:/{register}/{out.version}"
    return out


def _this_node() -> tuple[str, float]:
    """This node's address and CPUs: on one node the workers run here, where the preprocessed data is."""
    import ray

    here = ray.util.get_node_ip_address()
    node = next((n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == here), None)
    return here, float((node or {}).get("Resources", {}).get("CPU", ray.cluster_resources().get("CPU", 1.0)))


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _smallest_node_cpus() -> float:
    """The CPUs of the smallest alive node that has any: a CPU worker sized to it fits on every node,
    so it can start again on any survivor."""
    import ray

    cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]]
    return min((c for c in cpus if c > 0), default=1.0)


def _fit(trainer, output: str) -> dict:
    """The trainer's last figures; a failure once Ray Train's retries are spent is one sentence."""
    try:
        result = trainer.fit()
    except Exception as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"weak training failed ({first}); Ray Train's checkpoint is kept under "
                         f"{storage.join(output, 'ray_train')}: run the same command again to continue") from exc
    return dict(result.metrics or {})


def register_ensemble(ensemble_uri: str, run_id: str, name: str, metrics: dict) -> str:
    """Log the ensemble folder to the run as an MLflow pyfunc model (logged as code, not as a pickled
    object) and register it as a new version. No alias moves: ``medclipsam models promote`` moves
    ``champion`` when the version wins."""
    from ..storage.fetch import fetch_folder
    from . import mlflow_model

    local = fetch_folder(ensemble_uri, "weak ensemble", marker=ENSEMBLE_FILE)
    figures = {k: str(metrics[k]) for k in ("pseudo_dice", "ema_pseudo_dice", "train_loss", "val_loss") if k in metrics}
    return tracking.register_version(run_id, name, "ensemble", mlflow_model.__file__, {"ensemble": str(local)},
                                     ["medclipsam", "nnunetv2==2.8.1"], KIND_WEAK,
                                     sha256_of(str(local / ENSEMBLE_FILE)), figures)
