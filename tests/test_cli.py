"""The command line: every option is documented in --help; evaluate pairs cases by case_id."""

import math

import click
import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from medclipsam.cli import main


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


COMMANDS = list(_commands(main))


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(path) for path, _ in COMMANDS])
def test_every_option_is_in_help(path, command):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0
    assert command.help and command.help.split("\n")[0][:30] in " ".join(result.output.split())
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{' '.join(path)} {param.opts[0]} has no help text"
            for opt in param.opts:
                assert opt in result.output


def test_top_level_help_lists_commands():
    out = CliRunner().invoke(main, ["--help"]).output
    for name in ("segment", "evaluate", "data", "demo"):
        assert name in out


def _mask(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8) * 255), str(path))


def test_evaluate_pairs_by_case_id(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    square = np.zeros((20, 22), bool)
    square[5:15, 5:15] = True
    shifted = np.roll(square, 3, axis=1)
    # Names sort differently in the two folders: pairing must use case ids, not listing order.
    _mask(pred / "b_case.png", square)
    _mask(pred / "a_case.png", shifted)
    _mask(gt / "a_case.png", square)
    _mask(gt / "b_case.png", square)
    _mask(gt / "c_missing.png", square)
    table = tmp_path / "metrics.csv"
    result = CliRunner().invoke(main, ["evaluate", "--pred", str(pred), "--gt", str(gt), "--output", str(table)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split() for line in result.output.splitlines() if line.strip()}
    assert lines["b_case"][1:4] == ["1.0000", "1.0000", "0.00"]
    assert lines["a_case"][1:3] == ["0.7000", f"{44 / 72:.4f}"]
    assert "missing_pred" in " ".join(lines["c_missing"])
    assert lines["mean"][1] == f"{(1 + 0.7) / 2:.4f}"
    import pyarrow.csv as pacsv

    rows = pacsv.read_csv(table).to_pylist()
    assert [r["case_id"] for r in rows] == ["a_case", "b_case", "c_missing"]
    assert math.isclose(rows[0]["nsd"], 44 / 72, rel_tol=1e-5)


def test_evaluate_nothing_to_score(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    _mask(tmp_path / "p" / "x.png", np.ones((4, 4), bool))
    _mask(tmp_path / "g" / "y.png", np.ones((4, 4), bool))
    result = CliRunner().invoke(main, ["evaluate", "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "g")])
    assert result.exit_code == 1


def test_segment_without_prompts_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["segment", "--input", str(tmp_path), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "give --boxes/--points, or a text prompt" in result.output


def test_text_options_with_prompt_files_are_a_usage_error(tmp_path):
    boxes = tmp_path / "b.csv"
    boxes.write_text("case_id,slice,x0,y0,x1,y1\n")
    result = CliRunner().invoke(main, ["segment", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                                       "--boxes", str(boxes), "--prompt", "a tumour"])
    assert result.exit_code == 2 and "belong to the text-driven mode" in result.output
