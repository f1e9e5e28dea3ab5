"""DHN-NCE fine-tuning end to end: Ray Train, unusable rows skipped, MLflow registration, the champion in a task."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from disc_cohort import disc_images
from synthetic_pairs import make_pairs

from medclipsam.cli import main
from medclipsam.finetune.data import clip_pixels
from medclipsam.finetune.retrieval import retrieval_metrics
from medclipsam.finetune.settings import FinetuneConfig
from medclipsam.models.biomedclip import load_clip
from medclipsam.models.checkpoints import sha256_of


def held_out_retrieval(clip, pairs_csv):
    import pyarrow.csv as pacsv
    import SimpleITK as sitk

    table = pacsv.read_csv(pairs_csv).to_pylist()
    pixels = torch.as_tensor(np.stack([
        clip_pixels(sitk.GetArrayFromImage(sitk.ReadImage(row["image"])), clip.image_size, clip.mean, clip.std)
        for row in table]))
    with torch.no_grad():
        image = clip.model.encode_image(pixels)
        text = clip.model.encode_text(clip.tokenizer([row["caption"] for row in table]))
    return retrieval_metrics(image, text, batch=50, shuffles=1), image, text


def test_finetune_learns_and_registers(tmp_path, ray_session, tiny_clip_dir, monkeypatch):
    """A worker lost mid-run, and the restart from its last checkpoint, are test_node_loss.py's."""
    from mlflow import MlflowClient

    pairs = make_pairs(tmp_path / "pairs", 48, seed=0)
    with pairs.open("a") as handle:  # rows the trainer must count and skip, not crash on
        handle.write(f"{tmp_path / 'pairs' / 'missing.png'},a caption for an image that does not exist\n")
        (tmp_path / "pairs" / "corrupt.png").write_bytes(b"not a png")
        handle.write(f"{tmp_path / 'pairs' / 'corrupt.png'},a caption for an image that is corrupt\n")
        handle.write(f"{tmp_path / 'pairs' / 'img000.png'},too short\n")
    held_out = make_pairs(tmp_path / "held_out", 24, seed=1)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = FinetuneConfig.model_validate({
        "model": str(tiny_clip_dir), "data": {"val_fraction": 0.25},
        "loss": {"name": "dhn_nce", "temperature": 0.1},
        "optim": {"epochs": 6, "batch_size": 8, "lr": 1e-3, "warmup_fraction": 0.1},
        "freeze": {"text_layers": 6}, "eval": {"batch": 50, "shuffles": 2},
        "registry": {"tracking_uri": tracking, "model_name": "tiny-dhnnce"},
    })
    from medclipsam.finetune.trainer import run_finetune

    before, _, _ = held_out_retrieval(load_clip(str(tiny_clip_dir)), held_out)
    result = run_finetune(config, str(pairs), workers=1, storage_path=str(tmp_path / "runs"), name="t")
    assert result.skipped_images == 2 and result.dropped_short == 1 and result.pairs_used == 48
    assert result.metrics["start_epoch"] == 0 and result.metrics["epoch"] == 5
    client = MlflowClient(tracking)
    history = client.get_metric_history(result.run_id, "loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4, 5]  # each epoch logged once
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert losses[-1] < losses[0]
    params = client.get_run(result.run_id).data.params
    assert params["loss.name"] == "dhn_nce" and params["optim.epochs"] == "6"
    # Registered, but no alias moved: that is the promotion gate's decision
    assert client.get_registered_model("tiny-dhnnce").aliases == {}
    version = client.get_model_version("tiny-dhnnce", result.version)
    assert version.tags["medclipsam.kind"] == "clip" and "loss" in version.tags
    assert version.tags["medclipsam.weights_sha256"] == sha256_of(
        str(Path(result.checkpoint_dir) / "model" / "open_clip_pytorch_model.bin"))
    from medclipsam.registry import gate

    gate.promote(client, gate.Request("tiny-dhnnce", result.version, force=True, reason="first model"), None)

    import mlflow

    mlflow.set_tracking_uri(tracking)
    registered = load_clip("models:/tiny-dhnnce@champion")
    checkpoint = load_clip(str(Path(result.checkpoint_dir) / "model"))
    after, image_a, text_a = held_out_retrieval(registered, held_out)
    _, image_b, text_b = held_out_retrieval(checkpoint, held_out)
    torch.testing.assert_close(image_a, image_b)  # the registered model is the trained one
    torch.testing.assert_close(text_a, text_b)
    # 24 held-out pairs, each caption twice (12 classes): a random ranking finds a match about
    # 1 time in 12 image->text and 1 in 24 text->image.
    mean_before = (before["i2t_top1"] + before["t2i_top1"]) / 2
    mean_after = (after["i2t_top1"] + after["t2i_top1"]) / 2
    print("held-out retrieval before", before, "after", after)
    assert mean_after >= 2 * (1 / 12 + 1 / 24) / 2 and mean_after >= mean_before + 0.06

    # The champion in a task config, as a user points a task at the fine-tuned model
    images = disc_images(tmp_path / "cohort", 2, size=96)
    task = tmp_path / "task.yaml"
    task.write_text(yaml.safe_dump({"task": "t", "sam": {"backend": "litemedsam"},
                                    "saliency": {"steps": 2, "copies": 2},
                                    "text": {"prompts": ["a bright round disc"],
                                             "clip_model": "models:/tiny-dhnnce@champion"}}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    run = CliRunner().invoke(main, ["segment", "--config", str(task), "--input", str(images / "images"),
                                    "--output", str(tmp_path / "segmented")])
    assert run.exit_code == 0, run.output
    rows = pq.read_table(tmp_path / "segmented" / "manifest.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # the alias was resolved once, at the start: the manifest names the version
    assert {(r["clip_model"], r["clip_sha256"]) for r in rows} == {(f"models:/tiny-dhnnce/{result.version}",
                                                                    registered.sha256)}


def test_unusable_pairs_are_an_error(tmp_path, ray_session, tiny_clip_dir):
    from medclipsam.errors import InputError
    from medclipsam.finetune.trainer import run_finetune

    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"image,caption\n{tmp_path / 'gone.png'},a caption long enough to be kept\n")
    config = FinetuneConfig.model_validate({"model": str(tiny_clip_dir)})
    with pytest.raises(InputError, match="fewer than 2 usable pairs"):
        run_finetune(config, str(pairs), storage_path=str(tmp_path / "runs"))
