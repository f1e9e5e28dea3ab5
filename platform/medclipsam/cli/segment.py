"""``medclipsam segment``: one process, no Ray or MLflow: prompts from CSV files, or text-driven."""

from __future__ import annotations

import click

from ..errors import MedClipSamError
from . import common
from .common import (
    CaseProgress,
    cohort_options,
    exit_for_errors,
    fail,
    sam_options,
    strict_option,
    summarise_run,
    task_config,
    text_options,
)


@click.command()
@click.option("--input", "input_uri", required=True,
              help="Image file, folder, DICOM series folder, URI prefix (s3://bucket/cohort/), or a cohort "
                   "manifest (.csv/.parquet: uri, optional case_id, prompt, gt_uri).")
@click.option("--output", required=True, help="Output folder or URI: masks/<case_id>.png|.nii.gz and manifest.parquet.")
@click.option("--gt", "gt_uri", default=None,
              help="Folder or prefix of ground-truth masks, paired by case_id (a manifest's gt_uri column "
                   "does the same): scores each case (DSC, NSD, HD95) into the manifest and the report.")
@click.option("--boxes", default=None, help="Box prompts CSV: case_id,slice,x0,y0,x1,y1 (x column, y row, pixels).")
@click.option("--points", default=None, help="Point prompts CSV: case_id,slice,x,y,label (1 foreground, 0 background).")
@text_options
@click.option("--save-intermediates", is_flag=True,
              help="Text-driven mode: also write saliency maps (saliency/<case_id>.npy), coarse masks (coarse/) "
                   "and prompts (prompts/<case_id>.json).")
@common.propagate_option
@cohort_options
@strict_option
@sam_options
def segment(input_uri: str, output: str, gt_uri: str | None, boxes: str | None, points: str | None,
            text_prompts: tuple[str, ...], clip_model: str | None, save_intermediates: bool, propagate: bool | None,
            mask_format: str | None,
            strict: bool, case_id_tag: str | None, gt_segment: str | None, config_path: str | None,
            **overrides) -> None:
    """Segment every image or volume given by --input.

    With --boxes and/or --points, SAM segments the given prompts. Without them, the text-driven
    zero-shot mode runs: the sentence(s) of --prompt or of the config's text.prompts go through
    BiomedCLIP and M2IB saliency to a coarse mask, whose boxes or points prompt SAM.
    """
    from ..domain.cohort import is_manifest
    from ..pipeline.job import Job
    from ..pipeline.run import run_job
    from ..pipeline.slices import SOURCE_FILES, SOURCE_TEXT

    progress = CaseProgress(every_case=True)
    try:
        config = task_config(config_path, output={"mask_format": mask_format},
                             propagation={"enabled": propagate}, **overrides)
        prompted = bool(boxes or points)
        if prompted and (text_prompts or clip_model or save_intermediates):
            fail("--prompt, --clip-model and --save-intermediates belong to the text-driven mode; "
                 "drop them or drop --boxes/--points")
        if not (prompted or text_prompts or config.text or is_manifest(input_uri)):
            fail("give --boxes/--points, or a text prompt (--prompt, a config with text.prompts, or a prompt "
                 "column in an input manifest)")
        job = Job(config, input_uri, output, SOURCE_FILES if prompted else SOURCE_TEXT, gt_uri, tuple(text_prompts),
                  clip_uri=clip_model, boxes_csv=boxes, points_csv=points, save_intermediates=save_intermediates,
                  case_id_tag=case_id_tag, gt_segment=gt_segment)
        result = run_job(job, "local", progress, resume=False, track=False)
    except MedClipSamError as exc:
        fail(str(exc), exc.exit_code)
    finally:
        progress.close()
    summarise_run(result)
    exit_for_errors(result.counts, len(result.records), strict)
