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


def plateau_peak_lr(trainer) -> float:
    """The peak of GSAM's schedule under a plateau scheduler, which keeps no base_lrs: the optimizer's lr as the run's
    first step found it (where a plateau scheduler starts), kept where LRScheduler keeps its own (`initial_lr`, saved
    in optimizer.pt, so a resume keeps it)."""
    group = trainer.optimizer.param_groups[0]
    return group.setdefault("initial_lr", group["lr"])


def note_peak_lr(trainer) -> None:
    """At the run's first step (`SAMMixin._sam_build`): the peak of a plateau scheduler's lr, before any evaluation
    lowers it. Noted at the first SAM step instead, a schedule whose SAM steps start late (late-sam, ss-sam's ramp)
    took an lr already lowered for the peak and perturbed at the full radius there."""
    if rho_min(trainer.args) < trainer.args.sam_rho:
        peak_lr(trainer)  # records a plateau scheduler's (`plateau_peak_lr`); the others keep their own


def peak_lr(trainer) -> float:
    """The learning rate at which GSAM's schedule gives the full radius: the scheduler's base lr (of the first
    parameter group). `args.learning_rate` is the last resort only: it may be an lr the optimizer never had (a passed
    optimizer, or optimizer_cls_and_kwargs with its own lr)."""
    scheduler = trainer.lr_scheduler
    if isinstance(scheduler, PLATEAU_SCHEDULERS):
        return plateau_peak_lr(trainer)
    base_lrs = getattr(scheduler, "base_lrs", None)
    if base_lrs:
        return base_lrs[0]
    # SequentialLR and ChainedScheduler (warm-up then decay, passed with `optimizers=`) keep no base_lrs; the
    # schedulers they chain keep the optimizer's lr of their construction in `initial_lr`.
    return trainer.optimizer.param_groups[0].get("initial_lr", trainer.args.learning_rate)


def step_rho(trainer) -> float:
    """This step's radius for `trainer`: `sam_rho` (or GSAM's schedule along the learning rate), warmed up."""
    args = trainer.args
    rho = args.sam_rho
    if rho_min(args) < args.sam_rho:  # GSAM's schedule; otherwise no need to read the learning rate
        rho = scheduled_rho(args, trainer._get_learning_rate(), peak_lr(trainer))
    return rho * warmup_factor(args.sam_rho_warmup, trainer.state.global_step, trainer.state.max_steps)
