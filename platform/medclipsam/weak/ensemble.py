"""The trained ensemble: its folder, and the mean foreground probability of its members.

The folder is nnU-Net's trained-model layout plus a list of members:
    plans.json  dataset.json  dataset_fingerprint.json  ensemble.json
    fold_all/checkpoint_epochNNNN.pth ...  fold_all/checkpoint_final.pth
Each member predicts as ``nnUNetPredictor`` does for a single checkpoint (sliding window with
Gaussian weighting, mirroring, softmax after resampling to the image); the members' foreground
**probabilities** are averaged. (Handing several parameter sets to one predictor would average
their logits instead.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import storage
from ..errors import InputError, ModelError
from ..models.checkpoints import UnsafeCheckpoint, read_torch_checkpoint, sha256_of, torch_file_problem
from ..storage.fetch import fetch_folder
from ..storage.registered import fetch_registered
from .nnunet_env import CONFIGURATION, FOLD, nnunet_environment, stdout_to

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_DIR = "ensemble"  # under the output of weak train
FINAL = "checkpoint_final.pth"


@dataclass(frozen=True)
class EnsembleFolder:
    path: Path
    manifest: dict
    uri: str  # as the user named it

    @property
    def sha256(self) -> str:
        """Identifies the weights: the hash of ensemble.json, which lists every member's SHA-256."""
        return sha256_of(str(self.path / ENSEMBLE_FILE))  # cached: every case's record names it

    def members(self, which: str = "cycles") -> list[str]:
        """``cycles`` (the kept epochs), ``cycles+final``, or ``final`` (nnU-Net's last checkpoint alone)."""
        names = list(self.manifest["members"])
        return {"cycles": names, "cycles+final": [*names, FINAL], "final": [FINAL]}[which]


def ensemble_folder_of(uri: str) -> str:
    """The ensemble folder a user means: ``uri`` itself, or the ``ensemble/`` folder inside the output
    folder of ``weak train`` (the folder they gave ``--output``)."""
    if storage.exists(storage.join(uri, ENSEMBLE_FILE)):
        return uri
    inside = storage.join(uri, ENSEMBLE_DIR)
    if storage.exists(storage.join(inside, ENSEMBLE_FILE)):
        return inside
    raise InputError(f"{uri}: no {ENSEMBLE_FILE} here nor in {ENSEMBLE_DIR}/; pass the output folder of medclipsam "
                     "weak train (or its ensemble/ folder), or a models:/ URI")


def resolve_ensemble(uri: str) -> EnsembleFolder:
    """A local ensemble folder for a path, an fsspec URI or ``models:/NAME@alias`` (MLflow registry)."""
    if uri.startswith("models:/"):
        def manifest_file(root: Path) -> Path:
            found = sorted(root.rglob(ENSEMBLE_FILE))
            if not found:
                raise ModelError(f"model {uri}: the registered model holds no {ENSEMBLE_FILE} (not a weak ensemble?)")
            return found[0]

        # the version's tag is the hash of ensemble.json, which holds every member's hash (checked below)
        folder = manifest_file(fetch_registered(uri, lambda root: sha256_of(str(manifest_file(root))))).parent
    else:
        uri = ensemble_folder_of(uri)
        folder = fetch_folder(uri, "weak ensemble", marker=ENSEMBLE_FILE)
    manifest = json.loads((folder / ENSEMBLE_FILE).read_text())
    missing = [m for m in [*manifest["members"], FINAL] if not (folder / f"fold_{FOLD}" / m).exists()]
    if missing:
        raise ModelError(f"weak ensemble {uri}: missing member checkpoint(s) {', '.join(missing[:3])}")
    recorded = manifest.get("sha256") or {}
    for name in [*manifest["members"], FINAL]:  # before any member is loaded
        path = folder / f"fold_{FOLD}" / name
        problem = torch_file_problem(path)
        if problem is not None:
            raise ModelError(f"weak ensemble {uri}: member checkpoint {path} is corrupt: {problem}")
        if name not in recorded:
            raise ModelError(f"weak ensemble {uri}: {ENSEMBLE_FILE} records no SHA-256 for {name}, so it cannot be "
                             "verified; refused")
        if sha256_of(str(path)) != recorded[name]:
            raise ModelError(f"weak ensemble {uri}: member checkpoint {path} has a SHA-256 other than the one "
                             f"{ENSEMBLE_FILE} recorded ({recorded[name][:12]}...); refused (changed or damaged)")
    return EnsembleFolder(folder, manifest, uri)


def member_state(folder: EnsembleFolder, name: str) -> tuple[dict, tuple[int, ...] | None]:
    """A member's network weights and the mirroring axes its training allowed (its hash was checked
    by ``resolve_ensemble``); an unreadable member is a ``ModelError`` naming the file, one that would
    run code an ``UnsafeCheckpoint``."""
    path = folder.path / f"fold_{FOLD}" / name
    try:
        state = read_torch_checkpoint(path, ("network_weights",))
        axes = state.get("inference_allowed_mirroring_axes")
        return state["network_weights"], tuple(axes) if axes is not None else None
    except UnsafeCheckpoint as exc:
        raise UnsafeCheckpoint(f"weak ensemble {folder.uri}: {exc}") from None
    except ModelError as exc:
        raise ModelError(f"weak ensemble {folder.uri}: {exc}") from exc


def _initialise(predictor, folder: EnsembleFolder, weights: dict, mirroring_axes: tuple[int, ...] | None) -> None:
    """Set the predictor up as nnU-Net's ``initialize_from_trained_model_folder`` would, from the
    folder's plans and dataset JSON and weights already loaded safely: nnU-Net's own loader unpickles
    the checkpoint (``weights_only=False``), so it is never called. The network is always our
    trainer's (the class a checkpoint names is not looked up)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from .nnunet_trainers.cyclic import nnUNetTrainerCyclic

    dataset_json = json.loads((folder.path / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((folder.path / "plans.json").read_text()))
    configuration = plans_manager.get_configuration(CONFIGURATION)
    network = nnUNetTrainerCyclic.build_network_architecture(
        plans_manager, configuration, determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    network.load_state_dict(weights)
    predictor.manual_initialization(network, plans_manager, configuration, [weights], dataset_json,
                                    nnUNetTrainerCyclic.__name__, mirroring_axes)


class Ensemble:
    """The members' weights held in memory and one nnU-Net predictor that runs each in turn."""

    def __init__(self, folder: EnsembleFolder, members: str = "cycles", device: str = "cpu",
                 tile_step_size: float = 0.5, use_gaussian: bool = True, use_mirroring: bool = True) -> None:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.folder, self.names = folder, folder.members(members)
        states = [member_state(folder, name) for name in self.names]  # first: a corrupt one is named
        self.weights = [weights for weights, _ in states]
        torch_device = torch.device(device)
        self.predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=use_gaussian,
                                         use_mirroring=use_mirroring,
                                         perform_everything_on_device=torch_device.type == "cuda",
                                         device=torch_device, verbose=False, verbose_preprocessing=False,
                                         allow_tqdm=False)
        with nnunet_environment(None), stdout_to(os.devnull):
            _initialise(self.predictor, folder, self.weights[0], states[0][1])

    def member_probabilities(self, array: np.ndarray, properties: dict, is_volume: bool) -> Iterator[np.ndarray]:
        """Each member's foreground probability at the image's own resolution (``H x W`` or ``Z x Y x X``);
        ``array`` and ``properties`` as ``dataset.nnunet_input`` makes them."""
        for weights in self.weights:
            self.predictor.list_of_parameters = [weights]
            _, probabilities = self.predictor.predict_single_npy_array(
                array, dict(properties), None, None, True)  # nnU-Net adds keys to the properties
            foreground = np.asarray(probabilities[1], dtype=np.float32)
            yield foreground if is_volume else foreground[0]

    def probability(self, array: np.ndarray, properties: dict, is_volume: bool) -> np.ndarray:
        """The mean of the members' foreground probabilities."""
        total = None
        for p in self.member_probabilities(array, properties, is_volume):
            total = p.astype(np.float64) if total is None else total + p
        return (total / len(self.weights)).astype(np.float32)
