"""DHN-NCE fine-tuning of a CLIP model with Ray Train, tracked and registered in MLflow.

Driver: read and filter the pairs, check every image once, split off a held-out set, open an
MLflow run, run ``TorchTrainer`` (data parallel; one checkpoint per epoch; a restarted run
continues from the last one), then log and register the final model.
Workers (``train_loop``): load the model, freeze what the config says, train with AdamW, warmup
and cosine decay, gradient accumulation and bf16 autocast on GPU; rank 0 evaluates retrieval,
logs to MLflow and writes the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .. import errors, storage
from ..errors import InputError
from ..models.biomedclip import clip_weights_sha256, load_clip, save_clip
from ..models.checkpoints import CorruptCheckpoint, read_json_checkpoint, read_torch_checkpoint, restore_newest
from ..runs import tracking
from ..runs.tracking import KIND_CLIP
from .losses import contrastive_loss, gather_features
from .pairs import read_pairs, split_pairs
from .retrieval import retrieval_metrics
from .settings import FinetuneConfig

log = logging.getLogger(__name__)


def warmup_cosine(total_steps: int, warmup_fraction: float):
    """LR multiplier: linear warmup over the first steps, then cosine decay to zero."""
    warmup = max(1, int(total_steps * warmup_fraction)) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def apply_freezing(model: torch.nn.Module, config: FinetuneConfig) -> None:
    """Freeze whole towers or their first layers, as configured."""
    freeze = config.freeze
    # The losses use a fixed temperature: CLIP's learnable logit scale (and bias) take no part,
    # and DDP requires every trainable parameter to receive a gradient.
    for name in ("logit_scale", "logit_bias"):
        if isinstance(getattr(model, name, None), torch.nn.Parameter):
            getattr(model, name).requires_grad_(False)
    visual, text = model.visual, getattr(model, "text", None)
    if freeze.image:
        visual.requires_grad_(False)
    elif freeze.image_blocks:
        trunk = visual.trunk
        for part in (trunk.patch_embed, *trunk.blocks[: freeze.image_blocks]):
            part.requires_grad_(False)
        for name in ("cls_token", "pos_embed"):
            if getattr(trunk, name, None) is not None:
                getattr(trunk, name).requires_grad_(False)
    if text is not None:
        if freeze.text:
            text.requires_grad_(False)
        elif freeze.text_layers:
            transformer = text.transformer
            transformer.embeddings.requires_grad_(False)
            for layer in transformer.encoder.layer[: freeze.text_layers]:
                layer.requires_grad_(False)


def _embed(model, clip, pixels: torch.Tensor, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = clip.tokenizer(captions).to(device)
    out = model(pixels.to(device), tokens)
    image, text = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    return image, text


def evaluate_retrieval(clip, batches, config: FinetuneConfig, device) -> dict[str, float]:
    images, texts = [], []
    clip.model.eval()
    with torch.no_grad():
        for batch in batches:
            image, text = _embed(clip.model, clip, torch.as_tensor(batch["pixels"]), list(batch["caption"]), device)
            images.append(image.float().cpu())
            texts.append(text.float().cpu())
    if not images:
        return {}
    return retrieval_metrics(torch.cat(images), torch.cat(texts), config.eval.batch, config.eval.shuffles,
                             config.seed)


TRAIN_STATE = "train_state.pt"
TRAIN_STATE_KEYS = ("model", "optimiser", "scheduler", "epoch")


def read_train_state(folder: Path, device="cpu") -> dict:
    """The training state of a checkpoint folder, once every file of the checkpoint is checked.

    ``train_state.pt`` must load and hold the model, optimiser, scheduler and epoch;
    ``metrics.json`` and ``model/open_clip_config.json`` must be JSON objects and
    ``model/open_clip_pytorch_model.bin`` a PyTorch file that loads (the final checkpoint's are
    read at the end of the run). Anything missing, truncated or unreadable is a
    ``CorruptCheckpoint`` naming the file: ``train_loop`` then resumes from the previous
    checkpoint Ray Train kept (2 are), or from scratch when none is usable, with a warning
    (see ``restore_newest``)."""
    folder = Path(folder)
    read_json_checkpoint(folder / "metrics.json")
    read_json_checkpoint(folder / "model" / "open_clip_config.json")
    read_torch_checkpoint(folder / "model" / "open_clip_pytorch_model.bin", mmap=True)  # a check: mapped, not read
    state = read_torch_checkpoint(folder / TRAIN_STATE, TRAIN_STATE_KEYS, map_location=device)
    if not isinstance(state["epoch"], int) or not all(isinstance(state[k], dict) for k in TRAIN_STATE_KEYS[:3]):
        raise CorruptCheckpoint(f"checkpoint file {folder / TRAIN_STATE}: not a fine-tuning state")
    return state


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker. Resumes from the newest usable checkpoint (see ``read_train_state``)."""
    import ray.train
    import ray.train.torch

    config = FinetuneConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)
    clip = load_clip(loop_config["model_dir"] or config.model, str(device))
    apply_freezing(clip.model, config)
    model = ray.train.torch.prepare_model(clip.model)  # DDP when several workers
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    steps_per_epoch = max(1, loop_config["batches_per_epoch"] // config.optim.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, warmup_cosine(steps_per_epoch * config.optim.epochs, config.optim.warmup_fraction))
    start_epoch = 0
    # the newest checkpoint whose files all read; a corrupt one is reported and the previous one used
    state = restore_newest(ray.train.get_checkpoint(), lambda folder: read_train_state(folder, device),
                           what=f"fine-tuning (worker {rank})")
    if state is not None:
        clip.model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
    if rank == 0:
        tracking.attach(loop_config["tracking_uri"], loop_config["run_id"])
    train_shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, config.optim.epochs):
        started = time.perf_counter()
        losses, samples = _train_epoch(model, clip, train_shard, optimiser, scheduler, config, world, device)
        metrics = {"epoch": epoch, "start_epoch": start_epoch,
                   "loss": float(np.mean(losses)) if losses else float("nan"),
                   "samples_per_s": samples * world / max(time.perf_counter() - started, 1e-9),
                   "lr": scheduler.get_last_lr()[0]}
        if rank == 0:
            _report_epoch(clip, optimiser, scheduler, epoch, metrics, config, device, loop_config["has_val"])
        else:
            ray.train.report(metrics)
    if rank == 0:
        tracking.end_run()


def _train_epoch(model, clip, shard, optimiser, scheduler, config: FinetuneConfig, world: int,
                 device) -> tuple[list[float], int]:
    """One pass over this worker's shard, the optimiser stepped every ``grad_accum`` batches; the
    batch losses and the number of samples seen."""
    model.train()
    autocast = device.type == "cuda" and config.optim.mixed_precision
    losses, samples, pending = [], 0, False
    optimiser.zero_grad(set_to_none=True)
    for step, batch in enumerate(shard.iter_batches(batch_size=config.optim.batch_size, batch_format="numpy")):
        pixels = torch.as_tensor(batch["pixels"])
        if len(pixels) * (world if config.loss.gather else 1) < 2:  # same on every rank: shards are equal
            continue
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            image, text = _embed(model, clip, pixels, [str(c) for c in batch["caption"]], device)
        image, text = image.float(), text.float()
        if config.loss.gather:
            image, text = gather_features(image, text)
        loss = contrastive_loss(config.loss.name, image, text, config.loss.temperature, config.loss.beta1,
                                config.loss.beta2)
        (loss / config.optim.grad_accum).backward()
        pending = True
        if (step + 1) % config.optim.grad_accum == 0:
            optimiser.step()
            scheduler.step()
            optimiser.zero_grad(set_to_none=True)
            pending = False
        losses.append(float(loss.detach()))
        samples += len(pixels)
    if pending:  # the epoch's last, partial accumulation still counts
        optimiser.step()
        scheduler.step()
        optimiser.zero_grad(set_to_none=True)
    return losses, samples


def _report_epoch(clip, optimiser, scheduler, epoch: int, metrics: dict, config: FinetuneConfig, device,
                  has_val: bool) -> None:
    """Rank 0: retrieval on the validation pairs, the figures to MLflow, and a Ray Train checkpoint
    (the model folder, the training state to resume from, the figures)."""
    import ray.train

    val = ray.train.get_dataset_shard("val") if has_val else None
    batches = val.iter_batches(batch_size=64, batch_format="numpy") if val is not None else []
    metrics.update(evaluate_retrieval(clip, batches, config, device))
    tracking.log_metrics({k: v for k, v in metrics.items() if k not in ("epoch", "start_epoch")}, step=epoch)
    with tempfile.TemporaryDirectory() as folder:
        save_clip(clip, Path(folder) / "model")
        torch.save({"model": clip.model.state_dict(), "optimiser": optimiser.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch}, Path(folder) / TRAIN_STATE)
        (Path(folder) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


@dataclass
class FinetuneResult:
    run_id: str
    model_uri: str  # models:/name/version
    version: str
    metrics: dict
    checkpoint_dir: str
    pairs_used: int
    dropped_short: int
    skipped_images: int


def run_finetune(config: FinetuneConfig, pairs_uri: str, workers: int = 1, use_gpu: bool = False,
                 storage_path: str | None = None, name: str = "finetune", model_dir: str | None = None,
                 callbacks: list | None = None) -> FinetuneResult:
    """Fine-tune, checkpoint every epoch under ``storage_path/name``, then register the model.

    ``callbacks`` (``ray.train.UserCallback`` instances) are handed to Ray Train's ``RunConfig``:
    they run on the Ray Train controller, e.g. ``after_report`` once every worker has reported an epoch.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    usable_table, dropped_short, skipped = _usable_pairs(pairs_uri, config)
    train_table, val_table = split_pairs(usable_table, config.data.val_fraction, config.seed)
    datasets = _datasets(train_table, val_table, load_clip(model_dir or config.model))
    per_worker = train_table.num_rows // workers  # Ray's equal split rounds down
    batches_per_epoch = math.ceil(per_worker / config.optim.batch_size)

    storage_path = storage_path or str(Path("finetune_runs").resolve())
    uri = tracking.use_store(config.registry.tracking_uri)
    run_id = tracking.run_in_file(  # a rerun continues the same MLflow run
        storage.join(storage_path, f"{name}.mlflow_run_id"), config.registry.experiment, name,
        {"pairs": pairs_uri, "workers": workers, "use_gpu": use_gpu, **config.model_dump(exclude={"registry"})},
        {"pairs_used": usable_table.num_rows, "dropped_short_captions": dropped_short, "skipped_images": skipped,
         "train_pairs": train_table.num_rows, "val_pairs": val_table.num_rows})

    loop_config = {"config": config.model_dump(), "model_dir": model_dir, "tracking_uri": uri, "run_id": run_id,
                   "batches_per_epoch": batches_per_epoch, "has_val": "val" in datasets}
    def trainer() -> TorchTrainer:
        return TorchTrainer(
            train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            run_config=RunConfig(name=name, storage_path=storage_path, failure_config=FailureConfig(max_failures=2),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks or [])),
            datasets=datasets,
            dataset_config=DataConfig(datasets_to_split=["train"]),
        )

    result = fit_resuming(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tuning run {name} ended without a checkpoint ({result.error})")
    checkpoint_dir = result.checkpoint.to_directory(tempfile.mkdtemp(prefix="medclipsam-ft-"))
    metrics = json.loads((Path(checkpoint_dir) / "metrics.json").read_text())
    version = register_model(Path(checkpoint_dir) / "model", run_id, config, metrics)
    return FinetuneResult(run_id, f"models:/{config.registry.model_name}/{version}", version, metrics,
                          checkpoint_dir, usable_table.num_rows, dropped_short, skipped)


def fit_resuming(trainer: Callable[[], Any]) -> Any:
    """``trainer().fit()``, started once more if Ray Train gives up on a lost worker.

    Ray Train restarts the workers after a worker dies, but not when the death reaches its
    controller outside those retry paths (a worker of the restarted group dying while the group
    starts, as seen on a loaded machine: "Destroying worker since its placement group was removed").
    Then the whole run is started again under the same name and storage, which resumes it from its
    newest checkpoint; any other controller error is raised as it is.
    """
    from ray.exceptions import RayActorError
    from ray.train import ControllerError

    try:
        return trainer().fit()
    except ControllerError as exc:
        if not isinstance(exc.controller_failure, RayActorError):
            raise
        log.warning("Ray Train gave up on a lost worker (%s); starting the run again from its newest checkpoint",
                    errors.shorten(str(exc.controller_failure)))
        return trainer().fit()


def _usable_pairs(pairs_uri: str, config: FinetuneConfig) -> tuple[pa.Table, int, int]:
    """The pairs whose captions are long enough and whose images open, with how many of each were dropped.

    Every image is opened once here, so that unreadable ones are counted and dropped before
    training, and every worker's shard holds the same number of usable pairs."""
    import ray

    from .data import readable

    table, dropped_short = read_pairs(pairs_uri, config.data.image_column, config.data.caption_column,
                                      config.data.min_caption_chars)
    checked = pa.concat_tables(ray.get(
        ray.data.from_arrow(table).map_batches(readable, batch_format="pyarrow").to_arrow_refs()))
    usable = checked.filter(checked["ok"]).drop_columns(["ok"])
    skipped = table.num_rows - usable.num_rows
    if usable.num_rows < 2:
        raise InputError(f"{pairs_uri}: fewer than 2 usable pairs ({skipped} unreadable images, "
                         f"{dropped_short} captions too short)")
    return usable, dropped_short, skipped


def _datasets(train_table: pa.Table, val_table: pa.Table, probe) -> dict:
    """Ray datasets of decoded pixels at the model's input size (``val`` only with two pairs or more)."""
    import ray

    from .data import decode

    decode_args = {"size": probe.image_size, "mean": probe.mean, "std": probe.std}
    tables = {"train": train_table, **({"val": val_table} if val_table.num_rows >= 2 else {})}
    return {name: ray.data.from_arrow(table).map_batches(decode, fn_kwargs=decode_args, batch_format="numpy")
            for name, table in tables.items()}


def register_model(model_dir: Path, run_id: str, config: FinetuneConfig, metrics: dict) -> str:
    """Log the model folder to the run and register it as a new version, with its metrics, kind and
    weights' hash as tags. No alias moves: the promotion gate decides that."""
    from .mlflow_model import ClipTextEmbedder

    return tracking.register_version(
        run_id, config.registry.model_name, "model", ClipTextEmbedder(), {"clip": str(model_dir)},
        ["medclipsam", "open_clip_torch==3.3.0", "transformers"], KIND_CLIP, clip_weights_sha256(str(model_dir)),
        {k: str(v) for k, v in metrics.items()})
