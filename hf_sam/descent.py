"""Descent transforms: rewrite the window's final gradient after the SAM (or plain) passes.

A transform sees the perturbed parameters' `grads` (in place), their clean gradient `clean` (a copy taken before
the ascent, on the same basis as `grads`: all-reduced when the descent gradient is), and its norm. All norms and
inner products are global over the perturbed set (and over FSDP shards).

A clean gradient that was not finite skipped the ascent (eps = 0, so `grads` is the plain gradient at w): its norm
is then NaN or inf while `clean` itself has had those entries zeroed, and every transform must leave `grads` and
its own state as they are, decided on the device (`torch.where`), without a host sync.
"""

from __future__ import annotations

import torch


NORM_EPS = 1e-12


class DescentTransform:
    """Base class; `needs_clean_copy` says whether the clean gradient vector (not only its norm) is used."""

    needs_clean_copy = True

    def __init__(self, args):
        self.args = args

    def after_sam_step(self, names, grads, clean, clean_norm) -> None:
        """Called once per SAM window after the last descent pass, before clipping and the step."""

    def after_plain_step(self, names, grads) -> None:
        """Called once per plain (non-SAM) window after its last pass."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass
