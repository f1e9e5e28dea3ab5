"""nnUNetTrainerCyclic: nnU-Net's trainer with the cyclic learning rate of MedCLIP-SAMv2 and the
checkpoints of the last epochs of every cycle kept for the ensemble.

nnU-Net 2.8.1 records its constructor's arguments by inspecting its signature, so the settings
(epochs, cycles, k, gamma, schedule, iterations) are class attributes, set on the instance after
construction and before ``initialize``. Optimiser: nnU-Net's own SGD (momentum 0.99, Nesterov,
weight decay 3e-5); only its scheduler is replaced.

Under Ray Train a torch process group always exists, which nnU-Net takes to mean multi-GPU DDP
(device ``cuda:<rank>``): with one worker, or on CPU, this trainer turns DDP off and keeps the
device it was given; with one GPU per worker it leaves nnU-Net's own DDP path as it is.
"""

from __future__ import annotations

from os.path import join

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import distributed as dist
from torch.optim.lr_scheduler import LRScheduler

from medclipsam.weak.schedule import cyclic_lr, is_kept, member_name


class CyclicPolyLR(LRScheduler):
    """Sets the lr of ``step(epoch)`` from ``lr_of_epoch``, as nnU-Net's PolyLRScheduler is stepped."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_of_epoch) -> None:
        self.lr_of_epoch = lr_of_epoch
        self.ctr = 0
        super().__init__(optimizer, -1)

    def step(self, current_step: int | None = None) -> None:  # type: ignore[override]
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_of_epoch(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr for _ in self.optimizer.param_groups]


class nnUNetTrainerCyclic(nnUNetTrainer):  # nnU-Net's naming: its lookup finds trainers by class name
    cycles = 3
    keep_per_cycle = 10
    gamma = 0.5
    schedule = "cycle"  # or "published"
    kept_rule = "last"  # or "published"
    epoch_end_hook = None  # callable(trainer, epoch), after each epoch's bookkeeping (rank 0 reports)
    plot_progress = False  # nnU-Net's progress.png: a large figure redrawn every epoch

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008  (nnU-Net's own signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and (device.type != "cuda" or dist.get_world_size() == 1):
            self.is_ddp = False
            self.local_rank = 0
            self.device = device
            if device.type != "cuda":
                self.grad_scaler = None
        self.num_epochs = 600
        if not self.plot_progress:
            self.logger.plot_progress_png = lambda *args, **kwargs: None

    def lr_of_epoch(self, epoch: int) -> float:
        return cyclic_lr(epoch, self.num_epochs, self.cycles, self.gamma, self.initial_lr, self.schedule)

    def keeps(self, epoch: int) -> bool:
        return is_kept(epoch, self.num_epochs, self.cycles, self.keep_per_cycle, self.kept_rule)

    def configure_optimizers(self):
        optimizer, _ = super().configure_optimizers()
        return optimizer, CyclicPolyLR(optimizer, self.lr_of_epoch)

    def member_path(self, epoch: int) -> str:
        return join(self.output_folder, member_name(epoch))

    def on_epoch_end(self):
        epoch = self.current_epoch
        if self.keeps(epoch):
            self.save_checkpoint(self.member_path(epoch))  # rank 0 writes
        super().on_epoch_end()
        if self.epoch_end_hook is not None:
            self.epoch_end_hook(self, epoch)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """Continue from a training state, loaded weights-only. nnU-Net 2.8.1's own method unpickles
        a path (``weights_only=False``, so a planted file would run code) and fails on a state
        already loaded (its dict branch reads a variable only the path branch sets), so the state's
        parts are applied here, as nnU-Net applies them."""
        from medclipsam.models.checkpoints import read_torch_checkpoint
        from medclipsam.weak.nnunet_env import NNUNET_STATE_KEYS

        state = filename_or_checkpoint
        if not isinstance(state, dict):
            state = read_torch_checkpoint(state, NNUNET_STATE_KEYS, map_location=self.device)
        if not self.was_initialized:
            self.initialize()
        network = self.network.module if self.is_ddp else self.network
        network = getattr(network, "_orig_mod", network)  # under torch.compile
        own = network.state_dict()
        network.load_state_dict({key[len("module."):] if key not in own and key.startswith("module.") else key: value
                                 for key, value in state["network_weights"].items()})
        self.my_init_kwargs = state["init_args"]
        self.current_epoch = state["current_epoch"]
        self.logger.load_checkpoint(state["logging"])
        self._best_ema = state["_best_ema"]
        self.inference_allowed_mirroring_axes = state.get("inference_allowed_mirroring_axes",
                                                          self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(state["optimizer_state"])
        if self.grad_scaler is not None and state.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler_state"])

    def save_resume_state(self, filename: str) -> None:
        """The state to continue after the epoch just finished. nnU-Net stores ``current_epoch + 1``
        because it saves before the counter moves on; after ``on_epoch_end`` it has moved, so step
        back for the save, as nnU-Net's own ``on_train_end`` does for checkpoint_final."""
        self.current_epoch -= 1
        try:
            self.save_checkpoint(filename)
        finally:
            self.current_epoch += 1
