"""The cyclic learning rate and the checkpoints each cycle keeps (pure functions of the epoch).

With cycle length Tc = E // C and t = epoch mod Tc, the lr restarts at lr0 when t = 0 and otherwise
follows a poly decay that stops falling after floor(gamma * Tc) epochs:
    lr = lr0 * (1 - min(t, floor(gamma * Tc)) / D) ** 0.9,   D = Tc ("cycle") or E ("published").
The released code divides by E, so within a cycle its lr barely falls; "cycle" is the default.
"""

from __future__ import annotations

import math


def cycle_length(epochs: int, cycles: int) -> int:
    return epochs // cycles


def cyclic_lr(epoch: int, epochs: int, cycles: int, gamma: float = 0.5, initial_lr: float = 1e-2,
              schedule: str = "cycle") -> float:
    """The learning rate of ``epoch`` (0-based)."""
    tc = cycle_length(epochs, cycles)
    t = epoch % tc
    if t == 0:
        return initial_lr
    denominator = tc if schedule == "cycle" else epochs
    return initial_lr * (1.0 - min(t, math.floor(gamma * tc)) / denominator) ** 0.9


def is_kept(epoch: int, epochs: int, cycles: int, keep: int, rule: str = "last") -> bool:
    """Whether ``epoch``'s weights join the ensemble: the last ``keep`` epochs of its cycle ("last"),
    or the released code's rule (e + 1) mod Tc >= Tc - k ("published": epochs Tc-k-1 .. Tc-2)."""
    tc = cycle_length(epochs, cycles)
    if epoch >= cycles * tc:
        return False
    if rule == "published":
        return (epoch + 1) % tc >= tc - keep
    return epoch % tc >= tc - keep


def kept_epochs(epochs: int, cycles: int, keep: int, rule: str = "last") -> list[int]:
    return [e for e in range(epochs) if is_kept(e, epochs, cycles, keep, rule)]


def member_name(epoch: int) -> str:
    """The file a kept epoch's weights are written to (in the ensemble's fold_all/)."""
    return f"checkpoint_epoch{epoch:04d}.pth"
