"""``medclipsam tune``: the text-driven settings of a task searched on Ray Tune against labelled cases."""

from __future__ import annotations

import click

from ..errors import MedClipSamError
from .common import fail, joining, task_config


@click.command()
@click.option("--config", "config_path", required=True, help="The task YAML to start from (configs/X.yaml).")
@click.option("--input", "input_uri", required=True,
              help="Labelled validation cases: a folder or URI prefix of images/volumes, or a manifest.")
@click.option("--gt", "gt_uri", default=None, help="Their ground-truth masks, paired by case_id.")
@click.option("--output", required=True, help="Where best.yaml, trials.csv, report.html and ray_tune/ go.")
@click.option("--space", "space_uri", default=None,
              help="YAML mapping settings to lists of values (saliency.*, coarse.*, visual_prompts.*, "
                   "text.prompts, text.clip_model) [default: the published grid, saliency.beta 0.1/1/2 x "
                   "saliency.layer 7/8/9].")
@click.option("--metric", type=click.Choice(["dsc", "nsd"]), default="dsc", show_default=True,
              help="The mean score of the final SAM masks that picks the best trial.")
@click.option("--max-trials", type=click.IntRange(1), default=None,
              help="Run at most this many points of the space, drawn at random (seeded) [default: all].")
@click.option("--address", default=None, help="Ray cluster address [default: the job's cluster, else a local Ray].")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI [default: the config's, $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db].")
@click.option("--experiment", default="medclipsam-tune", show_default=True, help="MLflow experiment.")
def tune(config_path, input_uri, gt_uri, output, space_uri, metric, max_trials, address, tracking_uri,
         experiment) -> None:
    """Grid-search a task's saliency (and prompt) settings on labelled cases; write the best as a task YAML."""
    from ..tune.search import tune_task

    def progress(number: int, total: int, trial: dict) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in trial.items() if k not in ("dsc", "nsd", "dsc_coarse")
                          and "." in k)
        click.echo(f"[{number}/{total}] {shown}: dsc {trial.get('dsc', float('nan')):.4f}, "
                   f"nsd {trial.get('nsd', float('nan')):.4f}, coarse dsc {trial.get('dsc_coarse', float('nan')):.4f}",
                   err=True)

    try:
        result = tune_task(config_path, input_uri, gt_uri, output, space_uri, metric, max_trials, tracking_uri,
                           experiment, progress=progress,
                           connect=joining(address, {"--input": input_uri, "--gt": gt_uri, "--output": output},
                                           task_config(config_path).pipeline.shared_filesystem))
    except MedClipSamError as exc:
        fail(str(exc), exc.exit_code)
    names = [k for k in result.best if "." in k]
    click.echo(f"{len(result.trials)} trial(s) in {result.seconds:.0f} s; M2IB ran for {result.m2ib_images} image(s)")
    click.echo("best: " + ", ".join(f"{k}={result.best[k]}" for k in names)
               + f" (mean {metric} {result.best[metric]:.4f}, coarse dsc {result.best['dsc_coarse']:.4f})")
    click.echo(f"best config: {result.best_config_uri}; report: {result.report_uri}; MLflow run {result.run_id}")
    click.echo(f"use it with: medclipsam pseudolabel --config {result.best_config_uri} ...")
