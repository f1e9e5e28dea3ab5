"""Prompts that cannot work are loud, and ``segment --gt`` scores a plain run: a points-only prompt on a
box-trained backend and a mask that fills little of its box are warned of (manifest column
``warnings``, one summary line per kind), and a box-prompted single-process run scored with ``--gt``
gives the labels-prompted run's figures exactly."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import SimpleITK as sitk
import yaml
from click.testing import CliRunner

from medclipsam.cli import main
from medclipsam.config import TaskConfig
from medclipsam.domain.images import read_mask
from medclipsam.pipeline.flags import POINTS_ONLY, SMALL_MASK, box_fill, case_warnings, summary
from medclipsam.pipeline.job import Job
from medclipsam.pipeline.run import run_job
from medclipsam.prompts.csv_prompts import oracle_boxes_csv
from medclipsam.prompts.types import SlicePrompts


def test_box_fill_counts_the_pixels_a_box_covers():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) < 0.3
    for box in ([3, 4, 20, 30], [10.5, 2.2, 49.9, 39.1], [-5, -5, 7, 8], [45, 35, 80, 90]):
        covered = [mask[y, x] for y in range(40) for x in range(50)
                   if np.floor(box[0]) <= x < np.ceil(box[2]) and np.floor(box[1]) <= y < np.ceil(box[3])]
        assert box_fill(mask, box) == pytest.approx(sum(covered) / len(covered))
    assert box_fill(mask, [60, 60, 70, 70]) == 0.0  # wholly outside: nothing filled


def test_case_warnings_name_the_kind_and_the_slice():
    mask = np.zeros((20, 20), bool)
    mask[2:12, 2:12] = True  # fills box A wholly, 1 pixel of box B's 64
    prompts = {3: SlicePrompts(boxes=np.array([[2, 2, 12, 12], [11, 11, 19, 19]])),
               5: SlicePrompts(points=np.array([[5, 5]]), labels=np.array([1]))}
    masks = {3: mask, 5: mask}
    found = case_warnings(prompts, masks, "litemedsam", 0.05)
    assert found[0].startswith(f"{POINTS_ONLY} on 1 slice(s): litemedsam was trained with box prompts")
    assert found[1] == f"{SMALL_MASK} on slice 3: the mask fills 1.6% of its prompt box (11, 11, 19, 19), under 5%"
    assert len(found) == 2
    assert case_warnings(prompts, masks, "vit_b", 0.05) == found[1:]  # SAM itself takes points
    assert case_warnings(prompts, masks, "litemedsam", 0.0)[1:] == []  # 0: never flagged
    lines = summary({"b": "; ".join(found), "a": found[1], "c": ""})
    assert lines == [f"1 case(s) with a {POINTS_ONLY} warning (b); b: {found[0]}",
                     f"2 case(s) with a {SMALL_MASK} warning (a, b); a: {found[1]}"]


def _disc_png(path):
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:96, :112]
    disc = (yy - 48) ** 2 + (xx - 56) ** 2 <= 20**2
    pixels = np.clip(np.where(disc, 190, 60) + rng.normal(0, 8, disc.shape), 0, 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(path))
    return disc


def _manifest(output) -> dict:
    return {r["case_id"]: r for r in pq.read_table(output / "manifest.parquet").to_pylist()}


def test_points_only_on_litemedsam_and_small_masks_are_warned_of(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("boxed", "pointed"):
        _disc_png(inputs / f"{name}.png")
    boxes, points = tmp_path / "boxes.csv", tmp_path / "points.csv"
    boxes.write_text("case_id,slice,x0,y0,x1,y1\nboxed,,34,26,78,70\n")
    points.write_text("case_id,slice,x,y,label\npointed,,56,48,1\n")
    runner = CliRunner()
    base = ["segment", "--input", str(inputs), "--boxes", str(boxes), "--points", str(points)]
    run = runner.invoke(main, [*base, "--output", str(tmp_path / "out")])
    assert run.exit_code == 0, run.output
    rows = _manifest(tmp_path / "out")
    assert rows["boxed"]["status"] == rows["pointed"]["status"] == "ok"
    assert rows["boxed"]["warnings"] == ""  # the disc fills about 70% of its box
    assert rows["pointed"]["warnings"].startswith(f"{POINTS_ONLY}: litemedsam was trained with box prompts")
    warned = [line for line in run.output.splitlines() if line.startswith("warning:")]
    assert warned == [f"warning: 1 case(s) with a {POINTS_ONLY} warning (pointed); pointed: "
                      + rows["pointed"]["warnings"]]
    # the fraction is a setting: at 95% the boxed disc (pi/4 of a tight box at best) is flagged
    config = tmp_path / "strict.yaml"
    config.write_text(yaml.safe_dump({"task": "t", "pipeline": {"min_box_fill": 0.95}}))
    strict = runner.invoke(main, [*base, "--output", str(tmp_path / "out2"), "--config", str(config)])
    assert strict.exit_code == 0, strict.output
    flagged = _manifest(tmp_path / "out2")["boxed"]["warnings"]
    assert flagged.startswith(f"{SMALL_MASK}: the mask fills ") and flagged.endswith(
        " of its prompt box (34, 26, 78, 70), under 95%")
    fill = float(flagged.split("fills ")[1].split("%")[0]) / 100
    mask = read_mask(str(tmp_path / "out2" / "masks" / "boxed.png")).array > 0
    assert fill == pytest.approx(mask[26:70, 34:78].mean(), abs=5e-4)  # the figure is the mask's own


def test_segment_gt_scores_a_box_run_as_the_labels_run_does(tmp_path, samples_root):
    image, label = samples_root / "images" / "breast1.nrrd", samples_root / "labels" / "breast1.nrrd"
    labels_run = run_job(Job(TaskConfig(task="t"), str(image), str(tmp_path / "labels"), "labels", str(label)),
                         "local", resume=False, track=False).records[0]
    boxes = tmp_path / "boxes.csv"
    every = oracle_boxes_csv(str(samples_root / "labels"), margin=TaskConfig(task="t").oracle.box_margin)
    boxes.write_text("".join(line for line in every.splitlines(True) if not line.startswith(("brain", "lung"))))
    run = CliRunner().invoke(main, ["segment", "--input", str(image), "--boxes", str(boxes), "--gt", str(label),
                                    "--output", str(tmp_path / "boxes")])
    assert run.exit_code == 0, run.output
    row = _manifest(tmp_path / "boxes")["breast1"]
    assert row["gt_uri"] == str(label)  # one image and one mask pair whatever their names
    assert (row["dsc"], row["nsd"], row["hd95"]) == (labels_run.dsc, labels_run.nsd, labels_run.hd95)
    mask, truth = read_mask(row["mask_uri"]).array > 0, read_mask(str(label)).array > 0
    assert row["dsc"] == pytest.approx(2 * (mask & truth).sum() / (mask.sum() + truth.sum()), abs=1e-12)
    assert row["dsc"] > 0.6 and f"mean DSC {row['dsc']:.4f}" in run.output


def test_segment_gt_that_pairs_with_no_case_is_a_usage_error(tmp_path, samples_root):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("case_id,slice,x0,y0,x1,y1\n")
    run = CliRunner().invoke(main, ["segment", "--input", str(samples_root / "images"), "--boxes", str(boxes),
                                    "--gt", str(tmp_path), "--output", str(tmp_path / "out")])
    assert run.exit_code == 2 and "Traceback" not in run.output
    other = tmp_path / "masks"
    other.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.uint8)), str(other / "nobody.png"))
    run = CliRunner().invoke(main, ["segment", "--input", str(samples_root / "images"), "--boxes",
                                    str(samples_root / "missing.csv"), "--gt", str(other), "--output",
                                    str(tmp_path / "out")])
    assert run.exit_code == 2
    assert (f"{other}: no ground truth here has a case's id" in run.output and "masks nobody; cases brain1, brain2"
            in run.output)
