"""A node lost in the middle of training: Ray Train starts the workers again on the surviving node
from the last checkpoint, for weak training (real nnU-Net) and for fine-tuning (a small CLIP).

Two Ray nodes on this machine (``ray.cluster_utils.Cluster``: a head, where this test's driver
runs, and a worker node, each with its own raylet and 2 CPUs). While an actor holds the head's
CPUs, the training worker can only start on the worker node; once epoch 1 is reported and
checkpointed, a Ray Train callback kills that node (its raylet and every process under it,
SIGKILL) and then the actor holding the head, so the workers can start again there only. The
placement of every reported epoch is noted, so the tests see which node trained each epoch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from disc_cohort import disc_images
from ray_faults import LoseNodeOnce
from synthetic_pairs import make_pairs

from medclipsam.weak.nnunet_env import folders
from medclipsam.weak.schedule import kept_epochs, member_name
from medclipsam.weak.settings import WeakConfig

HOLD = ("node-loss-hold", "medclipsam-tests")  # the actor's name and namespace
KILL_AT = 1  # the epoch after whose checkpoint the worker node is lost
EPOCHS = 3


def _weak_config(tracking: str) -> WeakConfig:
    return WeakConfig.model_validate({
        "training": {"epochs": EPOCHS, "cycles": 1, "keep_per_cycle": 2, "iterations_per_epoch": 2,
                     "val_iterations_per_epoch": 1, "augment_processes": 0},
        "data": {"dataset_id": 512, "dataset_name": "nodeloss"},
        "tracking": {"uri": tracking, "experiment": "node-loss"}})


@pytest.fixture(scope="module")
def weak_inputs(tmp_path_factory):
    """The weak training cases, exported and preprocessed before this process starts Ray, as the
    command does: nnU-Net forks, and a fork of a process running a Ray node inherits its SIGTERM
    handler (a terminated child then drains, or stops, the node)."""
    from medclipsam.weak.dataset import cases_from_folders
    from medclipsam.weak.training import prepare

    root = tmp_path_factory.mktemp("weak-node-loss")
    data = disc_images(root / "data", 6)
    cases, skipped = cases_from_folders(str(data / "images"), str(data / "labels"))
    prepare(cases, root / "work", _weak_config("unused"), processes=2)
    return {"root": root, "cases": cases, "skipped": skipped}


@pytest.fixture(scope="module")
def head(weak_inputs):
    """A one-node cluster this process drives; each test adds the worker node it loses."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ["HF_HUB_OFFLINE"] = "1"
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 2})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture()
def doomed(head, tmp_path, monkeypatch):
    """A worker node, the head's CPUs held, and the callback that loses the node after epoch 1."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    worker = head.add_node(num_cpus=2)
    head.wait_for_nodes()
    head_id = ray.get_runtime_context().get_node_id()
    worker_id = worker.node_id
    pids = tmp_path / "node_pids.json"
    pids.write_text(json.dumps([info.process.pid for infos in worker.all_processes.values() for info in infos]))

    @ray.remote(num_cpus=2)
    class Hold:
        def ready(self) -> bool:
            return True

    hold = Hold.options(name=HOLD[0], namespace=HOLD[1],
                        scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)).remote()
    assert ray.get(hold.ready.remote())
    # the controller sees each report at its next poll of the workers: poll often, so the node is
    # lost well before the next epoch ends
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    placements = tmp_path / "placements.jsonl"
    callback = LoseNodeOnce(KILL_AT, placements, pids, HOLD)
    yield {"callback": callback, "placements": placements, "head": head_id, "worker": worker_id, "pids": pids}
    head.remove_node(worker, allow_graceful=False)  # its processes are dead: this reaps them
    try:
        ray.kill(ray.get_actor(*HOLD))
    except ValueError:
        pass  # released by the callback


def trained_on(placements: Path) -> dict[int, list[str]]:
    """The node(s) of the workers at each reported epoch (a repeated report keeps the last)."""
    return {row["epoch"]: row["nodes"] for row in map(json.loads, placements.read_text().splitlines())}


def test_weak_training_continues_on_the_surviving_node(weak_inputs, doomed, tmp_path, mlflow_template):
    from mlflow import MlflowClient

    from medclipsam.weak.training import run_weak_training

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    work, output = weak_inputs["root"] / "work", tmp_path / "run"
    result = run_weak_training(weak_inputs["cases"], weak_inputs["skipped"], str(output), _weak_config(tracking),
                               "test", callbacks=[doomed["callback"]], work=work)

    assert not doomed["pids"].exists()  # the node was lost
    nodes = trained_on(doomed["placements"])
    assert sorted(nodes) == list(range(EPOCHS))
    assert all(nodes[e] == [doomed["worker"]] for e in range(KILL_AT + 1))
    assert all(nodes[e] == [doomed["head"]] for e in range(KILL_AT + 1, EPOCHS))
    assert result.metrics["start_epoch"] == KILL_AT + 1 and result.metrics["epoch"] == EPOCHS - 1  # continued
    expected = [member_name(e) for e in kept_epochs(EPOCHS, 1, 2, "last")]
    manifest = json.loads((output / "ensemble" / "ensemble.json").read_text())
    assert manifest["members"] == expected == result.members
    history = MlflowClient(tracking).get_metric_history(result.run_id, "lr")
    assert sorted(m.step for m in history) == list(range(EPOCHS))  # each epoch logged once, across the loss

    # the worker node trained on its own copy of the shipped dataset, identical to the driver's
    (tar,) = (output / "preprocessed").iterdir()
    node_folder = work / "nodes" / doomed["worker"][:16]
    assert (node_folder / "unpacked.json").read_text() == tar.stem
    dataset = "Dataset512_nodeloss"
    ours = Path(folders(work)["nnUNet_preprocessed"]) / dataset
    theirs = Path(folders(node_folder)["nnUNet_preprocessed"]) / dataset
    listed = {p.relative_to(ours) for p in ours.rglob("*") if p.is_file()} - {Path("splits_final.json")}
    shipped = {p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file()} - {Path("splits_final.json")}
    assert listed == shipped and len(listed) > 6
    assert all((ours / p).read_bytes() == (theirs / p).read_bytes() for p in listed)
    assert not (work / "nodes" / doomed["head"][:16]).exists()  # the driver's node used the work folder


def test_finetuning_continues_on_the_surviving_node(doomed, tmp_path, tiny_clip_dir, mlflow_template):
    from mlflow import MlflowClient

    from medclipsam.finetune.settings import FinetuneConfig
    from medclipsam.finetune.trainer import run_finetune

    pairs = make_pairs(tmp_path / "pairs", 16, seed=0)
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = FinetuneConfig.model_validate({
        "model": str(tiny_clip_dir), "data": {"val_fraction": 0.25},
        "optim": {"epochs": EPOCHS, "batch_size": 8, "lr": 1e-3}, "freeze": {"text_layers": 6},
        "registry": {"tracking_uri": tracking, "model_name": "node-loss"}})
    result = run_finetune(config, str(pairs), storage_path=str(tmp_path / "runs"), name="t",
                          callbacks=[doomed["callback"]])

    assert not doomed["pids"].exists()
    nodes = trained_on(doomed["placements"])
    assert sorted(nodes) == list(range(EPOCHS))
    assert all(nodes[e] == [doomed["worker"]] for e in range(KILL_AT + 1))
    assert all(nodes[e] == [doomed["head"]] for e in range(KILL_AT + 1, EPOCHS))
    assert result.metrics["start_epoch"] == KILL_AT + 1 and result.metrics["epoch"] == EPOCHS - 1
    history = MlflowClient(tracking).get_metric_history(result.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(EPOCHS))  # each epoch logged once
