"""`SAMRun`: what one `train()` call of `SAMMixin` holds, in one object with one `reset()`.

The pieces are built from the prepared model at the first training step (parameters may be replaced between the
trainer's construction and that step: FSDP2 sharding, `model_init`), and every `train()` call starts a new run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .descent import DescentPipeline
from .esam import ESAM
from .guard import UpdateGuard
from .loss_term import LossTerm
from .perturbation import Perturbation


@dataclass
class SAMRun:
    # The method's pieces (None until the first step builds them).
    perturbation: Perturbation | None = None  # the perturbed set, its ascent rule and mask
    descent: DescentPipeline | None = None
    esam: ESAM | None = None
    loss_term: LossTerm | None = None  # SAF's bank or MESA's teacher
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    bn_layers: list[torch.nn.Module] = field(default_factory=list)  # whose statistics the perturbed pass must not move
    shifts_labels: bool | None = None  # whether the model scores logits at t against labels at t + 1 (causal LM)
    # The accumulation window Trainer prefetched, and where the current step stands in it.
    window: list | None = None
    window_next: int = 0
    window_is_sam: bool = True
    window_clean: list[torch.Tensor] = field(default_factory=list)  # each micro-batch's clean loss
    window_rng: list[Any] = field(default_factory=list)  # the RNG state before each clean pass (dropout replay)
    window_examples: list[Any] = field(default_factory=list)  # ESAM SDS: each micro-batch's per-example losses
    raw_norm: torch.Tensor | None = None  # ||g|| of the last ascent, in `.grad` units
    stash: dict[int, torch.Tensor] = field(default_factory=dict)  # micro accumulation's gradient buffers
    guard: UpdateGuard = field(default_factory=UpdateGuard)

    def reset(self) -> None:
        """Back to a run that has not started (at every `train()` call)."""
        self.__dict__.update(SAMRun().__dict__)

    def forget_step(self) -> None:
        """Drop what belongs to the current step only (a step cut short by an exception)."""
        self.window_clean, self.window_rng, self.window_examples = [], [], []
        if self.descent is not None:
            self.descent.clean_copy = None
        self.guard.forget_step()
