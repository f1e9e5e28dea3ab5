"""The MLflow run of an output folder: opened on the first run, reopened on resume, and the guard
that a resume uses the settings the output was written with (``run.json``).

Each invocation on an output is an attempt, numbered in ``run.json``. Its figures are logged with
the attempt number as the MLflow step, so a rerun never overwrites what an earlier attempt measured.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from .. import storage
from ..errors import InputError
from ..runs.pins import ModelPin
from ..runs.tracking import flatten, resolve_tracking_uri
from ..storage import redact_uri
from ..storage.outputs import OVERLAYS, RUN_FILE
from .job import Job


def check_settings(job: Job, parameters: str, pins: tuple[ModelPin, ...] = ()) -> dict | None:
    """The previous ``run.json`` of this output (None for a new one); changed settings are refused."""
    run_file = storage.join(job.output, RUN_FILE)
    previous = json.loads(storage.read_bytes(run_file)) if storage.exists(run_file) else None
    if previous and previous.get("settings_sha256") != _digest(parameters):
        moved = _moved_alias(previous, pins)
        if moved:
            raise InputError(f"{run_file}: {moved}")
        raise InputError(f"{run_file}: this output was written with other settings ({previous.get('settings')}); "
                         f"use a new --output, or the same settings to resume")
    return previous


def _moved_alias(previous: dict, pins: tuple[ModelPin, ...]) -> str:
    """Why a resume differs when only an alias moved since the output was started ("" otherwise)."""
    before = {m["role"]: m for m in previous.get("models", [])}
    for pin in pins:
        old = before.get(pin.role)
        if old and old["requested"] == pin.requested and old["uri"] != pin.uri:
            return (f"this output was started with {old['uri']}; {pin.requested} now names {pin.uri}. "
                    f"Pass {old['uri']} to resume it, or use a new --output for {pin.uri}")
    return ""


def _digest(parameters: str) -> str:
    return hashlib.sha256(parameters.encode()).hexdigest()


def open_run(job: Job, parameters: str, previous: dict | None, pins: tuple[ModelPin, ...] = ()) -> str:
    """Start (or, on resume, reopen) the MLflow run of this output; record it in ``run.json``."""
    import mlflow

    tracking_uri = resolve_tracking_uri(job.config.tracking.uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(job.config.tracking.experiment)
    same_store = previous and previous.get("tracking_uri") == redact_uri(tracking_uri)
    run_id = previous.get("mlflow_run_id") if same_store else None
    if run_id is not None:
        try:
            mlflow.get_run(run_id)
        except Exception:  # the store was reset: start a new run
            run_id = None
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else storage.basename(job.output))
    if run_id is None:
        mlflow.log_params({**flatten(json.loads(parameters)), "task": job.config.task, "input": job.input_uri,
                           "output": job.output, "gt": job.gt_uri or "", **_pin_params(pins)})
    _write_run_file(job, parameters, run.info.run_id, tracking_uri, previous_attempts(previous), pins)
    return run.info.run_id


def previous_attempts(previous: dict | None) -> list[dict]:
    """The figures of the earlier attempts on this output, oldest first."""
    return list((previous or {}).get("attempts", []))


def _pin_params(pins: tuple[ModelPin, ...]) -> dict[str, str]:
    return {k: v for pin in pins for k, v in pin.params().items()}


def _write_run_file(job: Job, parameters: str, run_id: str, tracking_uri: str, attempts: list[dict],
                    pins: tuple[ModelPin, ...]) -> None:
    storage.write_bytes_atomic(storage.join(job.output, RUN_FILE), json.dumps({
        "mlflow_run_id": run_id, "tracking_uri": redact_uri(tracking_uri), "settings_sha256": _digest(parameters),
        "settings": json.loads(parameters), "models": [asdict(p) for p in pins], "attempts": attempts},
        indent=2).encode())


def close_run(job: Job, parameters: str, attempts: list[dict], metrics: dict[str, float], manifest_uri: str,
              pins: tuple[ModelPin, ...] = ()) -> None:
    """Record the attempts in ``run.json``; log the figures at this attempt's step, the manifest and overlays."""
    import mlflow

    run = mlflow.active_run()
    _write_run_file(job, parameters, run.info.run_id, mlflow.get_tracking_uri(), attempts, pins)
    mlflow.log_metrics(metrics, step=len(attempts))
    output = job.output
    with tempfile.TemporaryDirectory(prefix="medclipsam-artifacts-") as tmp:
        local = Path(tmp) / storage.basename(manifest_uri)
        local.write_bytes(storage.read_bytes(manifest_uri))
        mlflow.log_artifact(str(local))
        folder = storage.join(output, OVERLAYS)
        if storage.exists(folder):
            pictures = storage.read_many([u for u in storage.list_files(folder) if u.endswith(".png")])
            (Path(tmp) / OVERLAYS).mkdir()
            for uri, data in pictures.items():
                (Path(tmp) / OVERLAYS / storage.basename(uri)).write_bytes(data)
            mlflow.log_artifacts(str(Path(tmp) / OVERLAYS), OVERLAYS)
    mlflow.end_run()


def fail_run() -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.end_run(status="FAILED")
