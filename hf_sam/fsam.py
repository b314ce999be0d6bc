"""Friendly SAM (Li et al. 2024, arXiv 2403.12350): ascend along the gradient minus its running mean."""

from __future__ import annotations

import torch

from .ascent import NORM_EPS, AscentRule
from .tensors import average_dtype, bounded_groups, global_norm, local


class FriendlyAscent(AscentRule):
    """d = g - sigma m, eps = rho d / ||d||, then m <- lambda m + (1 - lambda) g.

    As the official code: the previous EMA is subtracted, and on the first step d = g and m starts as g.
    m is kept in true gradient units (fp16 scale removed) so it stays valid when the loss scale changes, and in
    float32 for bf16 / fp16 gradients: in bf16 (1 - lambda)(g - m) rounds away wherever g is within 2% of m (at
    lambda 0.9; 20% at 0.99), and d = g - sigma m, what is left of g once its mean is removed, inherits m's error
    magnified.
    """

    def __init__(self, args):
        super().__init__(args)
        self.ema: dict[str, torch.Tensor] = {}
        # Whether a finite g has entered m yet (a 0-dim bool on the device; None: known to have, as after loading a
        # checkpoint written without it). Under fp16 the GradScaler's first steps often overflow: m must then start
        # as the first finite g, as on a first step, not as 0.
        self.started: torch.Tensor | None = None

    def __call__(self, names, params, grads, rho, grad_unit, grad_norm) -> torch.Tensor:
        grads_local = [local(g) for g in grads]
        if not (isinstance(grad_unit, float) and grad_unit == 1.0):  # fp32/bf16 window mode: .grad already is g
            torch._foreach_mul_(grads_local, grad_unit)  # true gradient g
        # A non-finite g (fp16 overflow) must not enter the EMA, or every later step would ascend by inf - inf.
        finite = torch.isfinite(grad_norm)
        # Per tensor: one without an EMA yet (the first step, or a tensor whose first gradient comes later, as with
        # ESAM's dropped tensors or a routed model's expert) starts it at g and ascends along d = g; the others keep
        # d = g - sigma m_prev and their EMA update.
        known = [(g, self.ema[name]) for name, g in zip(names, grads_local) if name in self.ema]
        for name, g in zip(names, grads_local):
            if name not in self.ema:
                self.ema[name] = torch.where(finite, g, 0.0).to(average_dtype(g))
        if not known:
            self.started = finite  # the first step: m holds g only if g was finite
        else:
            # m_prev is still 0 when every earlier g overflowed (fp16): then this step is the first, so d = g (as
            # below, since m_prev = 0) and m starts as g, not as (1 - lam) g.
            started = self.started.to(finite.device) if self.started is not None else None
            # Group by group: the new average of every tensor at once would be one more copy of the perturbed weights.
            for group in bounded_groups([g for g, _ in known]):
                self._step([known[j][0] for j in group], [known[j][1] for j in group], finite, started)
            if started is not None:
                self.started = started | finite
        norm = global_norm(grads)  # of d: inf when the EMA is huge (a corrupt state), which skips the ascent
        scale = rho / (norm + NORM_EPS)
        torch._foreach_mul_(grads_local, scale)
        return torch.isfinite(norm)

    def _step(self, grads, previous, finite: torch.Tensor, started: torch.Tensor | None) -> None:
        """d = g - sigma m_prev into `grads`, and m <- lam m_prev + (1 - lam) g into `previous` where g is finite."""
        sigma, lam = self.args.fsam_sigma, self.args.fsam_lambda
        # The new average is computed before g is overwritten by d.
        new_ema = torch._foreach_mul(previous, lam)
        torch._foreach_add_(new_ema, grads, alpha=1 - lam)
        if started is not None:
            for value, g in zip(new_ema, grads):
                torch.where(started, value, g, out=value)
        torch._foreach_add_(grads, previous, alpha=-sigma)  # in float32, rounded once to g's dtype
        for value, old in zip(new_ema, previous):
            torch.where(finite, value, old, out=old)  # in place: no temporary, no copy

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"fsam_ema.{name}": value for name, value in self.ema.items()}
        if self.started is not None:
            state["fsam_started"] = self.started
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema = {
            key[len("fsam_ema.") :]: value.to(average_dtype(value), copy=True)  # a bf16 average of an older checkpoint
            for key, value in state.items()
            if key != "fsam_started"
        }
        started = state.get("fsam_started")
        # A checkpoint written before the flag existed: its average is taken as started (None).
        self.started = started.clone().bool() if started is not None else None
