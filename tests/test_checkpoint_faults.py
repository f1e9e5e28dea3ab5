"""Corrupt checkpoints (issue 13): a resume skips a corrupt last checkpoint, says so, and uses the one
before; a corrupt ensemble member is a ModelError naming the file. Small synthetic folders, no Ray
cluster, no training."""

import hashlib
import json
import logging
import zipfile

import pytest
import torch

from medclipsam.errors import ModelError
from medclipsam.finetune import trainer as finetune
from medclipsam.models import checkpoints
from medclipsam.weak import ensemble, training
from medclipsam.weak.ensemble import ENSEMBLE_FILE, FINAL

OLDER, NEWER, ORPHAN = ("checkpoint_2025-01-01_10-00-00.000001", "checkpoint_2025-01-01_10-05-00.000001",
                        "checkpoint_2025-01-01_10-10-00.000001")


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def finetune_checkpoint(folder, epoch):
    """A fine-tuning checkpoint folder as train_loop writes it (a tiny model)."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "open_clip_config.json").write_text("{}")
    torch.save({"w": torch.zeros(3)}, folder / "model" / "open_clip_pytorch_model.bin")
    torch.save({"model": {"w": torch.full((3,), float(epoch))}, "optimiser": {"state": {}}, "scheduler": {},
                "epoch": epoch}, folder / "train_state.pt")
    (folder / "metrics.json").write_text(json.dumps({"epoch": epoch}))
    return folder


def corrupt(folder, how):
    if how == "truncated train_state.pt":
        truncate(folder / "train_state.pt")
    elif how == "missing train_state.pt":
        (folder / "train_state.pt").unlink()
    else:
        (folder / "metrics.json").write_text('{"epoch": ')


@pytest.mark.parametrize("how", ["truncated train_state.pt", "missing train_state.pt", "unreadable metrics.json"])
def test_newest_valid_skips_a_corrupt_newer_finetune_checkpoint(tmp_path, caplog, how):
    older = finetune_checkpoint(tmp_path / OLDER, epoch=1)
    newer = finetune_checkpoint(tmp_path / NEWER, epoch=2)
    corrupt(newer, how)
    with caplog.at_level(logging.WARNING):
        found, state = checkpoints.newest_valid([newer, older], finetune.read_train_state)
    assert found == older and state["epoch"] == 1 and state["model"]["w"][0] == 1.0
    warning = caplog.text
    assert NEWER in warning and how.split()[-1] in warning  # names the checkpoint and the file at fault
    with caplog.at_level(logging.WARNING):
        assert checkpoints.newest_valid([newer], finetune.read_train_state) is None  # none usable: from scratch


def test_a_resume_falls_back_through_ray_train_checkpoint_folders(tmp_path, caplog):
    """Ray hands the worker its last checkpoint; the older ones are its checkpoint_* siblings."""
    from ray.train import Checkpoint

    run = tmp_path / "run"
    finetune_checkpoint(run / OLDER, epoch=1)
    corrupt(finetune_checkpoint(run / NEWER, epoch=2), "truncated train_state.pt")
    finetune_checkpoint(run / ORPHAN, epoch=3)  # written after Ray's last: not one Ray recorded, never used
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        state = checkpoints.restore_newest(Checkpoint(str(run / NEWER)), finetune.read_train_state)
    assert state["epoch"] == 1
    assert NEWER in caplog.text and "resumes from the older checkpoint" in caplog.text and OLDER in caplog.text
    assert checkpoints.restore_newest(None, finetune.read_train_state) is None  # a first run
    corrupt(run / OLDER, "missing train_state.pt")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert checkpoints.restore_newest(Checkpoint(str(run / NEWER)), finetune.read_train_state) is None
    assert "starts from scratch" in caplog.text


class FakeTrainer:
    """Stands for nnU-Net's trainer: records the states it is handed (loaded by the project, never by nnU-Net)."""

    device = torch.device("cpu")

    def __init__(self):
        self.loaded, self.current_epoch = [], 0

    def load_checkpoint(self, state):
        assert isinstance(state, dict), "nnU-Net must get the loaded state, never a path it would unpickle"
        self.loaded.append(state["current_epoch"])
        self.current_epoch = state["current_epoch"]


def nnunet_state(path, epoch):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": {"w": torch.zeros(256)}, "optimizer_state": {}, "grad_scaler_state": None,
                "logging": {}, "_best_ema": None, "current_epoch": epoch, "init_args": {}}, path)


def test_weak_resume_skips_a_truncated_ray_checkpoint(tmp_path, caplog):
    from ray.train import Checkpoint

    run = tmp_path / "ray_train" / "weak"
    nnunet_state(run / OLDER / "train_state.pth", epoch=4)
    nnunet_state(run / NEWER / "train_state.pth", epoch=5)
    truncate(run / NEWER / "train_state.pth")
    trainer = FakeTrainer()
    with caplog.at_level(logging.WARNING):
        epoch = checkpoints.restore_newest(Checkpoint(str(run / NEWER)),
                                           lambda folder: training.resume_from(trainer, folder))
    assert epoch == 4 and trainer.loaded == [4]  # the corrupt (newer, epoch 5) one never reached it
    assert f"{NEWER}/train_state.pth" in caplog.text and "truncated" in caplog.text


def ensemble_folder(root):
    folder = root / "ensemble"
    member = "checkpoint_epoch0001.pth"
    for name in (member, FINAL):
        nnunet_state(folder / "fold_all" / name, epoch=1)
    sha = {n: hashlib.sha256((folder / "fold_all" / n).read_bytes()).hexdigest() for n in (member, FINAL)}
    (folder / ENSEMBLE_FILE).write_text(json.dumps({"members": [member], "final": FINAL, "sha256": sha}))
    return folder, folder / "fold_all" / member


def test_a_truncated_ensemble_member_is_a_model_error_naming_it(tmp_path):
    folder, member = ensemble_folder(tmp_path)
    ensemble.resolve_ensemble(str(folder))  # complete: accepted
    truncate(member)
    with pytest.raises(ModelError, match=rf"{member}.*truncated"):
        ensemble.resolve_ensemble(str(folder))


def test_an_unreadable_ensemble_member_is_a_model_error_naming_it(tmp_path):
    """Complete as a zip, but not a checkpoint torch can load: found when the weights are loaded."""
    folder, member = ensemble_folder(tmp_path)
    resolved = ensemble.resolve_ensemble(str(folder))
    assert len(ensemble.member_state(resolved, member.name)[0]["w"]) == 256
    with zipfile.ZipFile(member, "w") as archive:
        archive.writestr("archive/data.pkl", b"not a pickle")
    with pytest.raises(ModelError, match=rf"{member}.*cannot be loaded"):
        ensemble.member_state(resolved, member.name)  # loaded after the folder was checked: torch names it
    with pytest.raises(ModelError, match=rf"{member}.*SHA-256 other than.*ensemble.json recorded"):
        ensemble.resolve_ensemble(str(folder))  # checked again: the hash differs, refused before any load
