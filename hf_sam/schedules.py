"""When to run a SAM step (SS-SAM / RST): a probability schedule over training progress, or every k steps.

The draw for optimizer step t comes from a generator seeded by (seed, t): the same on every rank and for every
micro-batch of the window, independent of the global RNG, and reproducible after a resume.
"""

from __future__ import annotations

import math

import torch

from .seeds import step_generator


SCHEDULES = ("always", "constant", "piecewise", "linear", "cosine", "every_k")


def probability_end(args) -> float:
    """The schedule's end probability: `sam_probability_end`, or `sam_probability` itself when unset.

    Left unset rather than filled at construction: filled, a probability set afterwards (a hyperparameter search
    trial's setattr, `dataclasses.replace`) ran a ramp back to the probability of construction.
    """
    return args.sam_probability if args.sam_probability_end is None else args.sam_probability_end


def sam_probability(args, progress: float) -> float:
    """p(t) for `progress` = t/T in [0, 1] (our parametrization; the paper's exact formulas were not available)."""
    p0, p1 = args.sam_probability, probability_end(args)
    schedule = args.sam_schedule
    if schedule == "always":
        return 1.0
    if schedule == "constant":
        return p0
    if schedule == "piecewise":
        return p0 if progress < args.sam_schedule_boundary else p1
    if schedule == "linear":
        return p0 + (p1 - p0) * progress
    if schedule == "cosine":
        return p0 + (p1 - p0) * (1 - math.cos(math.pi * progress)) / 2
    raise ValueError(f"sam_schedule={schedule!r} has no probability")


def mean_sam_probability(args) -> float:
    """p-bar, the mean of p(t) over training: the expected share of SAM steps (SS-SAM costs 1 + p-bar passes)."""
    p0, p1 = args.sam_probability, probability_end(args)
    schedule = args.sam_schedule
    if schedule == "always":
        return 1.0
    if schedule == "every_k":
        return 1.0 / args.sam_interval
    if schedule == "constant":
        return p0
    if schedule == "piecewise":
        boundary = args.sam_schedule_boundary
        return p0 * boundary + p1 * (1 - boundary)
    if schedule in ("linear", "cosine"):  # cosine's (1 - cos)/2 averages 1/2 over [0, 1], as the line does
        return (p0 + p1) / 2
    raise ValueError(f"sam_schedule={schedule!r} has no mean probability")


def is_sam_step(args, global_step: int, max_steps: int) -> bool:
    """Whether optimizer step `global_step` runs SAM (host-side CPU draw: no device sync)."""
    if args.sam_schedule == "always":
        return True
    if args.sam_schedule == "every_k":
        return global_step % args.sam_interval == 0
    progress = min(1.0, global_step / max(1, max_steps))
    generator = step_generator("ss-sam", args.seed, global_step)
    return bool(torch.rand((), generator=generator) < sam_probability(args, progress))
