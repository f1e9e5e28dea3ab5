"""MLflow, as every job uses it: the store a run goes to, runs opened or reopened by id (a rerun
continues the run it started), parameters within MLflow's limits, figures by step, and model
versions registered with their kind and weights' hash.

This module (with ``storage.registered`` and the pyfunc model wrappers) is the only one that
imports ``mlflow``; an import-linter contract in ``make lint`` holds that. Every function works on
MLflow's current store, which ``use_store`` sets.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from .. import storage
from ..errors import ModelError
from ..storage.registered import SHA_TAG

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARAM_LIMIT = 6000  # characters of one MLflow param value

# Tags on a model version: which kind of model it is (how the promotion gate evaluates it), and the
# SHA-256 of its weights.
KIND_TAG = "medclipsam.kind"
KIND_CLIP, KIND_WEAK, KIND_PIPELINE = "clip", "weak-ensemble", "pipeline"
KINDS = (KIND_CLIP, KIND_WEAK, KIND_PIPELINE)


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config, else ``$MLFLOW_TRACKING_URI``, else a sqlite file in the working directory.

    A relative sqlite path is made absolute, since Ray workers run in other directories.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def use_store(configured: str | None = None) -> str:
    """Point MLflow at the configured store (see ``resolve_tracking_uri``); return its URI.

    Called by the driver before a run and by every Ray actor or worker that logs or resolves a
    ``models:/`` URI: a worker's environment is not the driver's."""
    uri = resolve_tracking_uri(configured)
    mlflow.set_tracking_uri(uri)
    return uri


def current_store() -> str:
    return mlflow.get_tracking_uri()


def local_store_path(uri: str) -> Path | None:
    """The file or folder a local store keeps its data in (sqlite file, file: store), else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:"))
    return None if "://" in uri else Path(uri)


def registry_client(configured: str | None = None, read_only: bool = False) -> MlflowClient:
    """A client of the configured store's registry (the store becomes MLflow's current one).

    ``read_only``: a local store that does not exist is an error, not a new empty store (MLflow
    would create the file, so a listing in the wrong folder would leave an ``mlflow.db`` behind).
    """
    uri = resolve_tracking_uri(configured)
    path = local_store_path(uri) if read_only else None
    if path is not None and not path.exists():
        raise ModelError(f"no MLflow store at {path}: nothing is registered there; give --tracking-uri (or set "
                         "MLFLOW_TRACKING_URI) to the store the models were registered in")
    return MlflowClient(use_store(uri))


def flatten(settings: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists as JSON, so each value fits one MLflow param;
    every URI redacted (no credential is sent to MLflow)."""
    flat: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            text = storage.redact_text(json.dumps(value) if isinstance(value, list | tuple) else str(value))
            # MLflow refuses a param over 6000 characters (a long prompt): keep its head, say it was cut
            flat[name] = text if len(text) <= PARAM_LIMIT else text[: PARAM_LIMIT - 20] + " ...(truncated)"
    return flat


def log_params(params: dict) -> None:
    """Nested settings flattened, each value cut to MLflow's limit."""
    mlflow.log_params(flatten(params))


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics(metrics, step=step)


def log_text(text: str, name: str) -> None:
    """A text artifact, every URI in it redacted."""
    mlflow.log_text(storage.redact_text(text), name)


def log_files(files: dict[str, bytes], artifact_path: str | None = None) -> None:
    """Files given as name -> bytes, logged as the run's artifacts (under ``artifact_path``)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="medclipsam-artifacts-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        mlflow.log_artifacts(tmp, artifact_path)


def run_exists(run_id: str | None) -> bool:
    """Whether the current store holds the run (a reset store does not)."""
    if not run_id:
        return False
    try:
        mlflow.get_run(run_id)
    except Exception:
        return False
    return True


def open_run(experiment: str, run_name: str, run_id: str | None = None, params: dict | None = None) -> str:
    """Reopen ``run_id`` if the store has it, else start a run named ``run_name`` in ``experiment`` and log
    ``params``; the run stays active until ``end_run``. Returns its id."""
    mlflow.set_experiment(experiment)
    if run_exists(run_id):
        return mlflow.start_run(run_id=run_id).info.run_id
    run = mlflow.start_run(run_name=run_name)
    if params:
        log_params(params)
    return run.info.run_id


def end_run(failed: bool = False) -> None:
    """End the active run (if any), as FAILED when the work behind it raised."""
    if mlflow.active_run() is not None:
        mlflow.end_run(status="FAILED" if failed else "FINISHED")


@contextmanager
def active_run(experiment: str, run_name: str, run_id: str | None = None,
               params: dict | None = None) -> Iterator[str]:
    """``open_run`` for the length of a block; the run ends FAILED if the block raises."""
    run = open_run(experiment, run_name, run_id, params)
    try:
        yield run
    except BaseException:
        end_run(failed=True)
        raise
    end_run()


@contextmanager
def nested_run(run_name: str) -> Iterator[str]:
    """A child run of the active one (a trial of a search)."""
    with mlflow.start_run(run_name=run_name, nested=True) as run:
        yield run.info.run_id


def run_in_file(run_file: str, experiment: str, run_name: str, params: dict,
                metrics: dict[str, float] | None = None) -> str:
    """The id of the run recorded in ``run_file``; on a first run, one is started with ``params`` and
    ``metrics``, ended, and its id written there, so a rerun (a resume) continues the same run."""
    run_id = storage.read_bytes(run_file).decode().strip() if storage.exists(run_file) else None
    if run_id is None:
        with active_run(experiment, run_name, params=params) as run_id:
            if metrics:
                log_metrics(metrics)
        storage.write_bytes_atomic(run_file, run_id.encode())
    return run_id


def attach(tracking_uri: str, run_id: str) -> None:
    """Make ``run_id`` the active run of this process (a Ray Train worker logging its epochs)."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.start_run(run_id=run_id)


def register_version(run_id: str, name: str, artifact_path: str, python_model, artifacts: dict[str, str],
                     pip_requirements: list[str], kind: str, sha256: str, tags: dict[str, str] | None = None) -> str:
    """Log a pyfunc model to ``run_id``, register it as a new version of ``name`` and tag the version
    with its kind, weights' hash and ``tags``. No alias moves: the promotion gate decides that."""
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name=artifact_path, python_model=python_model, artifacts=artifacts,
                                       registered_model_name=name, pip_requirements=pip_requirements)
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in {**(tags or {}), KIND_TAG: kind, SHA_TAG: sha256}.items():
        client.set_model_version_tag(name, version, key, storage.redact_text(str(value)))
    return version


def record_run(client: MlflowClient, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, str],
               metrics: dict[str, float]) -> str:
    """A finished run written in one batch through ``client`` (no active run is touched); its id."""
    from mlflow.entities import Metric, Param

    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        try:
            experiment_id = client.create_experiment(experiment)
        except Exception:  # created meanwhile by a concurrent caller
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags=storage.redact_values(tags))
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     params=[Param(k, v) for k, v in flatten(params).items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id
