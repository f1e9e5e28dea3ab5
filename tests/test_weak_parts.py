"""The weak stage's pure parts and its nnU-Net dataset export (no training, no Ray)."""

from __future__ import annotations

import json
import math
import re
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from disc_cohort import disc_images
from pydantic import ValidationError

from medclipsam.domain.records import CaseRecord, write_manifest
from medclipsam.errors import InputError
from medclipsam.weak.dataset import cases_from_folders, cases_from_pseudo, export_dataset
from medclipsam.weak.nnunet_env import nnunet_environment
from medclipsam.weak.schedule import cyclic_lr, kept_epochs
from medclipsam.weak.settings import WeakConfig
from medclipsam.weak.uncertainty import binary_entropy, case_uncertainty, outer_ring


def test_cyclic_lr_both_schedules():
    # E = 6, C = 2: Tc = 3, floor(0.5 * 3) = 1, so t = 1 and t = 2 both use min(t, 1) = 1.
    cycle = [cyclic_lr(e, 6, 2) for e in range(6)]
    fallen = 1e-2 * (1 - 1 / 3) ** 0.9
    assert cycle == pytest.approx([1e-2, fallen, fallen, 1e-2, fallen, fallen])
    published = [cyclic_lr(e, 6, 2, schedule="published") for e in range(6)]
    barely = 1e-2 * (1 - 1 / 6) ** 0.9  # the released code divides by E
    assert published == pytest.approx([1e-2, barely, barely, 1e-2, barely, barely])
    # The paper's setting: E = 600, C = 3 (Tc = 200); the lr stops falling after 100 epochs of a cycle.
    assert cyclic_lr(150, 600, 3) == pytest.approx(1e-2 * 0.5 ** 0.9)
    assert cyclic_lr(399, 600, 3) == pytest.approx(1e-2 * 0.5 ** 0.9)
    assert cyclic_lr(450, 600, 3, schedule="published") == pytest.approx(1e-2 * (1 - 50 / 600) ** 0.9)  # t = 50
    assert cyclic_lr(550, 600, 3, schedule="published") == pytest.approx(1e-2 * (1 - 100 / 600) ** 0.9)
    assert cyclic_lr(401, 600, 3, gamma=0.5) == pytest.approx(1e-2 * (1 - 1 / 200) ** 0.9)


def test_kept_epochs_by_rule():
    assert kept_epochs(6, 2, 2, "last") == [1, 2, 4, 5]
    # (e + 1) mod 3 >= 1: epochs 0, 1, 3, 4 (the released rule keeps Tc-k-1 .. Tc-2)
    assert kept_epochs(6, 2, 2, "published") == [0, 1, 3, 4]
    last = kept_epochs(600, 3, 10, "last")
    assert len(last) == 30 and last[:10] == list(range(190, 200)) and last[-1] == 599
    published = kept_epochs(600, 3, 10, "published")
    assert published[:10] == list(range(189, 199)) and published[-10:] == list(range(589, 599))


def test_shipped_weak_configs():
    from pathlib import Path

    from medclipsam.weak.settings import load_weak_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    published = load_weak_config(str(configs / "weak.yaml"))
    assert published == WeakConfig()  # the file states the defaults, which are the published settings
    t = published.training
    assert (t.epochs, t.cycles, t.keep_per_cycle, t.gamma, t.initial_lr) == (600, 3, 10, 0.5, 1e-2)
    assert published.ensemble.threshold == 0.2
    smoke = load_weak_config(str(configs / "weak_cpu_smoke.yaml"))
    assert (smoke.training.epochs, smoke.training.cycles, smoke.training.keep_per_cycle) == (6, 2, 2)


def test_settings_refuse_cycles_that_do_not_fit():
    with pytest.raises(ValidationError, match=r"epochs \(10\) must be a multiple of cycles \(3\)"):
        WeakConfig.model_validate({"training": {"epochs": 10, "cycles": 3}})
    with pytest.raises(ValidationError, match=r"keep_per_cycle \(5\) is longer than a cycle \(3 epochs\)"):
        WeakConfig.model_validate({"training": {"epochs": 6, "cycles": 2, "keep_per_cycle": 5}})


def test_binary_entropy():
    p = np.array([0.0, 1.0, 0.5, 0.2, 0.8])
    h = binary_entropy(p)
    expected = -(0.2 * math.log2(0.2) + 0.8 * math.log2(0.8))  # 0.7219...
    assert h == pytest.approx([0.0, 0.0, 1.0, expected, expected], abs=1e-6)
    members = np.array([[1.0, 0.0, 1.0, 0.3], [1.0, 0.0, 0.0, 0.3]])  # agree with certainty on the first two
    assert binary_entropy(members.mean(axis=0)) == pytest.approx([0.0, 0.0, 1.0, 0.8812908992306927], abs=1e-6)
    grid = binary_entropy(np.linspace(0, 1, 1001))
    assert np.isfinite(grid).all() and grid.min() >= 0.0 and grid.max() <= 1.0 + 1e-7


def test_case_uncertainty_hand_worked():
    p = np.zeros((5, 5))
    p[2, 2] = 0.5  # H = 1, the mask (p > 0.2)
    p[2, 3] = 0.2  # H = 0.7219, not in the mask (0.2 is not > 0.2)
    mask = p > 0.2
    ring = outer_ring(mask)
    assert ring.sum() == 8 and not ring[2, 2]  # a single pixel's 3 x 3 ring
    h = binary_entropy(p)
    assert case_uncertainty(h, mask) == pytest.approx(100 * (1 + 0.7219280948873623) / 8, rel=1e-6)
    assert math.isnan(case_uncertainty(h, np.zeros_like(mask)))
    volume = np.zeros((3, 5, 5), bool)
    volume[1, 2, 2] = True
    assert outer_ring(volume).sum() == 8  # in-plane only: the 2D configuration's view


def _check(folder):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem


def test_export_2d_pairs_by_case_id_and_passes_nnunet_check(tmp_path):
    data = disc_images(tmp_path / "data", 5, rgb=True)
    (tmp_path / "data" / "images" / "unlabelled.png").write_bytes((data / "images" / "c0.png").read_bytes())
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((64, 64), np.uint8)), str(data / "labels" / "c3.png"))  # empty
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((32, 64), np.uint8)), str(data / "labels" / "c4.png"))  # wrong shape
    cases, skipped = cases_from_folders(str(data / "images"), str(data / "labels"))
    assert [c.case_id for c in cases] == ["c0", "c1", "c2", "c3", "c4"] and skipped == {"unlabelled": "no label"}
    with nnunet_environment(tmp_path / "work") as env:
        summary = export_dataset(cases, env["nnUNet_raw"], 7, "parts")
        _check(summary.folder)
    assert summary.cases == ["c0", "c1", "c2"] and summary.file_ending == ".png"
    assert "0 foreground pixels" in summary.skipped["c3"] and "shape (32, 64)" in summary.skipped["c4"]
    dataset = json.loads((summary.folder / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "target": 1} and dataset["numTraining"] == 3
    assert dataset["channel_names"] == {"0": "zscore"} and dataset["file_ending"] == ".png"
    for case in summary.cases:
        rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "images" / f"{case}.png"))).astype(float)
        grey = sitk.GetArrayFromImage(sitk.ReadImage(str(summary.folder / "imagesTr" / f"{case}_0000.png")))
        assert grey.ndim == 2 and np.abs(grey - (rgb @ [0.299, 0.587, 0.114])).max() <= 0.5  # luminance
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(summary.folder / "labelsTr" / f"{case}.png")))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labels" / f"{case}.png"))) > 0
        assert set(np.unique(label)) == {0, 1} and np.array_equal(label > 0, truth)  # its own label


def test_export_volumes_keeps_geometry(tmp_path, samples_root):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for case in ("brain1", "brain2"):
        image = sitk.ReadImage(str(samples_root / "images" / f"{case}.nrrd"))
        label = sitk.ReadImage(str(samples_root / "labels" / f"{case}.nrrd"))
        truth = sitk.GetArrayFromImage(label) > 0
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        sitk.WriteImage(image[:, :, k - 2:k + 2], str(tmp_path / "images" / f"{case}.nrrd"))
        sitk.WriteImage(label[:, :, k - 2:k + 2], str(tmp_path / "labels" / f"{case}.nrrd"))
    cases, _ = cases_from_folders(str(tmp_path / "images"), str(tmp_path / "labels"))
    with nnunet_environment(tmp_path / "work") as env:
        summary = export_dataset(cases, env["nnUNet_raw"], 8, "volumes", normalization="CT")
        _check(summary.folder)
    assert summary.file_ending == ".nii.gz" and summary.cases == ["brain1", "brain2"]
    for case in summary.cases:
        source = sitk.ReadImage(str(tmp_path / "images" / f"{case}.nrrd"))
        exported = sitk.ReadImage(str(summary.folder / "imagesTr" / f"{case}_0000.nii.gz"))
        label = sitk.ReadImage(str(summary.folder / "labelsTr" / f"{case}.nii.gz"))
        for written in (exported, label):
            assert written.GetSpacing() == pytest.approx(source.GetSpacing())
            assert written.GetOrigin() == pytest.approx(source.GetOrigin())
            assert written.GetDirection() == pytest.approx(source.GetDirection())
        assert np.array_equal(sitk.GetArrayFromImage(exported), sitk.GetArrayFromImage(source))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels" / f"{case}.nrrd"))) > 0
        assert np.array_equal(sitk.GetArrayFromImage(label), truth.astype(np.uint8))


def test_mixed_2d_and_volumes_are_refused(tmp_path, samples_root):
    data = disc_images(tmp_path / "data", 2)
    image = sitk.ReadImage(str(samples_root / "images" / "brain1.nrrd"))[:, :, 10:12]
    label = sitk.ReadImage(str(samples_root / "labels" / "brain1.nrrd"))[:, :, 10:12]
    label = sitk.Cast(label, sitk.sitkUInt8) + 1  # non-empty
    sitk.WriteImage(image, str(data / "images" / "vol.nii.gz"))
    sitk.WriteImage(label, str(data / "labels" / "vol.nii.gz"))
    cases, _ = cases_from_folders(str(data / "images"), str(data / "labels"))
    with nnunet_environment(tmp_path / "work") as env, pytest.raises(InputError, match="mix 2D images and volumes"):
        export_dataset(cases, env["nnUNet_raw"], 9, "mixed")


def test_cases_from_a_pseudolabel_run(tmp_path):
    records = [CaseRecord("a", "/in/a.png", mask_uri="/run/masks/a.png"),
               CaseRecord("b", "/in/b.png", status="error", error="SAM: boom"),
               CaseRecord("c", "/in/c.png", mask_uri="/run/masks/c.png", status="no_target")]
    write_manifest(records, str(tmp_path / "manifest.parquet"))
    cases, skipped = cases_from_pseudo(str(tmp_path))
    assert [(c.case_id, c.image_uri, c.label_uri) for c in cases] == [("a", "/in/a.png", "/run/masks/a.png")]
    assert skipped == {"b": "status error", "c": "status no_target"}
    with pytest.raises(InputError, match=r"no manifest\.parquet"):
        cases_from_pseudo(str(tmp_path / "elsewhere"))


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    from medclipsam.weak.training import _check_same_run

    config = WeakConfig.model_validate({"training": {"epochs": 6, "cycles": 2, "keep_per_cycle": 2}})
    _check_same_run(str(tmp_path), config, ["a", "b"])
    _check_same_run(str(tmp_path), config, ["a", "b"])  # the same run continues
    longer = WeakConfig.model_validate({"training": {"epochs": 8, "cycles": 2, "keep_per_cycle": 2}})
    with pytest.raises(InputError, match=r"weak_run\.json: this output was trained with other training;"):
        _check_same_run(str(tmp_path), longer, ["a", "b"])
    with pytest.raises(InputError, match="other cases"):
        _check_same_run(str(tmp_path), config, ["a"])


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--pseudo", "p", "--images", "i", "--output", "o"], "give either --pseudo RUN_OUTPUT or --images"),
    (["train", "--images", "i", "--output", "o"], "--images needs --labels"),
    (["train", "--pseudo", "p", "--output", "o", "--workers", "2"], "--workers > 1 needs --gpu"),
    (["train", "--pseudo", "p", "--output", "o", "--epochs", "10", "--cycles", "3"],
     r"invalid configuration: training: epochs \(10\) must be a multiple of cycles \(3\)"),
    (["predict", "--model", "MISSING", "--input", "IMAGES", "--output", "o"], r"/nothing: no ensemble\.json"),
])
def test_weak_usage_errors_exit_2_before_any_work(tmp_path, monkeypatch, args, message):
    from click.testing import CliRunner

    from medclipsam.cli import main

    monkeypatch.chdir(tmp_path)
    started = []
    monkeypatch.setattr(sys.modules["medclipsam.cli.common"], "start_ray", started.append)
    (tmp_path / "p").mkdir()
    disc_images(tmp_path / "data", 1)
    args = [str(tmp_path / "data" / "images") if a == "IMAGES" else str(tmp_path / "nothing") if a == "MISSING"
            else a for a in args]
    result = CliRunner().invoke(main, ["weak", *args])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert started == []  # refused before Ray was joined or started


def test_predict_takes_the_output_folder_of_weak_train(tmp_path):
    """``weak predict --model`` names the folder the user gave ``weak train --output``, or its
    ``ensemble/`` folder: both reach the same ensemble; a folder with neither is refused."""
    from medclipsam.weak.ensemble import ENSEMBLE_DIR, ENSEMBLE_FILE, ensemble_folder_of

    trained = tmp_path / "trained"
    (trained / ENSEMBLE_DIR).mkdir(parents=True)
    (trained / ENSEMBLE_DIR / ENSEMBLE_FILE).write_text("{}")
    ensemble = str(trained / ENSEMBLE_DIR)
    assert ensemble_folder_of(str(trained)) == ensemble
    assert ensemble_folder_of(ensemble) == ensemble
    (tmp_path / "other").mkdir()
    with pytest.raises(InputError, match=r"other: no ensemble\.json here nor in ensemble/; pass the output folder"):
        ensemble_folder_of(str(tmp_path / "other"))
