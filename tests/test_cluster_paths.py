"""Every command that runs work on Ray workers refuses a local path on a cluster of several nodes
(exit 2, one sentence naming the option), unless its config declares the paths shared.

The cluster is stood in for here: ``start_ray`` joins nothing and ``alive_nodes`` answers 3. A
real two-node cluster refusing ``pseudolabel``'s local paths is in tests/test_job_submission.py;
this module checks that each other command hands its own paths to the same check. Where the work
would take long before Ray is joined (weak training's nnU-Net preprocessing), the stage function is
replaced by one that joins at once, with the ``connect`` the command built.
"""

from __future__ import annotations

import sys

import pytest
import yaml
from click.testing import CliRunner
from disc_cohort import disc_images

from medclipsam.cli import main


@pytest.fixture()
def three_nodes(monkeypatch):
    import medclipsam.runs.ray_session as ray_session

    joined = []
    monkeypatch.setattr(sys.modules["medclipsam.cli.common"], "start_ray", joined.append)
    monkeypatch.setattr(ray_session, "alive_nodes", lambda: 3)
    return joined


def _joins_at_once(*args, connect=None, **kwargs):
    """A stage function that joins the cluster first, as the real ones do once their inputs are read."""
    connect()
    raise AssertionError("the local path was not refused")


def _cases(tmp_path):
    return disc_images(tmp_path / "data", 1)


def test_finetune_refuses_its_default_local_storage(tmp_path, three_nodes, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["finetune", "--pairs", str(tmp_path / "pairs.csv"), "--address", "head:6379"])
    assert result.exit_code == 2, result.output
    assert ("error: --storage ./finetune_runs is a local path, but the Ray cluster has 3 nodes and workers on the "
            "others cannot read or write this machine's disk") in result.output
    assert three_nodes == ["head:6379"] and not (tmp_path / "finetune_runs").exists()
    # declared shared, the check lets it through (to the pairs file, which is missing here)
    (tmp_path / "ft.yaml").write_text("shared_filesystem: true\n")
    result = CliRunner().invoke(main, ["finetune", "--config", str(tmp_path / "ft.yaml"), "--pairs",
                                       str(tmp_path / "pairs.csv"), "--address", "head:6379"])
    assert "is a local path" not in result.output


def test_tune_refuses_a_local_input(tmp_path, three_nodes):
    data = _cases(tmp_path)
    task = tmp_path / "task.yaml"
    task.write_text(yaml.safe_dump({"task": "t", "text": {"prompts": ["a bright round disc"]}}))
    result = CliRunner().invoke(main, ["tune", "--config", str(task), "--input", str(data / "images"), "--gt",
                                       str(data / "labels"), "--output", "s3://bucket/tune", "--address", "head:6379"])
    assert result.exit_code == 2, result.output
    assert f"error: --input {data / 'images'} is a local path, but the Ray cluster has 3 nodes" in result.output


def test_weak_train_refuses_a_local_output(tmp_path, three_nodes, monkeypatch):
    import medclipsam.weak.training as training

    data = _cases(tmp_path)
    monkeypatch.setattr(training, "run_weak_training", _joins_at_once)
    result = CliRunner().invoke(main, ["weak", "train", "--images", str(data / "images"), "--labels",
                                       str(data / "labels"), "--output", str(tmp_path / "weak"),
                                       "--address", "head:6379"])
    assert result.exit_code == 2, result.output
    assert f"error: --output {tmp_path / 'weak'} is a local path, but the Ray cluster has 3 nodes" in result.output


def test_weak_predict_refuses_a_local_input(tmp_path, three_nodes, monkeypatch):
    import medclipsam.weak.predict as predict

    data = _cases(tmp_path)
    monkeypatch.setattr(predict, "run_weak_predict", _joins_at_once)
    result = CliRunner().invoke(main, ["weak", "predict", "--model", "s3://bucket/weak", "--input",
                                       str(data / "images"), "--output", "s3://bucket/predicted",
                                       "--address", "head:6379"])
    assert result.exit_code == 2, result.output
    assert f"error: --input {data / 'images'} is a local path, but the Ray cluster has 3 nodes" in result.output
