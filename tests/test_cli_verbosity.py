"""Every input error reaches the user as one sentence at default verbosity; ``-v`` adds the traceback.

One table of input errors, one or more per command, each found from an exception deep in the
package (a missing file, a malformed CSV or YAML, an unknown model). Each runs twice: plain, it is
exit code 2 with a last line ``error: ...`` naming the input and no traceback anywhere; with ``-v``
the same last line follows the traceback of the exception behind it. An exception that no check
anticipated (here, one planted in a stage) is exit code 1 with its type and message, again with
the traceback only under ``-v``.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from disc_cohort import disc_images

from medclipsam.cli import main

TRACEBACK = "Traceback (most recent call last)"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("verbosity")
    data = disc_images(root / "data", 2, size=64)
    (data / "boxes.csv").write_text("case_id,slice,x0,y0,x1,y1\nc0,,10,10,30,30\nc1,,10,10,30,30\n")
    (root / "bad_boxes.csv").write_text("case_id,slice,x0\nc0,0,1\n")
    (root / "bad.yaml").write_text("task: [unclosed\n")
    (root / "pairs.csv").write_text("image,caption\nnowhere.png,a disc\n")
    (root / "space.yaml").write_text("sam.threshold: not-a-list\n")
    return root, data


def _cases(root, data):
    images, labels = str(data / "images"), str(data / "labels")
    db = f"sqlite:///{root / 'mlflow.db'}"
    nowhere = str(root / "nowhere")
    return {
        "segment: missing input": (["segment", "--input", nowhere, "--output", str(root / "o1"), "--prompt", "x"],
                                   "nowhere: no such file"),
        "segment: malformed box csv": (["segment", "--input", images, "--output", str(root / "o2"),
                                        "--boxes", str(root / "bad_boxes.csv")], "bad_boxes.csv"),
        "segment: unknown config": (["segment", "--config", "no_such_task", "--input", images,
                                     "--output", str(root / "o3"), "--prompt", "x"], "no_such_task"),
        "segment: broken yaml": (["segment", "--config", str(root / "bad.yaml"), "--input", images,
                                  "--output", str(root / "o4"), "--prompt", "x"], "bad.yaml"),
        "evaluate: missing prediction": (["evaluate", "--pred", nowhere, "--gt", labels], "nowhere"),
        "pseudolabel: missing input": (["pseudolabel", "--input", nowhere, "--output", str(root / "o5"),
                                        "--prompt", "x", "--tracking-uri", db], "nowhere"),
        "report: not a run": (["report", nowhere], "no manifest"),
        "finetune: broken yaml": (["finetune", "--config", str(root / "bad.yaml"), "--pairs",
                                   str(root / "pairs.csv")], "bad.yaml"),
        "weak train: missing pseudo-labels": (["weak", "train", "--pseudo", nowhere, "--output",
                                               str(root / "o6"), "--tracking-uri", db], "nowhere"),
        "weak predict: missing model": (["weak", "predict", "--model", nowhere, "--input", images,
                                         "--output", str(root / "o7"), "--local"], "nowhere"),
        "tune: malformed space": (["tune", "--config", "breast_ultrasound", "--input", images, "--gt", labels,
                                   "--output", str(root / "o8"),
                                   "--space", str(root / "space.yaml"), "--tracking-uri", db], "space.yaml"),
        "models promote: unknown model": (["models", "promote", "no-such-model", "--version", "1", "--eval-set",
                                           str(data), "--tracking-uri", db], "no-such-model"),
    }


CASE_NAMES = [
    "segment: missing input", "segment: malformed box csv", "segment: unknown config", "segment: broken yaml",
    "evaluate: missing prediction", "pseudolabel: missing input", "report: not a run", "finetune: broken yaml",
    "weak train: missing pseudo-labels", "weak predict: missing model", "tune: malformed space",
    "models promote: unknown model",
]


def _run(args: list[str]):
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_input_errors_are_one_sentence_and_v_shows_the_traceback(files, name):
    root, data = files
    args, names = _cases(root, data)[name]
    plain = _run(args)
    assert plain.exit_code == 2, plain.output
    last = plain.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and names in last, plain.output
    assert TRACEBACK not in plain.output and "File \"" not in plain.output

    loud = _run(["-v", *args])
    assert loud.exit_code == 2, loud.output
    assert TRACEBACK in loud.stderr, loud.output
    assert loud.stderr.strip().splitlines()[-1] == last  # the same sentence, after the traceback
    assert loud.stderr.index(TRACEBACK) < loud.stderr.index(last)


def test_a_usage_error_without_an_exception_prints_no_empty_traceback(files):
    _, data = files
    args = ["models", "promote", "m", "--version", "1", "--eval-set", str(data), "--force"]
    for prefix in ([], ["-v"]):
        result = _run([*prefix, *args])
        assert result.exit_code == 2
        assert result.output.strip() == "error: --force needs --reason TEXT: a forced promotion records why"
        assert "NoneType" not in result.output


def test_an_unexpected_failure_is_one_sentence_and_exit_1(files, monkeypatch):
    root, data = files
    import medclipsam.pipeline.run as run

    def broken(*args, **kwargs):
        raise RuntimeError("planted defect\nsecond line")

    monkeypatch.setattr(run, "run_job", broken)
    args = ["segment", "--input", str(data / "images"), "--output", str(root / "o9"),
            "--boxes", str(data / "boxes.csv")]
    plain = _run(args)
    assert plain.exit_code == 1
    assert plain.output.strip() == ("error: unexpected failure, RuntimeError: planted defect "
                                    "(run with -v for the traceback)")
    loud = _run(["-v", *args])
    assert loud.exit_code == 1
    assert TRACEBACK in loud.stderr and "in broken" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == "error: unexpected failure, RuntimeError: planted defect"


def test_yaml_errors_name_the_line_and_column(tmp_path):
    from medclipsam.config import parse_yaml
    from medclipsam.errors import InputError

    with pytest.raises(InputError) as caught:
        parse_yaml(b"task: demo\nsam: [1, 2\n", "t.yaml")
    assert str(caught.value) == "t.yaml: not valid YAML (line 3, column 1: expected ',' or ']', but got '<stream end>')"
    with pytest.raises(InputError, match=r"^t.yaml: not UTF-8 text \(byte 7\)$"):
        parse_yaml("task: d\xe9mo\n".encode("latin-1"), "t.yaml")
    assert parse_yaml(b"task: demo\n", "t.yaml") == {"task": "demo"}


def test_a_known_error_outside_a_commands_own_checks_keeps_its_sentence_and_code(files, monkeypatch, tmp_path):
    """``evaluate`` writes its table after its own error handling: an outage there is still the
    outage's sentence and exit code 1, not an 'unexpected failure'."""
    import medclipsam.eval.evaluation as evaluation
    from medclipsam.errors import StorageUnavailable

    _, data = files

    def store_gone(rows, uri):
        raise StorageUnavailable(f"{uri}: the object store did not answer (3 tries over 9 s; last: ...)")

    monkeypatch.setattr(evaluation, "write_table", store_gone)
    table = tmp_path / "scores.csv"
    result = _run(["evaluate", "--pred", str(data / "labels"), "--gt", str(data / "labels"), "--output", str(table)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: {table}: the object store did not answer (3 tries over 9 s; last: ...)")
