"""``medclipsam evaluate``: score a folder of masks against ground truth."""

from __future__ import annotations

import sys

import click

from ..errors import MedClipSamError
from .common import fail, print_scores


@click.command()
@click.option("--pred", required=True, help="Folder or URI of predicted masks (case_id.png / .nii.gz ...).")
@click.option("--gt", required=True, help="Folder or URI of ground-truth masks, paired with --pred by case_id.")
@click.option("--tolerance", type=float, default=2.0, show_default=True,
              help="NSD tolerance: pixels for 2D images, millimetres for volumes.")
@click.option("--output", default=None, help="Write the per-case table here (.csv or .parquet).")
def evaluate(pred: str, gt: str, tolerance: float, output: str | None) -> None:
    """Per-case DSC, NSD and HD95 of predictions against ground truth, and their means."""
    from ..eval.evaluation import evaluate as run_evaluation
    from ..eval.evaluation import write_table

    try:
        rows, summary = run_evaluation(pred, gt, tolerance)
    except MedClipSamError as exc:
        fail(str(exc))
    print_scores(rows, summary)
    if output:
        write_table(rows, output)
        click.echo(f"per-case table: {output}")
    if summary["n_scored"] == 0:
        sys.exit(1)
