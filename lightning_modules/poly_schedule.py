"""nnU-Net's poly learning-rate schedule as a :class:`~torch.optim.lr_scheduler.LambdaLR`:
``lr = initial · (1 − step / total_steps) ** power``, stepped after every optimiser step
(nnunetv2/training/lr_scheduler/polylr.py, the same closed form). The total is a public field
of the decay, which LambdaLR saves and restores with the checkpoint, so a run extended with
more epochs re-plans it (:func:`replan`) through public attributes only.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


class PolyDecay:
    """The factor ``(1 − step / total_steps) ** power`` (0 from ``total_steps`` on)."""

    def __init__(self, total_steps: int, power: float = 0.9) -> None:
        self.total_steps, self.power = int(total_steps), float(power)

    def __call__(self, step: int) -> float:
        return (1.0 - min(step, self.total_steps) / max(self.total_steps, 1)) ** self.power


def poly_lr(optimizer: torch.optim.Optimizer, total_iters: int, power: float = 0.9) -> LambdaLR:
    """The schedule over ``total_iters`` optimiser steps (the module fills in the run's total)."""
    return LambdaLR(optimizer, PolyDecay(total_iters, power))


def replan(scheduler: LRScheduler, total_steps: int) -> bool:
    """Give a poly schedule a new length at the step it has reached, and set every parameter
    group's learning rate to the new schedule's value now; False (nothing changed) for any other
    scheduler or one already of that length."""
    decays = getattr(scheduler, "lr_lambdas", None)
    if not isinstance(scheduler, LambdaLR) or not decays or not all(isinstance(d, PolyDecay) for d in decays):
        return False
    if all(d.total_steps == total_steps for d in decays):
        return False
    for decay, group, initial in zip(decays, scheduler.optimizer.param_groups, scheduler.base_lrs):
        decay.total_steps = int(total_steps)
        group["lr"] = initial * decay(scheduler.last_epoch)
    return True
