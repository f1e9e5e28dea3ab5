"""``run.json``: the settings an output was written with, the models pinned for it, the MLflow run
that tracks it and the figures of every attempt on it.

A rerun on the same output is a resume only with the same settings: otherwise the output would
mix masks made two ways. The file is written when the run starts (so a killed run still guards
its output) and again at the end, with the new attempt's figures.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from .. import storage
from ..errors import InputError
from ..storage.outputs import RUN_FILE
from .pins import ModelPin


def _digest(parameters: str) -> str:
    return hashlib.sha256(parameters.encode()).hexdigest()


def check_settings(output: str, parameters: str, pins: tuple[ModelPin, ...] = ()) -> dict | None:
    """The previous ``run.json`` of ``output`` (None for a new one); changed settings are refused."""
    run_file = storage.join(output, RUN_FILE)
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


def previous_attempts(previous: dict | None) -> list[dict]:
    """The figures of the earlier attempts on this output, oldest first."""
    return list((previous or {}).get("attempts", []))


def write_run_file(output: str, parameters: str, pins: tuple[ModelPin, ...], attempts: list[dict],
                   run_id: str = "", tracking_uri: str = "") -> None:
    """Every URI in it is recorded redacted: a credential never reaches the output (the settings'
    hash is of the settings as given, so a resume is checked against them exactly)."""
    storage.write_bytes_atomic(storage.join(output, RUN_FILE), json.dumps(storage.redact_values({
        "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
        "settings_sha256": _digest(parameters), "settings": json.loads(parameters),
        "models": [asdict(p) for p in pins], "attempts": attempts}), indent=2).encode())
