"""Fine-tuning settings (configs/finetune.yaml), validated on load like the task configs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import storage
from ..errors import InputError
from ..models.biomedclip import BIOMEDCLIP_HUB


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DataSettings(_Strict):
    image_column: str = "image"
    caption_column: str = "caption"
    min_caption_chars: int = Field(20, ge=0)  # the paper drops captions shorter than 20 characters
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)


class LossSettings(_Strict):
    name: Literal["dhn_nce", "hn_nce", "dcl", "info_nce"] = "dhn_nce"
    temperature: float = Field(0.6, gt=0.0)
    beta1: float = 0.15
    beta2: float = 0.15
    gather: bool = True  # negatives from the global batch of all workers


class OptimSettings(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)  # per worker
    lr: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    grad_accum: int = Field(1, ge=1)
    mixed_precision: bool = True  # bf16 autocast, on GPU only


class FreezeSettings(_Strict):
    image: bool = False
    text: bool = False
    image_blocks: int = Field(0, ge=0)  # freeze the patch embedding and the first N ViT blocks
    text_layers: int = Field(0, ge=0)  # freeze the embeddings and the first N BERT layers


class EvalSettings(_Strict):
    batch: int = Field(50, ge=2)
    shuffles: int = Field(5, ge=1)


class RegistrySettings(_Strict):
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "medclipsam-finetune"
    model_name: str = "biomedclip-dhnnce"
    alias: str | None = "champion"


class FinetuneConfig(_Strict):
    model: str = BIOMEDCLIP_HUB
    seed: int = 0
    data: DataSettings = DataSettings()
    loss: LossSettings = LossSettings()
    optim: OptimSettings = OptimSettings()
    freeze: FreezeSettings = FreezeSettings()
    eval: EvalSettings = EvalSettings()
    registry: RegistrySettings = RegistrySettings()


def load_finetune_config(uri: str | None) -> FinetuneConfig:
    import yaml

    if uri is None:
        return FinetuneConfig()
    try:
        data = yaml.safe_load(storage.read_bytes(str(uri)).decode()) or {}
        return FinetuneConfig.model_validate(data)
    except FileNotFoundError:
        raise InputError(f"{uri}: config file not found") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{uri}: not valid YAML ({exc})") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InputError(f"{uri}: invalid configuration: {problems}") from None
