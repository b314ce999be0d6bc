"""Friendly SAM (Li et al. 2024, arXiv 2403.12350): ascend along the gradient minus its running mean."""

from __future__ import annotations

import torch

from .ascent import NORM_EPS, AscentRule
from .tensors import global_norm, local


class FriendlyAscent(AscentRule):
    """d = g - sigma m, eps = rho d / ||d||, then m <- lambda m + (1 - lambda) g.

    As the official code: the previous EMA is subtracted, and on the first step d = g and m starts as g.
    m is kept in true gradient units (fp16 scale removed) so it stays valid when the loss scale changes.
    """

    def __init__(self, args):
        super().__init__(args)
        self.ema: dict[str, torch.Tensor] = {}

    def __call__(self, names, params, grads, rho, grad_unit, grad_norm) -> torch.Tensor:
        sigma, lam = self.args.fsam_sigma, self.args.fsam_lambda
        grads_local = [local(g) for g in grads]
        if not (isinstance(grad_unit, float) and grad_unit == 1.0):  # fp32/bf16 window mode: .grad already is g
            torch._foreach_mul_(grads_local, grad_unit)  # true gradient g
        # A non-finite g (fp16 overflow) must not enter the EMA, or every later step would ascend by inf - inf.
        finite = torch.isfinite(grad_norm)
        if not all(name in self.ema for name in names):
            for name, g in zip(names, grads_local):
                if name not in self.ema:
                    self.ema[name] = torch.where(finite, g, 0.0)
            previous = None
        else:
            previous = [self.ema[name] for name in names]
        if previous is not None:
            # d = g - sigma m_prev, and m <- lam m_prev + (1 - lam) g, computed before g is overwritten by d.
            new_ema = torch._foreach_mul(previous, lam)
            torch._foreach_add_(new_ema, grads_local, alpha=1 - lam)
            torch._foreach_add_(grads_local, previous, alpha=-sigma)
            for value, old in zip(new_ema, previous):
                torch.where(finite, value, old, out=old)  # in place: no temporary, no copy
        norm = global_norm(grads)  # of d: inf when the EMA is huge (a corrupt state), which skips the ascent
        scale = rho / (norm + NORM_EPS)
        torch._foreach_mul_(grads_local, scale)
        return torch.isfinite(norm)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"fsam_ema.{name}": value for name, value in self.ema.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema = {key[len("fsam_ema.") :]: value.clone() for key, value in state.items()}
