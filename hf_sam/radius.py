"""This step's radius: `sam_rho`, times a linear warm-up over the first share of training, along GSAM's learning-rate
schedule when one is set. docs/methods.md#radius-warm-up.
"""

from __future__ import annotations

import torch
from transformers.optimization import GreedyLR

from .gsam import rho_min, scheduled_rho


# The schedulers whose lr Trainer reads from the optimizer (`Trainer._get_learning_rate`): they keep no base_lrs.
PLATEAU_SCHEDULERS = (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR)


def warmup_factor(warmup: float, global_step: int, max_steps: int) -> float:
    """rho_t / rho under a linear warm-up over the first `warmup` share of `max_steps` optimizer steps.

    Step t (0-based) gets (t + 1) / (warmup * max_steps), capped at 1: the first step perturbs a little, the last
    warm-up step at the full radius. `warmup` 0 is off (1 on every step).
    """
    if warmup <= 0:
        return 1.0
    return min(1.0, (global_step + 1) / max(1.0, warmup * max_steps))


def step_rho(trainer) -> float:
    """This step's radius for `trainer`: `sam_rho` (or GSAM's schedule along the learning rate), warmed up."""
    args = trainer.args
    rho = args.sam_rho
    if rho_min(args) < args.sam_rho:  # GSAM's schedule; otherwise no need to read the learning rate
        # The peak is the scheduler's base lr (the optimizer's own lr when the user passed an optimizer).
        base_lrs = getattr(trainer.lr_scheduler, "base_lrs", None) or [args.learning_rate]
        if isinstance(trainer.lr_scheduler, PLATEAU_SCHEDULERS):
            # The peak is the optimizer's lr as the run's first SAM step found it (where a plateau scheduler starts),
            # kept where LRScheduler keeps its own (`initial_lr`, saved in optimizer.pt): args.learning_rate may be
            # an lr the optimizer never had (a passed optimizer, or optimizer_cls_and_kwargs with its own lr).
            group = trainer.optimizer.param_groups[0]
            base_lrs = [group.setdefault("initial_lr", group["lr"])]
        rho = scheduled_rho(args, trainer._get_learning_rate(), base_lrs[0])
    return rho * warmup_factor(args.sam_rho_warmup, trainer.state.global_step, trainer.state.max_steps)
