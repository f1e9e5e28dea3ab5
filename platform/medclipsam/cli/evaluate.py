"""``medclipsam evaluate``: score a folder of masks against ground truth."""

from __future__ import annotations

import sys

import click

from ..errors import MedClipSamError
from .common import fail, print_scores


@click.command()
@click.option("--pred", required=True, help="Folder or URI of predicted masks (case_id.png / .nii.gz ...).")
@click.option("--gt", required=True, help="Folder or URI of ground-truth masks, paired with --pred by case_id.")
@click.option("--tolerance", type=click.FloatRange(0.0, min_open=True), default=2.0, show_default=True,
              help="NSD tolerance, above 0: pixels for 2D images, millimetres for volumes.")
@click.option("--geometry", type=click.Choice(["warn", "fail", "ignore"]), default="warn", show_default=True,
              help="A prediction whose spacing, origin or direction differs from its truth's: scored with a "
                   "warning, failed, or scored silently.")
@click.option("--gt-segment", default=None,
              help="For DICOM SEG truths (<case_id>.seg.dcm) holding several segments: the one to score, by "
                   "number or label [default: a SEG's only segment].")
@click.option("--output", default=None, help="Write the per-case table here (.csv or .parquet).")
def evaluate(pred: str, gt: str, tolerance: float, geometry: str, gt_segment: str | None, output: str | None) -> None:
    """Per-case DSC, NSD and HD95 of predictions against ground truth, and their means."""
    from ..eval.evaluation import evaluate as run_evaluation
    from ..eval.evaluation import write_table
    from ..storage.access import check_output_file

    try:
        if output:
            check_output_file(output)  # before any case is scored
        rows, summary = run_evaluation(pred, gt, tolerance, geometry, gt_segment)
    except MedClipSamError as exc:
        fail(str(exc), exc.exit_code)
    print_scores(rows, summary)
    for row in rows:
        if row.warning:
            click.echo(f"warning: {row.case_id}: {row.warning}", err=True)
    if output:
        write_table(rows, output)
        click.echo(f"per-case table: {output}")
    if summary["n_scored"] == 0:
        sys.exit(1)
