"""Fine-tuning settings (configs/finetune.yaml), validated on load like the task configs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..config import BIOMEDCLIP_HUB, StrictModel, load_model


class DataSettings(StrictModel):
    image_column: str = "image"
    caption_column: str = "caption"
    min_caption_chars: int = Field(20, ge=0)  # the paper drops captions shorter than 20 characters
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)


class LossSettings(StrictModel):
    name: Literal["dhn_nce", "hn_nce", "dcl", "info_nce"] = "dhn_nce"
    temperature: float = Field(0.6, gt=0.0)
    beta1: float = 0.15
    beta2: float = 0.15
    gather: bool = True  # negatives from the global batch of all workers


class OptimSettings(StrictModel):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)  # per worker
    lr: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    grad_accum: int = Field(1, ge=1)
    mixed_precision: bool = True  # bf16 autocast, on GPU only


class FreezeSettings(StrictModel):
    image: bool = False
    text: bool = False
    image_blocks: int = Field(0, ge=0)  # freeze the patch embedding and the first N ViT blocks
    text_layers: int = Field(0, ge=0)  # freeze the embeddings and the first N BERT layers


class EvalSettings(StrictModel):
    batch: int = Field(50, ge=2)
    shuffles: int = Field(5, ge=1)


class RegistrySettings(StrictModel):
    """Where the fine-tuned model is registered. A new version moves no alias: ``medclipsam models
    promote`` moves ``champion`` once the version wins on a labelled evaluation set."""

    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "medclipsam-finetune"
    model_name: str = "biomedclip-dhnnce"

    @model_validator(mode="before")
    @classmethod
    def _no_alias(cls, data: object) -> object:
        if isinstance(data, dict) and "alias" in data:
            raise ValueError("registry.alias is no longer read: fine-tuning registers a version and moves no "
                             "alias; promote it with `medclipsam models promote NAME --version V --eval-set URI`")
        return data


class FinetuneConfig(StrictModel):
    model: str = BIOMEDCLIP_HUB
    seed: int = 0
    data: DataSettings = DataSettings()
    loss: LossSettings = LossSettings()
    optim: OptimSettings = OptimSettings()
    freeze: FreezeSettings = FreezeSettings()
    eval: EvalSettings = EvalSettings()
    registry: RegistrySettings = RegistrySettings()
    # Local paths are on a file system every Ray node mounts at the same place: without it, a local
    # --storage (the default ./finetune_runs too) on a cluster of several nodes is refused.
    shared_filesystem: bool = False


def load_finetune_config(uri: str | None) -> FinetuneConfig:
    """The built-in defaults, or a fine-tuning YAML from a path or URI, validated."""
    return FinetuneConfig() if uri is None else load_model(uri, FinetuneConfig)
