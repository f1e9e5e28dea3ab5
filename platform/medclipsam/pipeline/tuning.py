"""``medclipsam tune``: the text-driven settings of a task searched on Ray Tune, scored on labelled cases.

The published method picks beta and the bottleneck layer per task by a grid search scored by
Dice; this runs that search (optionally crossed with the coarse mask, the visual prompts, the
sentences and the CLIP model) as Ray Tune trials, each scoring the final SAM masks (and, beside
them, the coarse masks) of every labelled case.

Work is shared, not repeated. Two actors hold the models for the whole search:
``SaliencyService`` keeps the tokens before the bottleneck per (CLIP, layer, image) and every map
per (CLIP, saliency settings, sentences, image); ``SamService`` keeps SAM's embedding of every
image. A trial is a light task: it asks for its maps, turns them into coarse masks and prompts,
asks SAM for the masks, and scores them. The best settings are written as a complete task YAML.
"""

from __future__ import annotations

import contextlib
import copy
import html
import io
import itertools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import yaml

from .. import storage
from ..config import SaliencyConfig, SamConfig, TaskConfig, load_model, parse_config, parse_yaml
from ..domain.cohort import read_labelled_cohort
from ..domain.images import read_mask
from ..errors import InputError, ModelError, describe
from ..eval.evaluation import score_mask
from ..eval.metrics import dice
from ..ops.postprocess import binarise
from ..ops.slicing import assemble_mask
from ..prompts.from_saliency import prompts_from_saliency
from ..prompts.types import SlicePrompts
from ..runs.tracking import resolve_tracking_uri
from ..segment.sam import probability_for_prompts
from ..storage.access import reading
from ..storage.outputs import absolute_output
from .slices import SOURCE_TEXT, CaseTask, case_slices, reference_image

# The published grid: beta in {0.1, 1, 2} x bottleneck layer in {7, 8, 9}.
DEFAULT_SPACE: dict[str, list] = {"saliency.beta": [0.1, 1.0, 2.0], "saliency.layer": [7, 8, 9]}
TUNABLE = ("saliency.", "coarse.", "visual_prompts.", "text.prompts", "text.clip_model")
METRICS = ("dsc", "nsd")
Key = tuple[str, int]  # (case_id, slice); slice -1 for a 2D image


# -- the search space ------------------------------------------------------------------------------
def read_space(uri: str | None) -> dict[str, list]:
    """``{dotted.key: [values]}`` from a YAML mapping (the published grid without one)."""
    if uri is None:
        return dict(DEFAULT_SPACE)
    try:
        with reading(uri, "search space"):  # the store's own errors (credentials, endpoint) as one sentence
            raw = storage.read_bytes(uri)
    except OSError as exc:  # a missing or unreadable file
        raise InputError(f"{uri}: cannot read the search space ({describe(exc)})") from exc
    data = parse_yaml(raw, uri)
    if not isinstance(data, dict) or not data:
        raise InputError(f"{uri}: the search space must map setting names to lists of values")
    for key, values in data.items():
        if not any(key == t or key.startswith(t) for t in TUNABLE if t.endswith(".")) and key not in TUNABLE:
            raise InputError(f"{uri}: '{key}' cannot be tuned; the space takes saliency.*, coarse.*, "
                             "visual_prompts.*, text.prompts and text.clip_model")
        if not isinstance(values, list) or not values:
            raise InputError(f"{uri}: '{key}' needs a non-empty list of values")
    return data


def with_settings(base: dict, settings: dict) -> dict:
    """``base`` (a task config as a dict) with each dotted key of ``settings`` set."""
    out = copy.deepcopy(base)
    for dotted, value in settings.items():
        node = out
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {}) or {}
        node[last] = value
    return out


def trial_settings(space: dict[str, list], max_trials: int | None, seed: int = 0) -> list[dict]:
    """Every combination of the space, or ``max_trials`` of them drawn without repetition."""
    names = list(space)
    combos = [dict(zip(names, values, strict=True)) for values in itertools.product(*space.values())]
    if max_trials is not None and max_trials < len(combos):
        combos = random.Random(seed).sample(combos, max_trials)
    return combos


# -- the shared work ---------------------------------------------------------------------------------
class SaliencyService:
    """CLIP models, tokens and saliency maps for the search's images, each computed once."""

    def __init__(self, images: dict[Key, np.ndarray], device: str, tracking_uri: str = "") -> None:
        from ..saliency.maps import TokenCache

        if tracking_uri:  # a models:/ URI resolves against the driver's registry
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
        self.images, self.device = images, device
        self.clips: dict = {}
        self.tokens = TokenCache()
        self.maps: dict[tuple, np.ndarray | None] = {}
        self.computed = 0  # images M2IB ran for

    def maps_for(self, clip_uri: str, settings: dict, sentences: list[str], keys: list[Key],
                 cache: bool = True) -> dict[Key, np.ndarray | None]:
        """Maps in [0, 1] (None where M2IB found no contrast) for ``keys``."""
        from ..models.biomedclip import load_clip
        from ..saliency.maps import saliency_maps

        params = SaliencyConfig.model_validate(settings)
        what = (clip_uri, json.dumps(params.model_dump(exclude={"batch_size"}), sort_keys=True),
                json.dumps(sentences))
        missing = [k for k in keys if not cache or (what, k) not in self.maps]
        if missing:
            if clip_uri not in self.clips:
                self.clips[clip_uri] = load_clip(clip_uri, self.device)
            found = saliency_maps(self.clips[clip_uri], [self.images[k] for k in missing], sentences, params,
                                  keys=missing if cache else None, cache=self.tokens)
            self.computed += len(missing)
            for k, m in zip(missing, found, strict=True):
                self.maps[(what, k)] = None if m.constant else m.values
        return {k: self.maps[(what, k)] for k in keys}

    def m2ib_images(self) -> int:
        return self.computed


class SamService:
    """SAM with every image embedded once; decodes the prompts each trial sends."""

    def __init__(self, images: dict[Key, np.ndarray], settings: dict, device: str) -> None:
        from ..models.sam_backends import build_segmenter

        params = SamConfig.model_validate(settings)
        self.images = images
        self.segmenter = build_segmenter(params.backend, params.checkpoint, device)
        self.embeddings: dict[Key, object] = {}

    def masks_for(self, prompts: dict[Key, dict], settings: dict, cache: bool = True) -> dict[Key, np.ndarray]:
        params = SamConfig.model_validate(settings)
        out = {}
        for key, record in prompts.items():
            found = SlicePrompts.from_record(record)
            if found.is_empty():
                out[key] = np.zeros(self.images[key].shape[:2], bool)
                continue
            if not cache or key not in self.embeddings:
                self.embeddings[key] = self.segmenter.embed([self.images[key]], 1)[0]
            prob = probability_for_prompts(self.segmenter, self.embeddings[key], found, params)
            out[key] = binarise(prob, params.threshold, params.keep_components)
        return out


# -- one trial --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TuneCase:
    case_id: str
    keys: list[Key]
    geometry: str  # JSON, as the read stage records it
    axis: int


def score_settings(config: TaskConfig, cases: list[TuneCase], images: dict[Key, np.ndarray], truths: dict,
                   maps: dict[Key, np.ndarray | None], masks_for: Callable[[dict], dict[Key, np.ndarray]],
                   tolerance: float) -> dict[str, float]:
    """Mean DSC and NSD of the SAM masks (and DSC of the coarse masks) of ``cases`` under ``config``."""
    prompts, coarse = {}, {}
    for key, image in images.items():
        mask, found = prompts_from_saliency(image, maps[key], config.coarse, config.visual_prompts)
        coarse[key], prompts[key] = mask, found.to_record(precise=True)
    masks = masks_for(prompts)
    dscs, nsds, coarse_dscs = [], [], []
    for case in cases:
        image = reference_image(case.geometry)

        def assembled(planes: dict[Key, np.ndarray], case: TuneCase = case, image=image) -> np.ndarray:
            return assemble_mask(image, {(None if k[1] < 0 else k[1]): planes[k] for k in case.keys}, case.axis)

        scores = score_mask(assembled(masks) > 0, case.case_id, truths[case.case_id], tolerance)
        dscs.append(scores.dsc)
        nsds.append(scores.nsd)
        coarse_dscs.append(dice(assembled(coarse) > 0, truths[case.case_id].array > 0))
    return {"dsc": float(np.mean(dscs)), "nsd": float(np.mean(nsds)), "dsc_coarse": float(np.mean(coarse_dscs))}


def run_trial(settings: dict, base: dict, cases: list[TuneCase], images: dict, truths: dict, saliency, sam,
              tolerance: float, cache: bool) -> None:
    """A Ray Tune trial: the settings of one point of the space, scored; reported to Tune."""
    import ray
    from ray import tune

    config = parse_config(with_settings(base, settings["settings"]))
    keys = list(images)
    maps = ray.get(saliency.maps_for.remote(config.text.clip_model, config.saliency.model_dump(),
                                            list(config.text.prompts), keys, cache))
    sam_settings = config.sam.model_dump()
    scores = score_settings(config, cases, images, truths, maps,
                            lambda prompts: ray.get(sam.masks_for.remote(prompts, sam_settings, cache)), tolerance)
    tune.report(scores)


# -- the search -------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    output: str
    trials: list[dict]  # settings + scores, in trial order
    best: dict
    best_config_uri: str
    report_uri: str
    run_id: str
    m2ib_images: int  # images M2IB ran for, over the whole search
    seconds: float


def prepare_cases(config: TaskConfig, input_uri: str, gt_uri: str | None) -> tuple[list[TuneCase], dict, dict]:
    """The labelled cases read once: their slices (``images``) and truths; unlabelled ones are an error."""
    cases = read_labelled_cohort(input_uri, gt_uri, "tuning")
    tune_cases, images, truths = [], {}, {}
    for case in cases:
        rows = case_slices(CaseTask(case.case_id, case.uri, case.gt_uri), config.image, SOURCE_TEXT)
        if rows[0]["error"]:
            raise InputError(f"{case.uri}: {rows[0]['error']}")
        keys = [(case.case_id, int(r["slice"])) for r in rows]
        images.update({k: r["image"] for k, r in zip(keys, rows, strict=True)})
        truths[case.case_id] = read_mask(case.gt_uri)
        tune_cases.append(TuneCase(case.case_id, keys, rows[0]["geometry"], config.image.axis))
    return tune_cases, images, truths


def tune_task(config_uri: str, input_uri: str, gt_uri: str | None, output: str, space_uri: str | None = None,
              metric: str = "dsc", max_trials: int | None = None, tracking_uri: str | None = None,
              experiment: str = "medclipsam-tune", cache: bool = True,
              progress: Callable[[int, int, dict], None] | None = None,
              connect: Callable[[], None] | None = None) -> TuneResult:
    """Search the space on Ray Tune; write best.yaml, trials.csv and report.html under ``output``."""
    import ray


    start = time.perf_counter()
    if metric not in METRICS:
        raise InputError(f"--metric must be one of {', '.join(METRICS)}")
    base_config = load_model(config_uri, TaskConfig)
    if base_config.text is None:
        raise InputError(f"{config_uri}: tuning needs a text section (the sentences and the CLIP model)")
    base = base_config.model_dump(mode="json")
    space = read_space(space_uri)
    combos = trial_settings(space, max_trials)
    for combo in combos:  # every point of the space must be a valid config before anything runs
        parse_config(with_settings(base, combo), f"{space_uri or 'the default space'} at {combo}")
    output = absolute_output(output)
    cases, images, truths = prepare_cases(base_config, input_uri, gt_uri)
    if connect is not None:
        connect()
    elif not ray.is_initialized():
        ray.init()
    p = base_config.pipeline
    needed = p.saliency.num_cpus + p.sam.num_cpus + p.task_cpus
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    if cpus + 1e-9 < needed:
        raise InputError(f"the search needs {needed:g} CPUs (pipeline.saliency.num_cpus + pipeline.sam.num_cpus "
                         f"+ one trial's pipeline.task_cpus) and Ray has {cpus:g}; lower those settings")
    if gpus + 1e-9 < p.saliency.num_gpus + p.sam.num_gpus:
        raise InputError(f"pipeline.saliency.num_gpus + pipeline.sam.num_gpus ask for "
                         f"{p.saliency.num_gpus + p.sam.num_gpus:g} GPUs and Ray has {gpus:g}")
    saliency = ray.remote(SaliencyService).options(num_cpus=p.saliency.num_cpus, num_gpus=p.saliency.num_gpus).remote(
        images, "cuda" if p.saliency.num_gpus > 0 else base_config.sam.device,
        resolve_tracking_uri(tracking_uri or base_config.tracking.uri))
    sam = ray.remote(SamService).options(num_cpus=p.sam.num_cpus, num_gpus=p.sam.num_gpus).remote(
        images, base_config.sam.model_dump(), "cuda" if p.sam.num_gpus > 0 else base_config.sam.device)

    search = Search(config_uri, input_uri, output, base, base_config, space, combos, cases, images, truths, metric,
                    cache, tracking_uri, experiment)
    try:
        return _search(search, saliency, sam, progress, start)
    finally:  # the services hold CPUs (and GPUs): a later search in this process needs them back
        for actor in (saliency, sam):
            ray.kill(actor)


@dataclass
class Search:
    """What a search runs on, checked and read before Ray is joined."""

    config_uri: str
    input_uri: str
    output: str
    base: dict  # the start config as a dict
    base_config: TaskConfig
    space: dict[str, list]
    combos: list[dict]
    cases: list[TuneCase]
    images: dict[Key, np.ndarray]
    truths: dict
    metric: str
    cache: bool
    tracking_uri: str | None
    experiment: str


def _search(search: Search, saliency, sam, progress, start: float) -> TuneResult:
    import mlflow
    import ray
    from ray import tune

    from ..runs.tracking import flatten

    base, base_config, space, combos = search.base, search.base_config, search.space, search.combos
    cases, images, truths, output, metric = search.cases, search.images, search.truths, search.output, search.metric
    p = base_config.pipeline
    done: list[dict] = []

    class Progress(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            done.append(trial.last_result or {})
            if progress:
                progress(len(done), len(combos), {**trial.config["settings"], **(trial.last_result or {})})

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, cases=cases, images=images, truths=truths, saliency=saliency,
                             sam=sam, tolerance=p.nsd_tolerance, cache=search.cache),
        {"cpu": p.task_cpus})
    tuner = tune.Tuner(trainable, param_space={"settings": tune.grid_search(combos)},
                       tune_config=tune.TuneConfig(metric=metric, mode="max"),
                       run_config=tune.RunConfig(name="tune", storage_path=storage.join(output, "ray_tune"),
                                                 verbose=0, callbacks=[Progress()]))
    with contextlib.redirect_stdout(io.StringIO()):  # Tune prints where its files are; ours says so below
        grid = tuner.fit()
    by_settings = {}
    for result in grid:
        if result.error is not None:
            first = str(result.error).strip().splitlines()[-1] if str(result.error).strip() else "unknown error"
            raise ModelError(f"trial {result.config['settings']} failed: {first}")
        by_settings[json.dumps(result.config["settings"], sort_keys=True)] = {
            k: float(result.metrics[k]) for k in ("dsc", "nsd", "dsc_coarse")}
    trials = [{"trial": number, **combo, **by_settings[json.dumps(combo, sort_keys=True)]}
              for number, combo in enumerate(combos)]  # in the order of the space
    best = max(trials, key=lambda t: (t[metric], -t["trial"]))  # ties: the earliest trial
    m2ib = int(ray.get(saliency.m2ib_images.remote()))
    best_config = parse_config(with_settings(base, {k: best[k] for k in space}))
    best_uri = storage.join(output, "best.yaml")
    header = (f"# medclipsam tune: best of {len(trials)} trial(s) by mean {metric} = {best[metric]:.4f} on "
              f"{len(cases)} labelled case(s) of {search.input_uri}\n")
    storage.write_bytes_atomic(best_uri, (header + yaml.safe_dump(best_config.model_dump(mode="json"),
                                                                  sort_keys=False)).encode())
    _write_table(trials, storage.join(output, "trials.csv"))
    report_uri = storage.join(output, "report.html")
    storage.write_bytes_atomic(report_uri, _report(trials, list(space), metric, best).encode())

    mlflow.set_tracking_uri(resolve_tracking_uri(search.tracking_uri or base_config.tracking.uri))
    mlflow.set_experiment(search.experiment)
    with mlflow.start_run(run_name=f"tune-{base_config.task}") as parent:
        mlflow.log_params(flatten({"config": search.config_uri, "input": search.input_uri, "metric": metric,
                                   "n_trials": len(trials), "n_cases": len(cases), "space": json.dumps(space)}))
        for trial in trials:
            with mlflow.start_run(run_name=f"trial-{trial['trial']}", nested=True):
                mlflow.log_params({k: json.dumps(trial[k]) if not isinstance(trial[k], (int, float, str))
                                   else trial[k] for k in space})
                mlflow.log_metrics({k: trial[k] for k in ("dsc", "nsd", "dsc_coarse")})
        mlflow.log_metrics({f"best_{k}": best[k] for k in ("dsc", "nsd", "dsc_coarse")} | {"m2ib_images": m2ib})
        mlflow.log_text(storage.read_bytes(best_uri).decode(), "best.yaml")
        run_id = parent.info.run_id
    return TuneResult(output, trials, best, best_uri, report_uri, run_id, m2ib, time.perf_counter() - start)


def _write_table(trials: list[dict], uri: str) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rows = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in t.items()} for t in trials]
    buffer = io.BytesIO()
    pacsv.write_csv(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes_atomic(uri, buffer.getvalue())


def _report(trials: list[dict], names: list[str], metric: str, best: dict) -> str:
    columns = ["trial", *names, "dsc", "nsd", "dsc_coarse"]

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if math.isfinite(value) else ""
        return html.escape(json.dumps(value) if isinstance(value, (list, dict)) else str(value))

    rows = sorted(trials, key=lambda t: -t[metric])
    body = "".join("<tr" + (" class='best'" if t is best else "") + ">" + "".join(f"<td>{cell(t[c])}</td>"
                   for c in columns) + "</tr>" for t in rows)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>medclipsam tune</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:3px 8px}.best{background:#dfd}</style></head><body><h1>Trials</h1>"
            f"<p>{len(trials)} trial(s), sorted by mean {metric} of the SAM masks; dsc_coarse is the coarse "
            "masks' mean DSC. The best (green) is written to best.yaml.</p><table><tr>"
            + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>" + body + "</table></body></html>")
