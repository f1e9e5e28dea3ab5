"""A run, top to bottom: plan the cases, skip those an earlier run completed, open the MLflow run,
stream every remaining case through the stages (in this process or on Ray), then write the
manifest and log the figures. ``segment`` runs it in-process and untracked; ``pseudolabel`` and
the demo run it on Ray, tracked and resumable. A store that stops answering (longer than the
storage layer's retries) stops the run: every case finished before it is kept for the resume.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .. import storage
from ..domain.records import COMPLETED, STATUS_ERROR, CaseRecord, read_records, status_counts, write_manifest
from ..runs.pins import ModelPin
from ..storage.access import check_output_folder
from ..storage.outputs import MANIFEST, STAGING
from ..storage.retry import stop_on_outage
from . import tracking
from .job import Job, plan
from .pins import pin_models
from .slices import CaseTask

Progress = Callable[[int, int, CaseRecord], None]
Runner = Literal["local", "ray"]


@dataclass
class RunResult:
    records: list[CaseRecord]  # one per planned case, in case_id order
    n_skipped: int  # completed by an earlier run of the same output
    n_processed: int
    seconds: float
    run_id: str  # MLflow run ("" when untracked)
    manifest_uri: str
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    pins: tuple[ModelPin, ...] = ()  # the registry models it used, pinned to versions


def run_job(job: Job, runner: Runner = "ray", progress: Progress | None = None, *, resume: bool = True,
            track: bool = True, connect: Callable[[], None] | None = None, **runner_options) -> RunResult:
    """Segment every planned case of ``job`` not yet completed under its output; write the manifest.

    ``connect`` (e.g. start or join Ray) is called only when there is a case left to run, so a rerun
    over a finished output starts nothing. ``runner_options`` go to the runner (``sam_stage`` for
    Ray: a ``SamStage`` subclass).
    """
    job = job.resolved()
    tasks = plan(job)  # a bad input fails here, before any model loads
    check_output_folder(job.output)  # and so does an output that cannot be written
    job, pins = pin_models(job)  # models:/NAME@alias -> the version it names now
    parameters = job.parameters()
    previous = tracking.check_settings(job, parameters, pins) if resume else None
    done = _completed(job, tasks) if resume else {}
    todo = [t for t in tasks if t.case_id not in done]
    run_id = tracking.open_run(job, parameters, previous, pins) if track else ""
    new: dict[str, CaseRecord] = {}
    try:
        if todo and connect is not None:
            connect()
        storage.remove_tree(storage.join(job.output, STAGING))  # slices staged by a killed run are stale
        storage.remove_temporaries(job.output)  # and writes an outage cut short left their temporaries
        start = time.perf_counter()
        with contextlib.closing(_stream(todo, job, runner, runner_options)) as stream:
            for record in stream:
                new[record.case_id] = record
                if progress is not None:
                    progress(len(done) + len(new), len(tasks), record)
                stop_on_outage(record.case_id, record.error, job.output, len(done) + _finished(new))
        seconds = time.perf_counter() - start
        for task in todo:  # a case whose slices never all arrived: report it, a rerun retries it
            if task.case_id not in new:
                new[task.case_id] = CaseRecord(task.case_id, task.uri, gt_uri=task.gt_uri, status=STATUS_ERROR,
                                               error="incomplete: not every slice reached the writer")
        records = [({**done, **new})[t.case_id] for t in tasks]
        manifest_uri = storage.join(job.output, MANIFEST)
        write_manifest(records, manifest_uri)
        storage.remove_tree(storage.join(job.output, STAGING))
        attempts = [*tracking.previous_attempts(previous), {
            "n_processed": len(todo), "seconds": seconds, "n_slices": sum(r.n_slices for r in new.values())}]
        metrics = summary_metrics(records, attempts)
        if track:
            tracking.close_run(job, parameters, attempts, metrics, manifest_uri, pins)
    except BaseException:
        if track:
            tracking.fail_run()
        raise
    return RunResult(records, len(done), len(todo), seconds, run_id, manifest_uri, status_counts(records), metrics,
                     pins)


def _finished(records: dict[str, CaseRecord]) -> int:
    return sum(1 for r in records.values() if r.status in COMPLETED)


def _completed(job: Job, tasks: list[CaseTask]) -> dict[str, CaseRecord]:
    planned = {t.case_id for t in tasks}
    return {k: r for k, r in read_records(job.output).items() if r.status in COMPLETED and k in planned}


def _stream(tasks: list[CaseTask], job: Job, runner: Runner, options: dict):
    if runner == "local":
        from .local import run_local

        return run_local(tasks, job, **options)
    from .ray_runner import run_ray

    return run_ray(tasks, job, **options)


def _rates(n_processed: float, n_slices: float, seconds: float) -> tuple[float, float]:
    return (n_processed / seconds, n_slices / seconds) if seconds > 0 else (0.0, 0.0)


def summary_metrics(records: list[CaseRecord], attempts: list[dict]) -> dict[str, float]:
    """Figures of the whole output (counts, scores, throughput of the attempts that processed cases)
    and of the latest attempt (``attempt_*``)."""
    metrics = {f"n_{status}": float(n) for status, n in status_counts(records).items()}
    working = [a for a in attempts if a["n_processed"] > 0]
    processed, slices, seconds = (sum(a[k] for a in working) for k in ("n_processed", "n_slices", "seconds"))
    cases_per_s, slices_per_s = _rates(processed, slices, seconds)
    metrics.update(n_cases=float(len(records)), n_processed=float(processed), wall_seconds=float(seconds),
                   cases_per_s=cases_per_s, slices_per_s=slices_per_s, attempts=float(len(attempts)))
    last = attempts[-1]
    last_cases, last_slices = _rates(last["n_processed"], last["n_slices"], last["seconds"])
    metrics.update(attempt_n_processed=float(last["n_processed"]), attempt_wall_seconds=float(last["seconds"]),
                   attempt_cases_per_s=last_cases, attempt_slices_per_s=last_slices)
    scored = [r for r in records if r.gt_uri and np.isfinite(r.dsc)]
    if scored:
        metrics.update(mean_dsc=float(np.mean([r.dsc for r in scored])),
                       mean_nsd=float(np.mean([r.nsd for r in scored])), n_scored=float(len(scored)))
    attributed = [r for r in scored if np.isfinite(r.dsc_oracle)]
    if attributed:  # stage attribution: where the accuracy is lost
        metrics.update(mean_dsc_coarse=float(np.mean([r.dsc_coarse for r in attributed])),
                       mean_dsc_attributed=float(np.mean([r.dsc for r in attributed])),
                       mean_dsc_oracle=float(np.mean([r.dsc_oracle for r in attributed])))
    return metrics
