"""Usage and input errors found before any work: an output that cannot be written, a labels run
without labels, an unreachable object store, a non-positive tolerance. Each is one sentence and
exit code 2, and no model is loaded and no Ray is started for it."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from disc_cohort import disc_images

from medclipsam.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return disc_images(tmp_path_factory.mktemp("early") / "data", 2, size=64)


@pytest.fixture()
def no_models(monkeypatch):
    """Loading a model or starting Ray fails the test: these errors must come first."""
    import sys

    import medclipsam.pipeline.local as local

    common = sys.modules["medclipsam.cli.common"]  # pseudolabel's connect (common.joining) starts Ray through it

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the error was found")

    for module, name in ((local, "segmenter_for"), (local, "load_clip"), (common, "start_ray")):
        monkeypatch.setattr(module, name, forbidden)


def _segment(data, output):
    return CliRunner().invoke(main, ["segment", "--input", str(data / "images"), "--output", str(output),
                                     "--boxes", str(data / "boxes.csv")])


@pytest.mark.parametrize("kind", ["file", "below a file"])
def test_unwritable_output_is_exit_2_before_any_model_loads(data, tmp_path, no_models, kind):
    (data / "boxes.csv").write_text("case_id,slice,x0,y0,x1,y1\nc0,,10,10,30,30\nc1,,10,10,30,30\n")
    blocker = tmp_path / "taken.txt"
    blocker.write_text("a file")
    output = blocker if kind == "file" else blocker / "run"
    result = _segment(data, output)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {output}: ")
    assert ("the output is an existing file" if kind == "file" else "the output cannot be written") in result.output
    assert "Traceback" not in result.output and blocker.read_text() == "a file"


def test_pseudolabel_from_labels_without_labels_is_exit_2_before_ray(data, tmp_path, no_models):
    result = CliRunner().invoke(main, ["pseudolabel", "--input", str(data / "images"), "--prompt-source", "labels",
                                       "--output", str(tmp_path / "out"), "--tracking-uri",
                                       f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 2
    assert "--prompt-source labels takes its boxes from the ground truth, and no case has one" in result.output


def test_unreachable_object_store_is_exit_2(tmp_path, monkeypatch, no_models):
    import fsspec
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setitem(fsspec.config.conf, "s3", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                                                   "config_kwargs": {"retries": {"max_attempts": 1}}})
    s3fs.S3FileSystem.clear_instance_cache()
    result = CliRunner().invoke(main, ["segment", "--input", "s3://nowhere/cohort/", "--output", str(tmp_path / "o"),
                                       "--prompt", "a disc"])
    s3fs.S3FileSystem.clear_instance_cache()
    assert result.exit_code == 2, result.output
    assert "error: s3://nowhere/cohort/: the cohort cannot be read (EndpointConnectionError" in result.output
    assert "Traceback" not in result.output


def test_evaluate_checks_its_options_and_output_first(data, tmp_path):
    args = ["evaluate", "--pred", str(data / "labels"), "--gt", str(data / "labels")]
    negative = CliRunner().invoke(main, [*args, "--tolerance", "-1"])
    assert negative.exit_code == 2 and "--tolerance" in negative.output
    folder = tmp_path / "table.csv"
    folder.mkdir()
    onto_folder = CliRunner().invoke(main, [*args, "--output", str(folder)])
    assert onto_folder.exit_code == 2 and f"{folder}: is a folder" in onto_folder.output
    assert list(folder.iterdir()) == []


def test_evaluate_flags_a_mask_on_another_grid(tmp_path):
    truth, pred = tmp_path / "gt", tmp_path / "pred"
    truth.mkdir()
    pred.mkdir()
    mask = np.zeros((4, 16, 16), np.uint8)
    mask[1:3, 4:12, 4:12] = 1
    for folder, spacing in ((truth, (1.0, 1.0, 2.0)), (pred, (1.0, 1.0, 3.0))):
        image = sitk.GetImageFromArray(mask)
        image.SetSpacing(spacing)
        sitk.WriteImage(image, str(folder / "v.nii.gz"))
    warned = CliRunner().invoke(main, ["evaluate", "--pred", str(pred), "--gt", str(truth)])
    assert warned.exit_code == 0
    assert "warning: v: " in warned.output and "spacing (1.0, 1.0, 3.0) differs from the ground truth's" in \
        warned.output
    assert "1.0000" in warned.output  # scored voxel by voxel: the same voxels
    failed = CliRunner().invoke(main, ["evaluate", "--pred", str(pred), "--gt", str(truth), "--geometry", "fail"])
    assert failed.exit_code == 1 and "error" in failed.output and "differs from the ground truth's" in failed.output
    silent = CliRunner().invoke(main, ["evaluate", "--pred", str(pred), "--gt", str(truth), "--geometry", "ignore"])
    assert silent.exit_code == 0 and "warning" not in silent.output
