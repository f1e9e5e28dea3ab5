"""``medclipsam pseudolabel`` (a cohort on Ray Data, resumable, tracked) and ``medclipsam report``."""

from __future__ import annotations

import click

from ..errors import MedClipSamError
from . import common
from .common import (
    CaseProgress,
    cohort_options,
    exit_for_errors,
    fail,
    joining,
    sam_options,
    strict_option,
    summarise_run,
    task_config,
    text_options,
)


@click.command()
@click.option("--input", "input_uri", required=True,
              help="Cohort: a folder or URI prefix of images/volumes (s3://bucket/cohort/), or a manifest "
                   "(.csv/.parquet: uri, optional case_id, prompt, gt_uri).")
@click.option("--output", required=True,
              help="Run folder or URI: masks/, overlays/, records/, manifest.parquet; rerun to resume.")
@click.option("--gt", "gt_uri", default=None,
              help="Folder or prefix of ground-truth masks, paired by case_id: scores each case (DSC, NSD) "
                   "and is where --prompt-source labels takes its boxes.")
@text_options
@click.option("--prompt-source", type=click.Choice(["text", "labels"]), default="text", show_default=True,
              help="text: M2IB saliency of the text prompts gives SAM its prompts (zero-shot); labels: box "
                   "prompts from the ground truth (--gt or the manifest's gt_uri), an oracle upper bound.")
@click.option("--key-slices", type=click.IntRange(min=0), default=None,
              help="--prompt-source labels, volumes: the truth's box on the N slices of largest truth area only "
                   "(with --propagate, where the chains start); 0 = every labelled slice [default: the config's "
                   "oracle.key_slices, 0].")
@common.propagate_option
@click.option("--save-saliency", is_flag=True, default=None, help="Also write saliency/<case_id>.npy (text mode).")
@click.option("--attribution", is_flag=True,
              help="Stage attribution (text mode, with ground truth): also the DSC of each case's coarse mask "
                   "and of SAM prompted with the truth's boxes (same image embeddings), in the manifest "
                   "(dsc_coarse, dsc_oracle) and the report.")
@click.option("--pipeline", "pipeline_uri", default=None,
              help="A registered pipeline (models:/NAME@alias or /VERSION, from `medclipsam models "
                   "register-pipeline`): its config and pinned models, exactly; replaces --config, --clip-model and "
                   "the SAM options.")
@click.option("--address", default=None,
              help="Ray cluster address (ray://host:10001 or auto) [default: the job's cluster, else a local Ray].")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI [default: the config's tracking.uri, $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlflow.db in the working directory].")
@click.option("--experiment", default=None, help="MLflow experiment [default: the config's, medclipsam-pseudolabel].")
@cohort_options
@strict_option
@sam_options
def pseudolabel(input_uri: str, output: str, gt_uri, text_prompts, clip_model, prompt_source: str,
                key_slices: int | None, propagate: bool | None,
                save_saliency: bool | None, attribution: bool, pipeline_uri, address, tracking_uri, experiment,
                mask_format: str | None, strict: bool, case_id_tag: str | None, gt_segment: str | None, config_path,
                **overrides) -> None:
    """Pseudo-label a cohort on Ray Data: saliency and SAM actor pools, resumable, tracked in MLflow.

    Cases already completed under --output are skipped, so a killed run continues where it stopped.
    """
    from ..pipeline.job import Job
    from ..pipeline.run import run_job

    if pipeline_uri:
        _only_pipeline(overrides, config_path, clip_model, text_prompts, prompt_source)
    if key_slices is not None and prompt_source != "labels":
        fail("--key-slices chooses the slices the truth's boxes go on: it needs --prompt-source labels")
    progress = CaseProgress()
    try:
        sections = {"pipeline": {"save_saliency": save_saliency or None},
                    "tracking": {"uri": tracking_uri, "experiment": experiment}, "output": {"mask_format": mask_format},
                    "propagation": {"enabled": propagate}, "oracle": {"key_slices": key_slices}}
        if pipeline_uri:
            registered, pins = _registered_pipeline(pipeline_uri, tracking_uri)
            config = task_config(None, registered, **sections)
        else:
            config, pins = task_config(config_path, **sections, **overrides), ()
        job = Job(config, input_uri, output, prompt_source, gt_uri, tuple(text_prompts), clip_model,
                  attribution=attribution, pins=pins, case_id_tag=case_id_tag, gt_segment=gt_segment)
        paths = {"--input": input_uri, "--output": output, "--gt": gt_uri}
        connect = joining(address, paths, config.pipeline.shared_filesystem)
        result = run_job(job, "ray", progress, connect=connect)
    except MedClipSamError as exc:
        fail(str(exc), exc.exit_code)
    finally:
        progress.close()
    summarise_run(result)
    exit_for_errors(result.counts, len(result.records), strict)


def _only_pipeline(overrides: dict, config_path, clip_model, text_prompts, prompt_source: str) -> None:
    """A registered pipeline brings its own config and models: any option that would change them is refused."""
    given = [f"--{k.replace('_', '-')}" for k, v in overrides.items() if v is not None]
    given += [name for name, value in (("--config", config_path), ("--clip-model", clip_model),
                                       ("--prompt", text_prompts)) if value]
    if given or prompt_source != "text":
        fail(f"--pipeline brings its own config and models: drop {', '.join(given) or '--prompt-source labels'}")


def _registered_pipeline(uri: str, tracking_uri: str | None):
    """The pipeline's config (its models pinned, their weights checked) and its pin for the run's record."""
    from ..registry.pipelines import load_pipeline
    from ..runs.pins import ModelPin
    from ..runs.tracking import use_store

    use_store(tracking_uri)
    pipeline = load_pipeline(uri)
    return pipeline.config, (ModelPin("pipeline", uri, pipeline.ref.uri, pipeline.ref.version),)


@click.command()
@click.argument("run_output")
@click.option("--output", "destination", default=None,
              help="Where to write the page [default: RUN_OUTPUT/report.html].")
@click.option("--scores", "scores_uri", default=None,
              help="A per-case table of `medclipsam evaluate --output` (.csv or .parquet), merged into the cases "
                   "the run did not score [default: RUN_OUTPUT/scores.csv or scores.parquet, when there].")
def report(run_output: str, destination: str | None, scores_uri: str | None) -> None:
    """Write the review report of a segment or pseudolabel run: one self-contained HTML page.

    Every run writes it too; run this to rewrite it, e.g. after `evaluate` scored the masks.
    """
    from ..eval.report import write_report

    try:
        written = write_report(run_output, destination, scores_uri)
    except MedClipSamError as exc:
        fail(str(exc), exc.exit_code)
    click.echo(f"report: {written}")
