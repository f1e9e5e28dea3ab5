"""The search: Ray Tune runs a trial per point of the space against the two services; the best
point is written as a complete task YAML beside trials.csv and report.html, and MLflow records a
parent run with one nested run per trial."""

from __future__ import annotations

import contextlib
import html
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import yaml

from .. import storage
from ..config import TaskConfig, load_model
from ..errors import InputError, ModelError
from ..eval.report import html_page, html_row, html_table
from ..runs.ray_session import ensure_ray, pool_device
from ..runs.tracking import active_run, log_metrics, log_params, log_text, nested_run, resolve_tracking_uri, use_store
from .services import SaliencyService, SamService
from .space import METRICS, check_points, read_space, trial_config, trial_settings
from .trial import SCORES, TuneCase, prepare_cases, run_trial, slice_images


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
    metric: str
    cache: bool
    tracking_uri: str | None
    experiment: str


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
    check_points(base, combos, space_uri)
    search = Search(config_uri, input_uri, storage.absolute(output), base, base_config, space, combos,
                    prepare_cases(base_config, input_uri, gt_uri), metric, cache, tracking_uri, experiment)
    ensure_ray(connect)
    _check_resources(base_config)
    saliency, sam = _services(search)
    try:
        return _search(search, saliency, sam, progress, start)
    finally:  # the services hold CPUs (and GPUs): a later search in this process needs them back
        for actor in (saliency, sam):
            ray.kill(actor)


def _check_resources(config: TaskConfig) -> None:
    import ray

    p = config.pipeline
    needed = p.saliency.num_cpus + p.sam.num_cpus + p.task_cpus
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    if cpus + 1e-9 < needed:
        raise InputError(f"the search needs {needed:g} CPUs (pipeline.saliency.num_cpus + pipeline.sam.num_cpus "
                         f"+ one trial's pipeline.task_cpus) and Ray has {cpus:g}; lower those settings")
    if gpus + 1e-9 < p.saliency.num_gpus + p.sam.num_gpus:
        raise InputError(f"pipeline.saliency.num_gpus + pipeline.sam.num_gpus ask for "
                         f"{p.saliency.num_gpus + p.sam.num_gpus:g} GPUs and Ray has {gpus:g}")


def _services(search: Search):
    """The two actors, each holding its models and caches for the whole search."""
    import ray

    c = search.base_config
    p = c.pipeline
    saliency = ray.remote(SaliencyService).options(num_cpus=p.saliency.num_cpus, num_gpus=p.saliency.num_gpus).remote(
        slice_images(search.cases), pool_device(p.saliency.num_gpus, c.sam.device),
        resolve_tracking_uri(search.tracking_uri or c.tracking.uri))
    sam = ray.remote(SamService).options(num_cpus=p.sam.num_cpus, num_gpus=p.sam.num_gpus).remote(
        [r for case in search.cases for r in case.rows], c.sam.model_dump(), pool_device(p.sam.num_gpus, c.sam.device))
    return saliency, sam


def _run_trials(search: Search, saliency, sam, progress) -> list[dict]:
    """Every point of the space as a Tune trial; settings + scores in the order of the space."""
    from ray import tune

    done: list[dict] = []
    p = search.base_config.pipeline

    class Progress(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            done.append(trial.last_result or {})
            if progress:
                progress(len(done), len(search.combos), {**trial.config["settings"], **(trial.last_result or {})})

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=search.base, cases=search.cases, saliency=saliency, sam=sam,
                             tolerance=p.nsd_tolerance, cache=search.cache),
        {"cpu": p.task_cpus})
    tuner = tune.Tuner(trainable, param_space={"settings": tune.grid_search(search.combos)},
                       tune_config=tune.TuneConfig(metric=search.metric, mode="max"),
                       run_config=tune.RunConfig(name="tune", storage_path=storage.join(search.output, "ray_tune"),
                                                 verbose=0, callbacks=[Progress()]))
    with contextlib.redirect_stdout(io.StringIO()):  # Tune prints where its files are; ours says so below
        grid = tuner.fit()
    by_settings = {}
    for result in grid:
        if result.error is not None:
            first = str(result.error).strip().splitlines()[-1] if str(result.error).strip() else "unknown error"
            raise ModelError(f"trial {result.config['settings']} failed: {first}")
        by_settings[json.dumps(result.config["settings"], sort_keys=True)] = {
            k: float(result.metrics[k]) for k in SCORES}
    return [{"trial": number, **combo, **by_settings[json.dumps(combo, sort_keys=True)]}
            for number, combo in enumerate(search.combos)]


def _search(search: Search, saliency, sam, progress, start: float) -> TuneResult:
    import ray

    trials = _run_trials(search, saliency, sam, progress)
    metric, output = search.metric, search.output
    best = max(trials, key=lambda t: (t[metric], -t["trial"]))  # ties: the earliest trial
    m2ib = int(ray.get(saliency.m2ib_images.remote()))
    best_config = trial_config(search.base, {k: best[k] for k in search.space})
    best_uri = storage.join(output, "best.yaml")
    header = (f"# medclipsam tune: best of {len(trials)} trial(s) by mean {metric} = {best[metric]:.4f} on "
              f"{len(search.cases)} labelled case(s) of {search.input_uri}\n")
    best_text = header + yaml.safe_dump(best_config.model_dump(mode="json"), sort_keys=False)
    storage.write_bytes_atomic(best_uri, best_text.encode())
    _write_table(trials, storage.join(output, "trials.csv"))
    report_uri = storage.join(output, "report.html")
    storage.write_bytes_atomic(report_uri, _report(trials, list(search.space), metric, best).encode())
    run_id = _log_search(search, trials, best, m2ib, best_text)
    return TuneResult(output, trials, best, best_uri, report_uri, run_id, m2ib, time.perf_counter() - start)


def _log_search(search: Search, trials: list[dict], best: dict, m2ib: int, best_text: str) -> str:
    """The search as an MLflow parent run with one nested run per trial; the parent's id."""
    use_store(search.tracking_uri or search.base_config.tracking.uri)
    params = {"config": search.config_uri, "input": search.input_uri, "metric": search.metric,
              "n_trials": len(trials), "n_cases": len(search.cases), "space": json.dumps(search.space)}
    with active_run(search.experiment, f"tune-{search.base_config.task}", params=params) as run_id:
        for trial in trials:
            with nested_run(f"trial-{trial['trial']}"):
                log_params({k: trial[k] if isinstance(trial[k], (int, float, str)) else json.dumps(trial[k])
                            for k in search.space})
                log_metrics({k: trial[k] for k in SCORES})
        log_metrics({f"best_{k}": best[k] for k in SCORES} | {"m2ib_images": m2ib})
        log_text(best_text, "best.yaml")
    return run_id


def _write_table(trials: list[dict], uri: str) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rows = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in t.items()} for t in trials]
    buffer = io.BytesIO()
    pacsv.write_csv(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes_atomic(uri, buffer.getvalue())


def _report(trials: list[dict], names: list[str], metric: str, best: dict) -> str:
    """The trials as a page of the run report's kind, best first."""
    columns = ["trial", *names, *SCORES]

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if math.isfinite(value) else ""
        return html.escape(json.dumps(value) if isinstance(value, (list, dict)) else str(value))

    rows = [html_row([cell(t[c]) for c in columns], "best" if t is best else "")
            for t in sorted(trials, key=lambda t: -t[metric])]
    body = [f"<h1>Trials</h1><p>{len(trials)} trial(s), sorted by mean {metric} of the SAM masks; dsc_coarse is "
            "the coarse masks' mean DSC. The best (green) is written to best.yaml.</p>" + html_table(columns, rows)]
    return html_page("medclipsam tune", body, extra_style=".best{background:#dfd}")
