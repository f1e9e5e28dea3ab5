"""A pseudo-labelling or segmentation run: the job's plan and pinned models handed to the shared
per-case run (``runs.case_run``), with this pipeline's stages as the stream, in this process or on
Ray. ``segment`` runs it in-process and untracked; ``pseudolabel``, the demo and the registry's
evaluations run it on Ray, tracked and resumable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from .. import storage
from ..domain.records import CaseRecord
from ..errors import describe
from ..models.biomedclip import clip_weights_sha256
from ..runs.case_run import CaseRun, Progress, Tracking, run_cases
from ..runs.pins import ModelPin, pin_registered
from ..runs.tracking import use_store
from ..storage import access
from ..storage.outputs import OVERLAYS, STAGING
from ..storage.registered import is_registered
from .job import Job, plan
from .slices import SOURCE_TEXT, CaseTask

Runner = Literal["local", "ray"]
log = logging.getLogger(__name__)


@dataclass
class RunResult:
    records: Sequence[CaseRecord]  # one per planned case, in plan order (read from the manifest when used)
    n_skipped: int  # completed by an earlier run of the same output
    n_processed: int
    seconds: float
    run_id: str  # MLflow run ("" when untracked)
    manifest_uri: str
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    pins: tuple[ModelPin, ...] = ()  # the registry models it used, pinned to versions
    report_uri: str = ""  # the review report ("" if it could not be written)


def run_job(job: Job, runner: Runner = "ray", progress: Progress | None = None, *, resume: bool = True,
            track: bool = True, connect: Callable[[], None] | None = None, **runner_options) -> RunResult:
    """Segment every planned case of ``job`` not yet completed under its output; write the manifest.

    ``connect`` (e.g. start or join Ray) is called only when there is a case left to run.
    ``runner_options`` go to the runner (``sam_stage`` for Ray: a ``SamStage`` subclass).
    """
    job = job.resolved()
    tasks = plan(job)  # a bad input fails here, before any model loads
    access.check_output_folder(job.output)  # and so does an output that cannot be written
    job = pin_models(job)  # models:/NAME@alias -> the version it names now
    c = job.config
    tracking = Tracking(c.tracking.uri, c.tracking.experiment, storage.basename(job.output),
                        {"task": c.task, "input": job.input_uri, "output": job.output, "gt": job.gt_uri or ""},
                        artifact_folders=(OVERLAYS,)) if track else None
    run = CaseRun(job.output, job.parameters(), job.pins, scratch=(STAGING,), tracking=tracking,
                  about=job.about())
    outcome = run_cases(run, tasks, lambda todo: _stream(todo, job, runner, runner_options), progress=progress,
                        resume=resume, connect=connect)
    return RunResult(outcome.records, outcome.n_skipped, len(outcome.new), outcome.seconds, outcome.run_id,
                     outcome.manifest_uri, outcome.counts, outcome.metrics, job.pins, _report(job.output))


def _report(output: str) -> str:
    """The run's review report; a failure to write it costs the run nothing (``medclipsam report`` retries)."""
    from ..eval.report import write_report

    try:
        return write_report(output)
    except Exception as exc:  # the masks and manifest stand
        log.warning("the report could not be written (%s); run medclipsam report %s", describe(exc), output)
        return ""


def pin_models(job: Job) -> Job:
    """The job with its CLIP model pinned to the registry version it names now (text mode), the pin
    added to ``pins``. The SAM checkpoint's hash is recorded per case by the SAM stage."""
    if job.source != SOURCE_TEXT or not is_registered(job.clip):
        return job
    use_store(job.config.tracking.uri)
    pin = pin_registered("clip", job.clip, clip_weights_sha256)
    return replace(job, clip_uri=pin.uri, pins=(*job.pins, pin))


def _stream(tasks: list[CaseTask], job: Job, runner: Runner, options: dict):
    if runner == "local":
        from .local import run_local

        return run_local(tasks, job, **options)
    from .ray_runner import run_ray

    return run_ray(tasks, job, **options)
