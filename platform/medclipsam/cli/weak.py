"""``medclipsam weak train`` and ``medclipsam weak predict``: nnU-Net on the pseudo-labels
(MedCLIP-SAMv2's weakly supervised stage), trained on Ray Train, applied to a cohort on Ray Data."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ..errors import MedClipSamError
from .common import (
    CaseProgress,
    cohort_options,
    exit_for_errors,
    fail,
    joining,
    print_scores,
    strict_option,
)


@click.group()
def weak() -> None:
    """Weak supervision: train an nnU-Net ensemble on pseudo-labels, predict a cohort with it."""


def _weak_config(config_path: str | None, **overrides):
    """The weak config (a file, else the published settings) with the command line's options applied."""
    from ..config import parse_model
    from ..weak.settings import WeakConfig, load_weak_config

    config = load_weak_config(config_path)
    changes = {section: {k: v for k, v in values.items() if v is not None} for section, values in overrides.items()}
    merged = config.model_dump()
    for section, values in changes.items():
        merged[section].update(values)
    return parse_model(merged, WeakConfig, config_path or "the weak settings and options")


@weak.command()
@click.option("--pseudo", default=None,
              help="A pseudolabel run's output: its ok cases and their masks are the training set.")
@click.option("--images", default=None, help="Training images (folder or URI prefix), with --labels.")
@click.option("--labels", default=None, help="Their labels, paired with --images by case_id.")
@click.option("--output", required=True,
              help="Where the ensemble goes (<output>/ensemble/); run again with the same output to resume.")
@click.option("--config", "config_path", default=None,
              help="Weak-supervision YAML (configs/weak.yaml, configs/weak_cpu_smoke.yaml) [default: the "
                   "published settings].")
@click.option("--epochs", type=click.IntRange(1), default=None, help="E [default: the config's, 600].")
@click.option("--cycles", type=click.IntRange(1), default=None, help="C [default: 3].")
@click.option("--keep-per-cycle", type=click.IntRange(1), default=None, help="k checkpoints per cycle [default: 10].")
@click.option("--iterations-per-epoch", type=click.IntRange(1), default=None, help="[default: 250].")
@click.option("--min-mask-pixels", type=click.IntRange(0), default=None,
              help="Skip training cases whose mask has fewer foreground pixels [default: 1].")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Ray Train workers, one GPU each (nnU-Net's DDP); more than one needs --gpu.")
@click.option("--gpu", is_flag=True, help="Train on GPUs.")
@click.option("--register", default=None,
              help="Register the ensemble in MLflow under this model name (a new version; `medclipsam models "
                   "promote` moves champion to it if it wins).")
@click.option("--work-dir", default=None,
              help="Local folder for nnU-Net's raw, preprocessed and results folders (kept for a rerun) "
                   "[default: ~/.cache/medclipsam/weak/<hash of --output>].")
@click.option("--address", default=None, help="Ray cluster address [default: the job's cluster, else a local Ray].")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI [default: the config's, $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db].")
def train(pseudo, images, labels, output, config_path, epochs, cycles, keep_per_cycle, iterations_per_epoch,
          min_mask_pixels, workers, gpu, register, work_dir, address, tracking_uri) -> None:
    """Train nnU-Net (2d, fold all) with a cyclic lr on pseudo-labels and keep the checkpoint ensemble."""
    if (pseudo is None) == (images is None):
        fail("give either --pseudo RUN_OUTPUT or --images DIR with --labels DIR")
    if images is not None and labels is None:
        fail("--images needs --labels (the masks to train on, paired by case_id)")
    if workers > 1 and not gpu:
        fail("--workers > 1 needs --gpu: nnU-Net's data parallelism is one GPU per worker")
    from ..weak.dataset import cases_from_folders, cases_from_pseudo
    from ..weak.training import run_weak_training

    try:
        config = _weak_config(config_path, training={"epochs": epochs, "cycles": cycles,
                                                     "keep_per_cycle": keep_per_cycle,
                                                     "iterations_per_epoch": iterations_per_epoch},
                              data={"min_mask_pixels": min_mask_pixels}, tracking={"uri": tracking_uri})
        cases, skipped = cases_from_pseudo(pseudo) if pseudo else cases_from_folders(images, labels)
        if not cases:
            fail(f"{pseudo or images}: no training cases ({len(skipped)} skipped)")
        result = run_weak_training(cases, skipped, output, config, pseudo or f"{images} + {labels}", workers, gpu,
                                   register, progress=lambda line: click.echo(line, err=True),
                                   # the workers write the members there, from any node
                                   connect=joining(address, {"--output": output}, config.shared_filesystem),
                                   work=Path(work_dir).resolve() if work_dir else None)
    except MedClipSamError as exc:
        fail(str(exc), exc.exit_code)
    _print_training(result, register)


def _print_training(result, register: str | None) -> None:
    """What weak train made: the skipped cases, the last epoch, the ensemble, the registered version."""
    if result.skipped:
        shown = "; ".join(f"{k}: {v}" for k, v in list(result.skipped.items())[:5])
        click.echo(f"skipped {len(result.skipped)} case(s): {shown}{' ...' if len(result.skipped) > 5 else ''}")
    final = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if isinstance(v, float))
    click.echo(f"trained on {len(result.cases)} case(s) in {result.seconds:.0f} s; last epoch: {final}")
    click.echo(f"ensemble: {result.ensemble_uri} ({len(result.members)} cycle members + checkpoint_final); "
               f"MLflow run {result.run_id}")
    if result.model_uri:
        click.echo(f"registered {result.model_uri}; promote it with: medclipsam models promote {register} "
                   f"--version {result.version} --eval-set LABELLED_SET")


@weak.command()
@click.option("--model", required=True,
              help="The ensemble: the --output folder of weak train (or its ensemble/ folder; local or URI), or "
                   "models:/NAME@alias.")
@click.option("--input", "input_uri", required=True,
              help="Cohort: a folder or URI prefix of images/volumes, or a manifest (.csv/.parquet).")
@click.option("--output", required=True, help="Run folder or URI: masks/, records/, manifest.parquet; rerun to resume.")
@click.option("--gt", "gt_uri", default=None, help="Ground-truth masks paired by case_id: DSC, NSD, HD95 per case.")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=None,
              help="mask = mean foreground probability > threshold [default: the ensemble's, 0.2].")
@click.option("--members", type=click.Choice(["cycles", "cycles+final", "final"]), default=None,
              help="Which checkpoints vote: the kept cycle epochs, those and checkpoint_final, or "
                   "checkpoint_final alone [default: the ensemble's, cycles].")
@click.option("--save-maps", is_flag=True, help="Also write prob/<case>.npy and entropy/<case>.npy.")
@cohort_options
@click.option("--config", "config_path", default=None,
              help="Weak-supervision YAML (its prediction and output sections).")
@click.option("--local", is_flag=True, help="Predict in this process instead of a Ray Data actor pool.")
@click.option("--address", default=None, help="Ray cluster address [default: the job's cluster, else a local Ray].")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI, for models:/ URIs.")
@strict_option
def predict(model, input_uri, output, gt_uri, threshold, members, save_maps, mask_format, case_id_tag, gt_segment,
            config_path, local, address, tracking_uri, strict) -> None:
    """Segment a cohort with a trained ensemble: masks, per-case uncertainty, scores with --gt."""
    from ..runs.tracking import use_store
    from ..weak.predict import run_weak_predict

    progress = CaseProgress()
    try:
        config = _weak_config(config_path, tracking={"uri": tracking_uri}, output={"mask_format": mask_format})
        uri = use_store(config.tracking.uri)
        result = run_weak_predict(model, input_uri, output, config, gt_uri, threshold, members, save_maps,
                                  "local" if local else "ray", uri, progress,
                                  connect=joining(address, {"--input": input_uri, "--output": output, "--gt": gt_uri},
                                                  config.shared_filesystem),
                                  case_id_tag=case_id_tag, gt_segment=gt_segment)
    except MedClipSamError as exc:
        fail(str(exc), exc.exit_code)
    finally:
        progress.close()
    scored = sorted((r for r in result.records if not math.isnan(r.dsc)), key=lambda r: r.case_id)
    if scored:
        mean = {"dsc": sum(r.dsc for r in scored) / len(scored), "nsd": sum(r.nsd for r in scored) / len(scored),
                "hd95": _finite_mean([r.hd95 for r in scored]), "n_scored": len(scored)}
        print_scores(scored, mean)
    counts = ", ".join(f"{k}={v}" for k, v in result.counts.items())
    click.echo(f"{sum(result.counts.values())} case(s): {counts} ({result.n_skipped} done earlier, "
               f"{len(result.records)} now in {result.seconds:.0f} s); manifest: {result.output}/manifest.parquet")
    exit_for_errors(result.counts, sum(result.counts.values()), strict)


def _finite_mean(values: list[float]) -> float:
    from ..eval.metrics import summarise

    return summarise(values)
