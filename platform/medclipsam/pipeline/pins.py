"""The models a run uses, pinned at its start: a ``models:/NAME@alias`` is resolved once to the
version it names then, and the weights' SHA-256 is recorded with it (``run.json``, MLflow params,
the manifest's ``clip_model`` column).
"""

from __future__ import annotations

from dataclasses import replace

from ..models.biomedclip import clip_weights_sha256
from ..runs.pins import ModelPin
from ..runs.tracking import resolve_tracking_uri
from ..storage.registered import is_registered, resolve_registered
from .job import Job
from .slices import SOURCE_TEXT


def pin_models(job: Job) -> tuple[Job, tuple[ModelPin, ...]]:
    """The job with every registry URI pinned to a version, and what was pinned.

    Only text-driven runs load a CLIP model; the SAM checkpoint's hash is recorded per case by the
    SAM stage.
    """
    if job.source != SOURCE_TEXT or not is_registered(job.clip):
        return job, job.pins
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(job.config.tracking.uri))
    ref = resolve_registered(job.clip)
    pin = ModelPin("clip", job.clip, ref.uri, ref.version, clip_weights_sha256(ref.uri))
    return replace(job, clip_uri=ref.uri), (*job.pins, pin)
