"""A registered version scored on a labelled set, through the code a run uses: the text-driven
pipeline for a CLIP model (with a task config) and for a registered pipeline (with its own),
``weak predict`` for a weak-stage ensemble.

Every version of a comparison goes through the same plan: same cases, same settings. A case that
fails or gets no mask scores 0, so a model cannot win by failing on the hard cases.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from .. import storage
from ..config import TaskConfig
from ..domain.records import CaseRecord
from ..errors import InputError, ModelError, first_line
from ..pipeline.job import Job
from ..pipeline.run import run_job
from ..pipeline.slices import SOURCE_TEXT
from ..runs.tracking import KIND_CLIP, KIND_PIPELINE, KIND_TAG, KIND_WEAK, KINDS
from ..weak.predict import run_weak_predict
from ..weak.settings import WeakConfig
from .evalset import EvalSet
from .pipelines import load_pipeline

METRICS = ("dsc", "nsd")  # higher is better for both


@dataclass(frozen=True)
class Score:
    version: str
    dsc: float  # mean over every case of the set, failures counted as 0
    nsd: float
    n_cases: int
    n_failed: int  # cases without a score (an error, no mask written)

    def value(self, metric: str) -> float:
        return float(getattr(self, metric))


@dataclass
class EvalPlan:
    """How versions of one registered model are evaluated."""

    name: str
    kind: str
    eval_set: EvalSet
    tracking_uri: str
    task_config: TaskConfig | None = None  # CLIP models: the task (prompts and every setting)
    weak_config: WeakConfig | None = None  # weak ensembles: the prediction settings
    runner: str = "local"  # or "ray"
    connect: Callable[[], None] | None = None
    work_dir: str | None = None  # keep each evaluation's output here (a rerun resumes it); default: temporary
    progress: Callable[[int, int, CaseRecord], None] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelError(f"model {self.name}: unknown kind '{self.kind}'")
        if self.kind == KIND_CLIP and self.task_config is None:
            raise InputError(f"{self.name} is a CLIP model: give --config TASK (its prompts and settings) to "
                             "evaluate it")
        if self.kind == KIND_CLIP and self.task_config.text is None:
            raise InputError("the task config has no text section: the evaluation runs the text-driven pipeline")
        if self.kind == KIND_PIPELINE and self.task_config is not None:
            raise InputError(f"{self.name} is a registered pipeline: it brings its own config; drop --config")

    def key(self) -> str:
        """Names the comparison: kind, settings and evaluation set (the scores' tags carry it)."""
        settings = {"kind": self.kind, "eval_set": self.eval_set.sha256,
                    "task": _without_model(self.task_config), "weak": self.weak_config.prediction.model_dump()
                    if self.weak_config else None}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _without_model(config: TaskConfig | None) -> dict | None:
    if config is None:
        return None
    data = config.model_dump(mode="json", exclude={"tracking", "pipeline", "description"})
    data.get("text", {}).pop("clip_model", None)  # the model is what the comparison varies
    data["sam"].pop("device", None)
    data["sam"].pop("batch_size", None)
    data["sam"].pop("runtime", None)  # how the encoder runs, not what it computes (checked to 1e-4)
    return data


def model_kind(client, name: str, version: str) -> str:
    """The kind a version was registered as (its tag; older versions by the files they hold)."""
    try:
        found = client.get_model_version(name, version)
    except Exception as exc:
        raise ModelError(f"model {name} has no version {version} ({first_line(exc)})") from exc
    kind = (found.tags or {}).get(KIND_TAG) or (found.tags or {}).get("kind")
    if kind in KINDS:
        return kind
    from ..storage.registered import fetch_registered

    folder = fetch_registered(f"models:/{name}/{version}")
    for marker, guess in (("ensemble.json", KIND_WEAK), ("pipeline.yaml", KIND_PIPELINE),
                          ("open_clip_config.json", KIND_CLIP)):
        if any(folder.rglob(marker)):
            return guess
    raise ModelError(f"models:/{name}/{version}: neither a CLIP model, a weak ensemble nor a pipeline")


def evaluate_version(plan: EvalPlan, version: str) -> Score:
    """Run ``models:/NAME/version`` over the evaluation set and score it."""
    uri = f"models:/{plan.name}/{version}"
    keep = plan.work_dir is not None
    output = storage.join(plan.work_dir, f"{plan.name}-v{version}-{plan.key()}") if keep else \
        tempfile.mkdtemp(prefix="medclipsam-eval-")
    try:
        if plan.kind == KIND_WEAK:
            config = _tracked(plan.weak_config or WeakConfig(), plan.tracking_uri)
            result = run_weak_predict(uri, plan.eval_set.input_uri, output, config, plan.eval_set.gt_uri,
                                      runner=plan.runner, tracking_uri=plan.tracking_uri, progress=plan.progress,
                                      connect=plan.connect)
            records = _whole_output(output, list(result.records))
        else:
            config = _tracked(plan.task_config if plan.kind == KIND_CLIP else load_pipeline(uri).config,
                              plan.tracking_uri)
            job = Job(config, plan.eval_set.input_uri, output, SOURCE_TEXT, plan.eval_set.gt_uri,
                      clip_uri=uri if plan.kind == KIND_CLIP else None)
            result = run_job(job, plan.runner, plan.progress, resume=keep, track=False, connect=plan.connect)
            records = list(result.records)  # read now: the output may be removed below
    finally:
        if not keep:
            shutil.rmtree(output, ignore_errors=True)
    return score_records(version, records, len(plan.eval_set.cases))


def _whole_output(output: str, fresh: list[CaseRecord]) -> list[CaseRecord]:
    from ..domain.records import read_records

    every = read_records(output)
    return list(every.values()) if every else fresh


def score_records(version: str, records: list[CaseRecord], n_cases: int) -> Score:
    """Means over all ``n_cases``: a case with no finite score (or no record) counts as 0."""
    dsc = [r.dsc for r in records if math.isfinite(r.dsc)]
    nsd = [r.nsd if math.isfinite(r.nsd) else 0.0 for r in records if math.isfinite(r.dsc)]
    n = max(n_cases, 1)
    return Score(version, sum(dsc) / n, sum(nsd) / n, n_cases, n_cases - len(dsc))


def _tracked(config, tracking_uri: str):
    """The config with its registry pointed at the gate's (a task or a weak config)."""
    return config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": tracking_uri})})
