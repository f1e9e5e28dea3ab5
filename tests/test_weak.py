"""The weak stage end to end on CPU: real nnU-Net trained on Ray Train (killed once and resumed),
the checkpoint ensemble, registration in MLflow, and ``weak predict`` on Ray Data from the registry.

One small training run (E = 6, C = 2, k = 2, 4 iterations per epoch on 8 images of 64 x 64) serves
every test of this module.
"""

from __future__ import annotations

import json
import os
import shutil

import highdicom as hd
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from dicom_series import write_mr_series
from disc_cohort import disc_images
from ray_faults import KillWorkersOnce

from medclipsam.cli import main
from medclipsam.domain.images import dicom_series_files, read_image, read_mask
from medclipsam.weak.dataset import cases_from_folders, nnunet_input
from medclipsam.weak.ensemble import Ensemble, resolve_ensemble
from medclipsam.weak.nnunet_env import CONFIGURATION, FOLD, TRAINER_NAME, nnunet_environment, trained_folder
from medclipsam.weak.schedule import cyclic_lr, kept_epochs, member_name
from medclipsam.weak.settings import WeakConfig
from medclipsam.weak.uncertainty import binary_entropy, case_uncertainty

E, C, K = 6, 2, 2


def _config(tracking: str) -> WeakConfig:
    return WeakConfig.model_validate({
        "training": {"epochs": E, "cycles": C, "keep_per_cycle": K, "iterations_per_epoch": 4,
                     "val_iterations_per_epoch": 1, "augment_processes": 0},
        "data": {"dataset_id": 511, "dataset_name": "weaktest"},
        "prediction": {"use_mirroring": False},
        "tracking": {"uri": tracking, "experiment": "weak-test"},
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session, mlflow_template):
    """One training run, killed after epoch 2 and resumed by Ray Train, registered as weak-test (then given
    @champion by a forced promotion)."""
    from medclipsam.weak.training import run_weak_training

    root = tmp_path_factory.mktemp("weak")
    data = disc_images(root / "data", 8)
    shutil.copy(mlflow_template, root / "mlflow.db")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    config = _config(tracking)
    cases, skipped = cases_from_folders(str(data / "images"), str(data / "labels"))
    marker = root / "killed-once"
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"  # the controller sees each report at once
    try:
        result = run_weak_training(cases, skipped, str(root / "run"), config, "test", register="weak-test",
                                   callbacks=[KillWorkersOnce(epoch=2, marker=marker)], work=root / "work")
    finally:
        os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    from mlflow import MlflowClient

    from medclipsam.models.checkpoints import sha256_of
    from medclipsam.registry import gate

    client = MlflowClient(tracking)
    assert client.get_registered_model("weak-test").aliases == {}  # training moves no alias
    tags = client.get_model_version("weak-test", result.version).tags
    assert tags["medclipsam.kind"] == "weak-ensemble"
    assert tags["medclipsam.weights_sha256"] == sha256_of(str(root / "run" / "ensemble" / "ensemble.json"))
    gate.promote(client, gate.Request("weak-test", result.version, force=True, reason="first ensemble"), None)
    return {"root": root, "data": data, "config": config, "tracking": tracking, "result": result, "marker": marker}


def test_killed_run_resumes_and_keeps_the_rule_checkpoints(trained):
    from mlflow import MlflowClient

    result = trained["result"]
    killed = json.loads(trained["marker"].read_text())
    assert killed["epoch"] == 2 and len(killed["pids"]) == 1 and killed["checkpoint"]
    assert result.metrics["start_epoch"] == 3 and result.metrics["epoch"] == E - 1  # continued, not restarted
    expected = [member_name(e) for e in kept_epochs(E, C, K, "last")]
    assert expected == ["checkpoint_epoch0001.pth", "checkpoint_epoch0002.pth", "checkpoint_epoch0004.pth",
                        "checkpoint_epoch0005.pth"]
    manifest = json.loads((trained["root"] / "run" / "ensemble" / "ensemble.json").read_text())
    assert manifest["members"] == expected and result.members == expected
    written = sorted(p.name for p in (trained["root"] / "run" / "ensemble" / f"fold_{FOLD}").iterdir())
    assert written == sorted([*expected, "checkpoint_final.pth"])
    assert sorted(result.cases) == [f"c{i}" for i in range(8)]
    # nnU-Net's own log of the lr, one value per epoch, equals the formula at every epoch
    history = MlflowClient(trained["tracking"]).get_metric_history(result.run_id, "lr")
    assert sorted(m.step for m in history) == list(range(E))  # every epoch logged once, across the kill
    by_epoch = {m.step: m.value for m in history}
    assert [by_epoch[e] for e in range(E)] == pytest.approx([cyclic_lr(e, E, C) for e in range(E)])


def test_the_trainer_follows_the_published_schedule_too(trained):
    """The trainer's optimiser, stepped as nnU-Net steps it, has the formula's lr at every epoch."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    from medclipsam.weak.training import _configure

    config = trained["config"].model_copy(deep=True)
    config.training.schedule = "published"
    with nnunet_environment(trained["root"] / "work"):
        trainer = get_trainer_from_args("511", CONFIGURATION, FOLD, TRAINER_NAME, device=torch.device("cpu"))
        _configure(trainer, config)
        trainer.initialize()
        seen = []
        for epoch in range(E):
            trainer.lr_scheduler.step(epoch)
            seen.append(trainer.optimizer.param_groups[0]["lr"])
    assert type(trainer).__name__ == TRAINER_NAME and trainer.optimizer.param_groups[0]["momentum"] == 0.99
    assert seen == pytest.approx([cyclic_lr(e, E, C, schedule="published") for e in range(E)])


def test_ensemble_averages_the_members_probabilities(trained):
    """Each member run on its own through nnU-Net's predictor, by hand; the ensemble is their mean."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folder = resolve_ensemble(str(trained["root"] / "run" / "ensemble"))
    image = read_image(str(trained["data"] / "images" / "c3.png"))
    array, properties = nnunet_input(image)
    by_hand = []
    for name in folder.members("cycles"):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    device=torch.device("cpu"), allow_tqdm=False)
        with nnunet_environment(None):
            predictor.initialize_from_trained_model_folder(str(folder.path), (FOLD,), name)
        _, probabilities = predictor.predict_single_npy_array(array, dict(properties), None, None, True)
        by_hand.append(probabilities[1][0])
    ensemble = Ensemble(folder, "cycles", "cpu", use_mirroring=False)
    p = ensemble.probability(array, properties, is_volume=False)
    assert p.shape == image.array.shape[:2]
    np.testing.assert_allclose(p, np.mean(by_hand, axis=0), atol=1e-5)
    assert np.abs(by_hand[0] - by_hand[-1]).max() > 1e-3  # the members differ, so the mean means something
    h = binary_entropy(p)
    assert h.min() >= 0 and h.max() <= 1 and h.max() > 0.1
    trained_dir = trained_folder(trained["root"] / "work", 511, "weaktest")
    assert (trained_dir / f"fold_{FOLD}" / "checkpoint_final.pth").exists()


def test_weak_predict_from_the_registry(trained, tmp_path):
    """``weak predict --model models:/weak-test@champion`` on Ray Data: masks with the source geometry,
    the manifest's uncertainty equals the saved maps' score, scores against the truth; the stack written as
    a DICOM series also gets a binary SEG of its mask and a FRACTIONAL SEG of its probabilities."""
    data = trained["data"]
    volume = np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(data / "images" / f"c{i}.png"))) for i in range(3)])
    cohort = tmp_path / "cohort"
    shutil.copytree(data / "images", cohort)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((1.0, 1.0, 2.5))
    image.SetOrigin((4.0, -3.0, 10.0))
    sitk.WriteImage(image, str(cohort / "stack.nii.gz"))
    write_mr_series(image, cohort / "stackdcm")
    out = tmp_path / "predicted"
    result = CliRunner().invoke(main, ["weak", "predict", "--model", "models:/weak-test@champion", "--input",
                                       str(cohort), "--gt", str(data / "labels"), "--output", str(out),
                                       "--save-maps", "--mask-format", "auto,dicom-seg,fractional-seg",
                                       "--tracking-uri", trained["tracking"]])
    assert result.exit_code == 0, result.output
    assert "10 case(s): ok=10 (0 done earlier, 10 now" in result.output
    version = trained["result"].version
    recorded = json.loads((out / "run.json").read_text())["models"][0]
    assert recorded["role"] == "ensemble"
    assert recorded["requested"] == "models:/weak-test@champion" and recorded["version"] == version
    assert recorded["uri"] == f"models:/weak-test/{version}"
    rows = {r["case_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert sorted(rows) == sorted([f"c{i}" for i in range(8)] + ["stack", "stackdcm"])
    assert {case: row["mask_formats"] for case, row in rows.items() if row["mask_formats"] != "png"} == {
        "stack": "nifti", "stackdcm": "nifti,dicom-seg,fractional-seg"}
    for case, row in rows.items():
        p = np.load(out / "prob" / f"{case}.npy")
        mask = read_mask(row["mask_uri"]).array
        assert np.array_equal(mask, p > 0.2)  # the published threshold
        entropy = np.load(out / "entropy" / f"{case}.npy")
        np.testing.assert_allclose(entropy, binary_entropy(p), atol=1e-6)
        assert row["uncertainty"] == pytest.approx(case_uncertainty(entropy, mask), rel=1e-6)
        # the alias was resolved once, at the start: the manifest names the version
        assert row["backend"] == "nnunet-ensemble" and row["checkpoint"] == f"models:/weak-test/{version}"
    order = [pydicom.dcmread(name, stop_before_pixels=True).SOPInstanceUID
             for name in dicom_series_files(str(cohort / "stackdcm"), "stackdcm")]
    fractional = hd.seg.segread(out / "masks" / "stackdcm.prob.seg.dcm")
    assert fractional.SegmentationType == "FRACTIONAL"
    stored = fractional.get_pixels_by_source_instance(order, segment_numbers=[1], rescale_fractional=False)
    p = np.load(out / "prob" / "stackdcm.npy")
    np.testing.assert_array_equal(stored[..., 0], np.round(p * 255))  # the ensemble's mean, in steps of 1/255
    binary = hd.seg.segread(out / "masks" / "stackdcm.seg.dcm").get_pixels_by_source_instance(
        order, segment_numbers=[1], combine_segments=True, assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(binary > 0, p > 0.2)
    np.testing.assert_allclose(p, np.load(out / "prob" / "stack.npy"), atol=1e-5)  # same voxels, same model
    stack = read_mask(rows["stack"]["mask_uri"])
    assert stack.array.shape == (3, 64, 64) and stack.spacing == pytest.approx((1.0, 1.0, 2.5))
    assert stack.origin == pytest.approx((4.0, -3.0, 10.0))
    scored = [rows[f"c{i}"]["dsc"] for i in range(8)]
    assert np.mean(scored) > 0.6, scored  # the ensemble learned the discs
    rerun = CliRunner().invoke(main, ["weak", "predict", "--model", "models:/weak-test@champion", "--input",
                                      str(cohort), "--output", str(out), "--tracking-uri", trained["tracking"]])
    assert rerun.exit_code == 0 and "(10 done earlier, 0 now" in rerun.output


def test_gate_scores_an_ensemble_through_weak_predict(trained, tmp_path):
    """The promotion gate on the weak-ensemble kind: the same ensemble registered again ties with the
    holder (kept, exit 3), and the recorded score is weak predict's mean DSC on the set."""
    import math

    from mlflow import MlflowClient

    from medclipsam.weak.predict import run_weak_predict
    from medclipsam.weak.training import register_ensemble

    result, tracking, data = trained["result"], trained["tracking"], trained["data"]
    copy = register_ensemble(result.ensemble_uri, result.run_id, "weak-test", {})
    promoted = CliRunner().invoke(main, ["models", "promote", "weak-test", "--version", copy, "--eval-set", str(data),
                                         "--margin", "0", "--work-dir", str(tmp_path / "evals"),
                                         "--tracking-uri", tracking])
    assert promoted.exit_code == 3, promoted.output
    assert f"kept: weak-test@champion -> v{result.version}" in promoted.output
    client = MlflowClient(tracking)
    tags = client.get_model_version("weak-test", copy).tags
    candidate = float(tags["medclipsam.promotion.champion.candidate_dsc"])
    assert candidate == float(tags["medclipsam.promotion.champion.holder_dsc"])  # same weights: a tie
    direct = run_weak_predict(result.ensemble_uri, str(data / "images"), str(tmp_path / "direct"), WeakConfig(),
                              str(data / "labels"), runner="local")  # the gate's settings: no --config given
    expected = sum(r.dsc if math.isfinite(r.dsc) else 0.0 for r in direct.records) / 8
    assert candidate == pytest.approx(expected, abs=1e-6) and expected > 0.6
