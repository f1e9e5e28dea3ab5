"""Weak-supervision settings (configs/weak.yaml), validated on load like the task configs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..config import OutputConfig, StrictModel, load_model


class TrainingSettings(StrictModel):
    epochs: int = Field(600, ge=1)  # E
    cycles: int = Field(3, ge=1)  # C; the cycle length is Tc = E // C
    keep_per_cycle: int = Field(10, ge=1)  # k checkpoints kept per cycle
    gamma: float = Field(0.5, gt=0.0, le=1.0)  # the lr stops falling after gamma * Tc epochs of a cycle
    # cycle: lr = lr0 (1 - min(t, floor(gamma Tc)) / Tc)^0.9; published: the same over E (the released code)
    schedule: Literal["cycle", "published"] = "cycle"
    # last: epochs Tc-k .. Tc-1 of each cycle; published: epochs with (e + 1) mod Tc >= Tc - k
    # (the released code's rule, which keeps Tc-k-1 .. Tc-2)
    kept_epochs: Literal["last", "published"] = "last"
    initial_lr: float = Field(1e-2, gt=0.0)
    iterations_per_epoch: int = Field(250, ge=1)
    val_iterations_per_epoch: int = Field(50, ge=1)
    # nnU-Net's data-augmentation worker processes (0: in the training process; null: nnU-Net's default)
    augment_processes: int | None = Field(None, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _cycles_fit(self) -> TrainingSettings:
        if self.epochs % self.cycles:
            raise ValueError(f"epochs ({self.epochs}) must be a multiple of cycles ({self.cycles})")
        if self.keep_per_cycle > self.epochs // self.cycles:
            raise ValueError(f"keep_per_cycle ({self.keep_per_cycle}) is longer than a cycle "
                             f"({self.epochs // self.cycles} epochs)")
        return self


class DataSettings(StrictModel):
    dataset_id: int = Field(501, ge=1, le=999)  # nnU-Net's DatasetNNN_name (inside the run's own work folder)
    dataset_name: str = Field("weak", pattern=r"^[A-Za-z0-9_-]+$")
    # nnU-Net's channel name, which picks its normalisation: zscore (MRI, ultrasound, X-ray) or CT
    normalization: Literal["zscore", "CT", "rescale_to_0_1"] = "zscore"
    # --pseudo: take the run's ok cases whose mask has at least this many foreground pixels (voxels)
    min_mask_pixels: int = Field(1, ge=0)


class EnsembleSettings(StrictModel):
    members: Literal["cycles", "cycles+final", "final"] = "cycles"  # final: nnU-Net's last checkpoint alone
    threshold: float = Field(0.2, gt=0.0, lt=1.0)  # mask = mean foreground probability > threshold


class PredictionSettings(StrictModel):
    tile_step_size: float = Field(0.5, gt=0.0, le=1.0)
    use_gaussian: bool = True
    use_mirroring: bool = True
    actors: int = Field(1, ge=1)  # Ray Data actors holding the ensemble
    num_gpus: float = Field(0.0, ge=0.0)  # per actor; > 0 predicts on cuda
    num_cpus: float = Field(1.0, gt=0.0)
    nsd_tolerance: float = Field(2.0, gt=0.0)  # with --gt: pixels for 2D images, millimetres for volumes


class TrackingSettings(StrictModel):
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str = "medclipsam-weak"


class WeakConfig(StrictModel):
    training: TrainingSettings = TrainingSettings()
    data: DataSettings = DataSettings()
    ensemble: EnsembleSettings = EnsembleSettings()
    prediction: PredictionSettings = PredictionSettings()
    output: OutputConfig = OutputConfig()  # weak predict's mask formats (--mask-format) and SEG segment
    tracking: TrackingSettings = TrackingSettings()
    # Local paths are on a file system every Ray node mounts at the same place: without it, a local
    # --output (or weak predict's --input/--gt) on a cluster of several nodes is refused.
    shared_filesystem: bool = False


def load_weak_config(uri: str | None) -> WeakConfig:
    """The built-in (published) settings, or a weak-supervision YAML from a path or URI, validated."""
    return WeakConfig() if uri is None else load_model(uri, WeakConfig)
