"""Cohort-scale pseudo-labelling on Ray Data.

    cases --read (CPU tasks)--> slice rows --saliency + prompts (actor pool)-->
          --SAM (actor pool)--> --assemble + write (CPU tasks)--> one record per case

Each stage calls a function of ``slice_rows`` / ``case_assembly``; this module only converts
Ray batches to rows and back, holds the models in actors, and runs the driver: plan, resume,
MLflow, manifest, summary. The driver never holds more than one small record per case.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import storage
from ..case_assembly import OVERLAYS, STAGING, AssemblySettings, collect_slice, read_records
from ..cohort import CohortCase, read_cohort
from ..config import ActorPoolConfig, TaskConfig
from ..errors import InputError
from ..manifest import COMPLETED, STATUS_ERROR, CaseRecord, record_from_dict, write_manifest
from ..prompted_run import SliceSpec, absolute_output
from ..segmentation import SegmentationParams
from ..slice_rows import SOURCE_LABELS, SOURCE_TEXT, CaseTask, add_masks, add_saliency, add_text_prompts, case_slices
from ..text_run import TextSettings, text_settings
from ..tracking import flatten, resolve_tracking_uri

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
MANIFEST = "manifest.parquet"
Progress = Callable[[int, int, CaseRecord], None]


# -- Ray batches <-> rows ------------------------------------------------------------------------
def to_rows(batch: dict[str, np.ndarray]) -> list[dict]:
    """A Ray Data numpy batch as a list of row dicts (numpy scalars made Python values)."""
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    rows = []
    for i in range(n):
        row = {}
        for name in names:
            value = batch[name][i]
            row[name] = value.item() if isinstance(value, np.generic) else value
        rows.append(row)
    return rows


def to_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows back into columns; arrays of differing shapes become an object column (Ray's ragged tensors)."""
    out: dict[str, np.ndarray] = {}
    for name in rows[0] if rows else []:
        values = [row[name] for row in rows]
        if isinstance(values[0], np.ndarray):
            if len({(v.shape, v.dtype) for v in values}) == 1:
                out[name] = np.stack(values)
            else:
                column = np.empty(len(values), dtype=object)
                column[:] = values
                out[name] = column
        else:
            out[name] = np.asarray(values)
    return out


# -- the model stages: actors that load their model once ------------------------------------------
def _device(pool: ActorPoolConfig, configured: str) -> str:
    return "cuda" if pool.num_gpus > 0 else configured


def _maybe_crash(marker: str | None) -> None:
    """Test hook: kill this actor's process once (the marker file records that it happened)."""
    if marker and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)


class SaliencyStage:
    """M2IB saliency, then the coarse mask and SAM prompts (cheap, and the maps need not travel)."""

    def __init__(self, clip_uri: str, device: str, settings: TextSettings, keep_saliency: bool = False) -> None:
        from ..models.biomedclip import load_clip

        self.clip = load_clip(clip_uri, device)
        self.settings = settings
        self.keep_saliency = keep_saliency

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = add_saliency(self.clip, to_rows(batch), self.settings)
        return to_batch(add_text_prompts(rows, self.settings, self.keep_saliency))


class SamStage:
    def __init__(self, backend: str, checkpoint: str | None, device: str, params: SegmentationParams,
                 crash_marker: str | None = None) -> None:
        from ..models.sam_backends import build_segmenter

        self.segmenter = build_segmenter(backend, checkpoint, device)
        self.params = params
        self.crash_marker = crash_marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _maybe_crash(self.crash_marker)
        return to_batch(add_masks(self.segmenter, to_rows(batch), self.params))


# -- the CPU stages ---------------------------------------------------------------------------------
def _read(row: dict, spec: SliceSpec, source: str, box_margin: float) -> list[dict]:
    return case_slices(CaseTask(**row), spec, source, box_margin)


def _write(row: dict, settings: AssemblySettings) -> list[dict]:
    try:
        record = collect_slice(row, settings)
    except Exception:  # a slice that cannot be staged leaves its case incomplete; the driver reports it
        log.exception("case %s slice %s could not be staged", row["case_id"], row["slice"])
        return []
    return [] if record is None else [asdict(record)]


# -- the run ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PseudolabelJob:
    """Everything a run needs, resolved from the config and the command line."""

    config: TaskConfig
    input_uri: str
    output: str
    source: str = SOURCE_TEXT
    gt_uri: str | None = None
    prompts: tuple[str, ...] = ()  # overrides the config's text prompts
    clip_uri: str | None = None  # overrides the config's text.clip_model

    @property
    def spec(self) -> SliceSpec:
        return SliceSpec(axis=self.config.image.axis, window=self.config.image.window.to_window())

    @property
    def params(self) -> SegmentationParams:
        sam = self.config.sam
        return SegmentationParams(multimask=sam.multimask, merge=sam.merge, threshold=sam.threshold,
                                  keep_components=sam.keep_components, batch_size=sam.batch_size)

    @property
    def text(self) -> TextSettings:
        prompts = list(self.prompts) or (self.config.text.prompts if self.config.text else [])
        return text_settings(self.config, prompts)

    @property
    def clip(self) -> str:
        from ..models.biomedclip import BIOMEDCLIP_HUB

        return self.clip_uri or (self.config.text.clip_model if self.config.text else BIOMEDCLIP_HUB)

    def settings_record(self) -> dict:
        """What determines the masks: recorded per case, logged to MLflow, checked on resume."""
        settings = {"source": self.source, "slicing": {"axis": self.spec.axis, "window": asdict(self.spec.window)},
                    "sam": {"backend": self.config.sam.backend, "checkpoint": self.config.sam.checkpoint,
                            **asdict(self.params)}}
        if self.source == SOURCE_TEXT:
            settings["text"] = {**asdict(self.text), "clip_model": self.clip}
        else:
            settings["labels"] = {"box_margin": self.config.oracle.box_margin}
        return settings


@dataclass
class PseudolabelResult:
    records: list[CaseRecord]
    n_skipped: int  # completed by an earlier run of the same output
    n_processed: int
    seconds: float
    run_id: str
    manifest_uri: str
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def build_dataset(tasks: list[CaseTask], job: PseudolabelJob, parameters: str, crash_marker: str | None = None):
    """The Ray Data chain for ``tasks``; lazy until iterated."""
    import ray
    from ray.data import ActorPoolStrategy

    pipeline, sam = job.config.pipeline, job.config.sam
    assembly = AssemblySettings(job.output, job.source, parameters, pipeline.nsd_tolerance)
    ds = ray.data.from_items([asdict(t) for t in tasks], override_num_blocks=max(1, min(len(tasks), 1000)))
    ds = ds.flat_map(_read, fn_kwargs={"spec": job.spec, "source": job.source,
                                       "box_margin": job.config.oracle.box_margin}, num_cpus=pipeline.task_cpus)
    if job.source == SOURCE_TEXT:
        text = job.text
        ds = ds.map_batches(SaliencyStage, fn_constructor_kwargs={
            "clip_uri": job.clip, "device": _device(pipeline.saliency, sam.device), "settings": text,
            "keep_saliency": pipeline.save_saliency},
            compute=ActorPoolStrategy(size=pipeline.saliency.actors), batch_size=job.config.saliency.batch_size,
            num_gpus=pipeline.saliency.num_gpus, num_cpus=pipeline.saliency.num_cpus)
    ds = ds.map_batches(SamStage, fn_constructor_kwargs={
        "backend": sam.backend, "checkpoint": sam.checkpoint, "device": _device(pipeline.sam, sam.device),
        "params": job.params, "crash_marker": crash_marker},
        compute=ActorPoolStrategy(size=pipeline.sam.actors), batch_size=sam.batch_size,
        num_gpus=pipeline.sam.num_gpus, num_cpus=pipeline.sam.num_cpus)
    return ds.flat_map(_write, fn_kwargs={"settings": assembly}, num_cpus=pipeline.task_cpus)


def _check_job(job: PseudolabelJob) -> None:
    if job.source not in (SOURCE_TEXT, SOURCE_LABELS):
        raise InputError(f"unknown prompt source '{job.source}'; choose '{SOURCE_TEXT}' or '{SOURCE_LABELS}'")


def _tasks(cases: list[CohortCase], job: PseudolabelJob, skip: set[str]) -> list[CaseTask]:
    def prompt(case: CohortCase) -> str:
        if job.source != SOURCE_TEXT:
            return ""
        return json.dumps(list(case.prompts or job.text.prompts))

    drawn = {c.case_id for c in cases[: job.config.pipeline.overlays]}
    return [CaseTask(c.case_id, c.uri, c.gt_uri, prompt(c), c.case_id in drawn) for c in cases if c.case_id not in skip]


def _open_run(job: PseudolabelJob, parameters: str, tracking_uri: str) -> str:
    """Start (or, on resume, reopen) the MLflow run of this output; refuse changed settings."""
    import mlflow

    digest = hashlib.sha256(parameters.encode()).hexdigest()
    run_file = storage.join(job.output, RUN_FILE)
    previous = json.loads(storage.read_bytes(run_file)) if storage.exists(run_file) else None
    if previous and previous.get("settings_sha256") != digest:
        raise InputError(f"{run_file}: this output was written with other settings ({previous.get('settings')}); "
                         f"use a new --output, or the same settings to resume")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(job.config.tracking.experiment)
    run_id = previous.get("mlflow_run_id") if previous and previous.get("tracking_uri") == tracking_uri else None
    if run_id is not None:
        try:
            mlflow.get_run(run_id)
        except Exception:  # the store was reset: start a new run
            run_id = None
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else storage.basename(job.output))
    if run_id is None:
        mlflow.log_params({**flatten(json.loads(parameters)), "task": job.config.task, "input": job.input_uri,
                           "output": job.output, "gt": job.gt_uri or ""})
    storage.write_bytes_atomic(run_file, json.dumps({
        "mlflow_run_id": run.info.run_id, "tracking_uri": tracking_uri, "settings_sha256": digest,
        "settings": json.loads(parameters)}, indent=2).encode())
    return run.info.run_id


def summary_metrics(records: list[CaseRecord], seconds: float, n_processed: int, n_slices: int) -> dict[str, float]:
    counts = {status: sum(r.status == status for r in records) for status in {r.status for r in records}}
    metrics = {f"n_{status}": float(n) for status, n in counts.items()}
    metrics.update(n_cases=float(len(records)), n_processed=float(n_processed), wall_seconds=seconds,
                   cases_per_s=n_processed / seconds if seconds > 0 else 0.0,
                   slices_per_s=n_slices / seconds if seconds > 0 else 0.0)
    scored = [r for r in records if r.gt_uri and np.isfinite(r.dsc)]
    if scored:
        metrics.update(mean_dsc=float(np.mean([r.dsc for r in scored])),
                       mean_nsd=float(np.mean([r.nsd for r in scored])), n_scored=float(len(scored)))
    return metrics


def _log_artifacts(output: str, manifest_uri: str) -> None:
    import mlflow

    with tempfile.TemporaryDirectory(prefix="medclipsam-artifacts-") as tmp:
        local = Path(tmp) / MANIFEST
        local.write_bytes(storage.read_bytes(manifest_uri))
        mlflow.log_artifact(str(local))
        folder = storage.join(output, OVERLAYS)
        if storage.exists(folder):
            pictures = storage.read_many([u for u in storage.list_files(folder) if u.endswith(".png")])
            (Path(tmp) / OVERLAYS).mkdir()
            for uri, data in pictures.items():
                (Path(tmp) / OVERLAYS / storage.basename(uri)).write_bytes(data)
            mlflow.log_artifacts(str(Path(tmp) / OVERLAYS), OVERLAYS)


def run_pseudolabel(
    job: PseudolabelJob, progress: Progress | None = None, *, fail_after_cases: int | None = None,
    crash_marker: str | None = None,
) -> PseudolabelResult:
    """Label every case of ``job.input_uri`` not yet completed under ``job.output``; write the manifest.

    ``fail_after_cases`` and ``crash_marker`` are test hooks: stop the driver after that many new
    cases, and kill one SAM actor once.
    """
    import mlflow
    import ray

    job = PseudolabelJob(**{**job.__dict__, "output": absolute_output(job.output)})
    _check_job(job)
    cases = read_cohort(job.input_uri, job.gt_uri)  # a bad input fails here, before any model loads
    unprompted = [c.case_id for c in cases if job.source == SOURCE_TEXT and not (c.prompts or job.text.prompts)]
    if unprompted:
        raise InputError(f"no text prompt for case(s) {', '.join(unprompted[:5])}: give --prompt, a config with "
                         "text.prompts, or a prompt column in the input manifest")
    parameters = json.dumps(job.settings_record(), sort_keys=True)
    done = {k: r for k, r in read_records(job.output).items() if r.status in COMPLETED}
    planned = {c.case_id for c in cases}
    done = {k: r for k, r in done.items() if k in planned}
    tasks = _tasks(cases, job, set(done))
    if not ray.is_initialized():
        ray.init()
    run_id = _open_run(job, parameters, resolve_tracking_uri(job.config.tracking.uri))
    # Slices staged by a killed run are stale: start every unfinished case afresh.
    storage.remove_tree(storage.join(job.output, STAGING))
    new: dict[str, CaseRecord] = {}
    start = time.perf_counter()
    try:
        if tasks:
            for row in build_dataset(tasks, job, parameters, crash_marker).iter_rows():
                record = record_from_dict(row)
                if record.case_id in new:  # two writers raced to the last slice: same files, one record
                    continue
                new[record.case_id] = record
                if progress is not None:
                    progress(len(done) + len(new), len(cases), record)
                if fail_after_cases is not None and len(new) >= fail_after_cases:
                    raise RuntimeError(f"injected failure after {len(new)} case(s)")
        seconds = time.perf_counter() - start
        for task in tasks:  # a case whose slices never all arrived: report it, a rerun retries it
            if task.case_id not in new:
                new[task.case_id] = CaseRecord(task.case_id, task.uri, gt_uri=task.gt_uri, status=STATUS_ERROR,
                                               error="incomplete: not every slice reached the writer")
        records = [({**done, **new})[c.case_id] for c in cases]
        manifest_uri = storage.join(job.output, MANIFEST)
        write_manifest(records, manifest_uri)
        storage.remove_tree(storage.join(job.output, STAGING))
        metrics = summary_metrics(records, seconds, len(tasks), sum(r.n_slices for r in new.values()))
        mlflow.log_metrics(metrics)
        _log_artifacts(job.output, manifest_uri)
        mlflow.end_run()
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    counts = {status: int(metrics.get(f"n_{status}", 0)) for status in ("ok", "no_target", "no_prompts", "error")}
    return PseudolabelResult(records, len(done), len(tasks), seconds, run_id, manifest_uri, counts, metrics)
