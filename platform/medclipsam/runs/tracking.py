"""Where MLflow runs go, and settings flattened into MLflow params."""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARAM_LIMIT = 6000  # characters of one MLflow param value

# Tags on a model version: which kind of model it is (how the promotion gate evaluates it), and the
# SHA-256 of its weights.
KIND_TAG, SHA_TAG = "medclipsam.kind", "medclipsam.weights_sha256"
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


def flatten(settings: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists as JSON, so each value fits one MLflow param."""
    flat: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            # MLflow refuses a param over 6000 characters (a long prompt): keep its head, say it was cut
            flat[name] = text if len(text) <= PARAM_LIMIT else text[: PARAM_LIMIT - 20] + " ...(truncated)"
    return flat


