"""The review report's parts without a browser: the pictures (colours, prompts drawn, which slices a
strip shows), the provenance a page states, and evaluate's scores merged into a run's table."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pyarrow as pa
from click.testing import CliRunner
from PIL import Image

from medclipsam.cli import main
from medclipsam.domain.records import SCHEMA, CaseRecord, to_table
from medclipsam.eval.overlays import (
    BACKGROUND_POINT_COLOUR,
    MASK_COLOUR,
    PROMPT_COLOUR,
    TRUTH_COLOUR,
    overlay_png,
    strip_slices,
)
from medclipsam.eval.report import merge_scores, render_report
from medclipsam.prompts.types import SlicePrompts


def test_strip_shows_every_prompted_slice_or_an_even_spread_with_the_fullest():
    assert strip_slices([4, 2, 3], key=3, limit=8) == [2, 3, 4]
    spread = strip_slices(list(range(10, 30)), key=10, limit=5)
    assert spread == [10, 15, 20, 24, 29] and len(spread) == 5
    with_key = strip_slices(list(range(10, 30)), key=13, limit=5)  # 13 replaces its nearest pick, 15
    assert with_key == [10, 13, 20, 24, 29]
    assert strip_slices([], key=7, limit=8) == [7]  # nothing prompted: the overlay's slice


def test_overlay_draws_mask_truth_and_prompts_in_their_colours():
    image = np.full((60, 80, 3), 90, np.uint8)
    mask, truth = np.zeros((60, 80), bool), np.zeros((60, 80), bool)
    mask[20:40, 20:40] = True
    truth[22:44, 24:46] = True
    prompts = SlicePrompts(boxes=np.array([[5.0, 6.0, 70.0, 50.0]]), points=np.array([[30, 30], [60, 10]]),
                           labels=np.array([1, 0]))
    picture = np.asarray(Image.open(io.BytesIO(overlay_png(image, mask, truth, prompts))))

    def colour(y, x):
        return tuple(int(v) for v in picture[y, x])

    assert colour(20, 35) == MASK_COLOUR and colour(43, 35) == TRUTH_COLOUR  # boundary bands, inside each mask
    assert colour(6, 5) == colour(50, 70) == colour(28, 5) == PROMPT_COLOUR  # the box's corners and left side
    assert colour(30, 30) == PROMPT_COLOUR and colour(10, 60) == BACKGROUND_POINT_COLOUR
    assert colour(30, 50) == colour(2, 2) == (90, 90, 90)  # elsewhere: the image itself
    plain = np.asarray(Image.open(io.BytesIO(overlay_png(image, mask))))
    assert {tuple(int(v) for v in p) for p in plain.reshape(-1, 3)} == {(90, 90, 90), MASK_COLOUR}


def _table(rows: list[CaseRecord], about: dict | None = None) -> pa.Table:
    table = to_table(rows)
    assert table.schema.equals(SCHEMA)
    return table


def test_page_states_its_provenance_and_units():
    records = [CaseRecord("a", "/in/a.nii.gz", prompt_source="labels", backend="litemedsam", checkpoint="/w.pth",
                          checkpoint_sha256="ab" * 32, n_slices=12, dsc=0.5, nsd=0.75, hd95=3.0,
                          parameters='{"labels": {"box_margin": 2.0}}'),
               CaseRecord("b", "/in/b.nii.gz", prompt_source="labels", n_slices=9, dsc=0.7, nsd=0.25, hd95=math.inf,
                          status="ok", warnings="small mask on slice 3: ...")]
    about = {"task": "demo", "config_sha256": "cd" * 32, "settings_sha256": "ef" * 32, "input": "/in", "gt": "/gt",
             "source": "labels", "written": "2026-12-03T10:00:00+00:00", "versions": {"medclipsam": "0.1.0"},
             "nsd_tolerance": 2.0}
    page = render_report(_table(records), {}, "run x", about=about, written="2026-12-04T00:00:00+00:00")
    assert "id='oracle-banner'" in page and "boxes from the ground-truth labels (/gt), margin 2.0 px" in page
    assert "litemedsam: /w.pth, sha256 <code title='" + "ab" * 32 + "'>abababababab</code>" in page
    assert "task demo, sha256 <code title='" + "cd" * 32 in page and "medclipsam 0.1.0" in page
    assert "2026-12-03T10:00:00+00:00 (this report: 2026-12-04T00:00:00+00:00)" in page
    assert "mean DSC (0 to 1)</th><td>0.6000" in page and "tolerance 2 mm)</th><td>0.5000" in page
    assert "mean HD95 (mm; finite values)</th><td>3</td>" in page  # inf left out of the mean
    assert "cases with warnings</th><td>1" in page and "No case was drawn" in page
    text_run = render_report(_table([CaseRecord("c", "/c.png", prompt_source="text", n_slices=1,
                                                text_prompt='["a dark mass"]')]), {}, "t", about={})
    assert "id='oracle-banner'" not in text_run and "zero-shot): &ldquo;a dark mass&rdquo;" in text_run
    assert "scores</th><td>none: give --gt" in text_run


def test_evaluate_scores_fill_the_cases_a_run_left_unscored():
    rows = [{"case_id": "a", "dsc": 0.9}, {"case_id": "b", "dsc": math.nan}, {"case_id": "c", "dsc": math.nan}]
    scores = [{"case_id": "a", "dsc": 0.1, "nsd": 0.1, "hd95": 1.0, "status": "ok"},
              {"case_id": "b", "dsc": 0.4, "nsd": 0.5, "hd95": 6.0, "status": "ok"},
              {"case_id": "c", "dsc": math.nan, "nsd": math.nan, "hd95": math.nan, "status": "missing_gt"}]
    merged, taken = merge_scores(rows, scores)
    assert taken == 1 and [r["scored_by"] for r in merged] == ["run", "evaluate", ""]
    assert merged[0]["dsc"] == 0.9 and (merged[1]["dsc"], merged[1]["hd95"]) == (0.4, 6.0)
    assert rows[1]["dsc"] != rows[1]["dsc"]  # the caller's rows are left as they were


def test_report_command_merges_evaluate_output(tmp_path, samples_root):
    import shutil

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for kind, folder in (("images", images), ("labels", labels)):
        shutil.copy(samples_root / kind / "breast1.nrrd", folder / "breast1.nrrd")
    from medclipsam.prompts.csv_prompts import oracle_boxes_csv

    boxes = tmp_path / "boxes.csv"
    boxes.write_text(oracle_boxes_csv(str(labels), margin=2.0))
    runner = CliRunner()
    run = runner.invoke(main, ["segment", "--input", str(images), "--boxes", str(boxes), "--output",
                               str(tmp_path / "run")])
    assert run.exit_code == 0 and f"report: {tmp_path / 'run' / 'report.html'}" in run.output
    assert "scores</th><td>none" in (tmp_path / "run" / "report.html").read_text()
    scored = runner.invoke(main, ["evaluate", "--pred", str(tmp_path / "run" / "masks"), "--gt", str(labels),
                                  "--output", str(tmp_path / "run" / "scores.csv")])
    assert scored.exit_code == 0, scored.output
    dsc = float(next(line for line in scored.output.splitlines() if line.startswith("breast1")).split()[1])
    again = runner.invoke(main, ["report", str(tmp_path / "run")])
    assert again.exit_code == 0, again.output
    page = (tmp_path / "run" / "report.html").read_text()
    assert f"scored cases</th><td>1 (1 from {tmp_path / 'run' / 'scores.csv'})" in page
    assert f"mean DSC (0 to 1)</th><td>{dsc:.4f}" in page and "<td data-value='evaluate'>evaluate</td>" in page
    bad = runner.invoke(main, ["report", str(tmp_path / "run"), "--scores", str(boxes)])
    assert bad.exit_code == 2 and "boxes.csv: not a table of medclipsam evaluate (no column dsc, nsd, hd95)" in (
        bad.output)


def test_a_large_run_lists_its_failed_warned_and_worst_cases_and_counts_them_all():
    """Past ``REPORT_CASES`` the table lists the cases worth a look; the summary still counts every one."""
    from medclipsam.eval.report import REPORT_CASES

    n = REPORT_CASES + 1500
    records = [CaseRecord(f"c{i:05d}", f"/in/c{i:05d}.png", n_slices=1, dsc=0.5 + (i * 7919 % n) / (2 * n),
                          nsd=0.5, hd95=2.0, prompt_source="labels",
                          status="error" if i % 100 == 0 else "ok", error="boom" if i % 100 == 0 else "",
                          warnings="small mask" if i % 250 == 1 else "") for i in range(n)]
    for r in records:
        if r.status == "error":
            r.dsc = math.nan
    page = render_report(_table(records), {}, "big", about={"source": "labels"})
    listed = re.findall(r"<tr data-status='(\w+)' class='(\w*)'><td data-value='(c\d+)'", page)
    assert len(listed) == REPORT_CASES and f"{REPORT_CASES:,} of {n:,} cases are listed" in page
    ids = [case for _, _, case in listed]
    assert ids == sorted(ids)  # in manifest order
    failed = {r.case_id for r in records if r.status == "error"}
    warned = {r.case_id for r in records if r.warnings}
    scored = sorted((r for r in records if r.status == "ok" and not r.warnings), key=lambda r: r.dsc)
    lowest = {r.case_id for r in scored[: REPORT_CASES - len(failed) - len(warned)]}
    assert set(ids) == failed | warned | lowest  # brute force: the same choice
    assert f"cases</th><td>{n}</td>" in page and f"status error</th><td>{len(failed)}" in page
    mean = sum(r.dsc for r in records if r.status == "ok") / (n - len(failed))
    assert f"mean DSC (0 to 1)</th><td>{mean:.4f}" in page and f"cases with warnings</th><td>{len(warned)}" in page
    small = render_report(_table(records[:50]), {}, "small", about={"source": "labels"})
    assert "cases are listed" not in small and len(re.findall(r"<tr data-status=", small)) == 50
