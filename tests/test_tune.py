"""``medclipsam tune`` on Ray Tune: a 2 x 2 x 2 grid on a tiny CLIP model and labelled synthetic images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from disc_cohort import disc_images

from medclipsam.cli import main
from medclipsam.eval.evaluation import evaluate


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, ray_session, tiny_clip_dir, mlflow_template):
    root = tmp_path_factory.mktemp("tune")
    data = disc_images(root / "data", 3, size=96, seed=4)
    shutil.copy(mlflow_template, root / "mlflow.db")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    (root / "task.yaml").write_text(yaml.safe_dump({
        "task": "discs", "text": {"prompts": ["a bright round disc"], "clip_model": str(tiny_clip_dir)},
        "saliency": {"steps": 2, "copies": 2, "batch_size": 4}, "sam": {"backend": "litemedsam"},
        "pipeline": {"saliency": {"num_cpus": 0.5}, "sam": {"num_cpus": 0.5}}, "tracking": {"uri": tracking}}))
    (root / "space.yaml").write_text(yaml.safe_dump({
        "saliency.layer": [8, 9], "saliency.beta": [0.1, 1.0], "coarse.method": ["kmeans", "threshold"]}))
    result = CliRunner().invoke(main, ["tune", "--config", str(root / "task.yaml"), "--input", str(data / "images"),
                                       "--gt", str(data / "labels"), "--output", str(root / "out"), "--space",
                                       str(root / "space.yaml")])
    assert result.exit_code == 0, result.output
    return {"root": root, "data": data, "tracking": tracking, "output": result.output}


def test_trials_are_logged_and_the_best_is_picked(tuned):
    from mlflow import MlflowClient

    root = tuned["root"]
    assert "8 trial(s)" in tuned["output"]
    client = MlflowClient(tuned["tracking"])
    experiment = client.get_experiment_by_name("medclipsam-tune")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 8
    logged = {(int(r.data.params["saliency.layer"]), float(r.data.params["saliency.beta"]),
               r.data.params["coarse.method"]): r.data.metrics["dsc"] for r in children}
    assert len(logged) == 8
    best = yaml.safe_load((root / "out" / "best.yaml").read_text())
    best_key = (best["saliency"]["layer"], best["saliency"]["beta"], best["coarse"]["method"])
    assert logged[best_key] == max(logged.values())  # the written settings are a trial with the top score
    assert parents[0].data.metrics["best_dsc"] == pytest.approx(logged[best_key])
    assert len(set(logged.values())) > 1  # the settings matter on these images
    table = (root / "out" / "trials.csv").read_text().splitlines()
    assert len(table) == 9 and "dsc_coarse" in table[0]
    assert "class='best'" in (root / "out" / "report.html").read_text()


def test_the_cache_runs_m2ib_once_per_layer_beta_and_image(tuned):
    # 2 layers x 2 betas x 3 images; the 2 coarse methods reuse the maps
    assert "M2IB ran for 12 image(s)" in tuned["output"]
    from mlflow import MlflowClient

    client = MlflowClient(tuned["tracking"])
    runs = client.search_runs([client.get_experiment_by_name("medclipsam-tune").experiment_id])
    client_metric = [r.data.metrics["m2ib_images"] for r in runs if "m2ib_images" in r.data.metrics]
    assert client_metric == [12.0]


def test_the_best_yaml_runs_in_segment_and_reproduces_the_score(tuned, tmp_path):
    root, data = tuned["root"], tuned["data"]
    best = yaml.safe_load((root / "out" / "best.yaml").read_text())
    result = CliRunner().invoke(main, ["segment", "--config", str(root / "out" / "best.yaml"), "--input",
                                       str(data / "images"), "--output", str(tmp_path / "seg")])
    assert result.exit_code == 0, result.output
    _, summary = evaluate(str(tmp_path / "seg" / "masks"), str(data / "labels"))
    header = (root / "out" / "best.yaml").read_text().splitlines()[0]
    best_dsc = float(header.split("= ")[1].split(" ")[0])
    assert summary["dsc"] == pytest.approx(best_dsc, abs=0.01)
    assert best["task"] == "discs" and json.dumps(best["text"]["prompts"]) == '["a bright round disc"]'
    assert np.isfinite(summary["nsd"])
