"""A whole pipeline as a registered model: the task config with every model pinned to an exact
version or weights hash, so ``pseudolabel --pipeline models:/NAME@champion`` reruns it exactly, and
refuses to run if a pinned weights file has changed since.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import storage
from ..config import TaskConfig, parse_config
from ..errors import InputError, ModelError
from ..models.biomedclip import clip_weights_sha256
from ..models.sam_backends import checkpoint_sha256
from ..runs import tracking
from ..runs.tracking import KIND_PIPELINE
from ..storage.registered import RegisteredRef, fetch_registered, is_registered, resolve_registered

PIPELINE_FILE, PINS_FILE = "pipeline.yaml", "pins.json"
PIPELINE_EXPERIMENT = "medclipsam-pipelines"


@dataclass(frozen=True)
class RegisteredPipeline:
    config: TaskConfig  # every model in it pinned
    pins: dict  # what each model was pinned to: uri, registry version, weights' SHA-256
    ref: RegisteredRef | None = None  # the pipeline's own registry version


def pin_pipeline(config: TaskConfig, source: str = "") -> RegisteredPipeline:
    """The config with its CLIP model pinned to a version (``models:/NAME/V``) and every weights hash."""
    if config.text is None:
        raise InputError(f"{source or 'the config'}: a registered pipeline is text-driven; the config needs a text "
                         "section (the prompts and the CLIP model)")
    clip = {"requested": config.text.clip_model, "uri": config.text.clip_model, "version": ""}
    if is_registered(clip["uri"]):
        ref = resolve_registered(clip["uri"])
        clip.update(uri=ref.uri, version=ref.version)
    clip["sha256"] = clip_weights_sha256(clip["uri"])
    sam = {"backend": config.sam.backend, "checkpoint": config.sam.checkpoint or "",
           "sha256": checkpoint_sha256(config.sam.backend, config.sam.checkpoint)}
    pinned = config.model_copy(update={"text": config.text.model_copy(update={"clip_model": clip["uri"]})})
    return RegisteredPipeline(pinned, {"clip": clip, "sam": sam, "source": source})


def register_pipeline(name: str, config: TaskConfig, source: str) -> tuple[str, RegisteredPipeline]:
    """Pin the config's models and register the result as a new version of ``name`` (tracking URI: MLflow's)."""
    from . import pipeline_model

    pipeline = pin_pipeline(config, source)
    # recorded redacted: a credential in a model URI never reaches the registry (users pass it by environment)
    text = yaml.safe_dump(storage.redact_values(pipeline.config.model_dump(mode="json")), sort_keys=False)
    pipeline = RegisteredPipeline(pipeline.config, storage.redact_values(pipeline.pins), pipeline.ref)
    with tempfile.TemporaryDirectory(prefix="medclipsam-pipeline-") as tmp:
        folder = Path(tmp) / "pipeline"
        folder.mkdir()
        (folder / PIPELINE_FILE).write_text(text)
        (folder / PINS_FILE).write_text(json.dumps(pipeline.pins, indent=2))
        with tracking.active_run(PIPELINE_EXPERIMENT, f"pipeline {name}",
                                 params={"pins": pipeline.pins, "task": pipeline.config.task}) as run_id:
            pass
        version = tracking.register_version(run_id, name, "pipeline", pipeline_model.__file__,
                                            {"pipeline": str(folder)}, ["medclipsam"], KIND_PIPELINE,
                                            _pipeline_sha256(text, pipeline.pins))
    return version, pipeline


def _pipeline_sha256(text: str, pins: dict) -> str:
    """The hash a registered pipeline is tagged with, and checked against when it is fetched."""
    import hashlib

    return hashlib.sha256((text + json.dumps(pins)).encode()).hexdigest()


def load_pipeline(uri: str) -> RegisteredPipeline:
    """A registered pipeline (``models:/NAME@alias`` or ``/version``), its pins checked against the weights now."""
    ref = resolve_registered(uri)

    def pipeline_file(folder: Path) -> Path:
        found = sorted(folder.rglob(PIPELINE_FILE))
        if not found:
            raise ModelError(f"model {uri}: holds no {PIPELINE_FILE} (not a registered pipeline?)")
        return found[0]

    def digest(folder: Path) -> str:  # as register_pipeline hashed it
        found = pipeline_file(folder)
        return _pipeline_sha256(found.read_text(), json.loads((found.parent / PINS_FILE).read_text()))

    found = pipeline_file(fetch_registered(ref.uri, digest))
    config = parse_config(yaml.safe_load(found.read_text()), f"{uri} ({PIPELINE_FILE})")
    pins = json.loads((found.parent / PINS_FILE).read_text())
    clip_now = clip_weights_sha256(config.text.clip_model)
    if clip_now != pins["clip"]["sha256"]:
        raise ModelError(f"pipeline {ref.uri}: its CLIP model {config.text.clip_model} had weights "
                         f"{pins['clip']['sha256'][:12]}... when registered and has {clip_now[:12]}... now; "
                         "the pipeline cannot be reproduced")
    sam_now = checkpoint_sha256(config.sam.backend, config.sam.checkpoint)
    if sam_now != pins["sam"]["sha256"]:
        raise ModelError(f"pipeline {ref.uri}: its SAM weights ({config.sam.backend}, "
                         f"{config.sam.checkpoint or 'the default checkpoint'}) had SHA-256 "
                         f"{pins['sam']['sha256'][:12]}... when registered and {sam_now[:12]}... now; "
                         "the pipeline cannot be reproduced")
    return RegisteredPipeline(config, pins, ref)
