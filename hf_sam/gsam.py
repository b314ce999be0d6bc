"""GSAM (Zhuang et al. 2022, arXiv 2203.08065): the surrogate-gap descent, and a radius that follows the learning
rate. docs/methods.md#gsam.
"""

from __future__ import annotations

import torch

from .descent import NORM_EPS, DescentTransform
from .tensors import dot, global_norm, local


class SurrogateGap(DescentTransform):
    """GSAM (Zhuang et al. 2022): g_perp = g - (<g, g~>/||g~||^2) g~, descent g~ - alpha g_perp."""

    @property
    def acts(self) -> bool:
        return self.args.gsam_alpha > 0  # alpha 0: the descent is g~, SAM's

    def after_sam_step(self, names, grads, clean, clean_norm) -> None:
        # alpha = 0 after a skipped ascent: g~ (the plain gradient then) stays as it is.
        alpha = self.args.gsam_alpha * torch.isfinite(clean_norm)
        coef = dot(clean, grads) / (global_norm(grads).square() + NORM_EPS)
        grads_local, clean_local = [local(g) for g in grads], [local(c) for c in clean]
        # g~ - alpha (g - coef g~) = (1 + alpha coef) g~ - alpha g
        torch._foreach_mul_(grads_local, 1 + alpha * coef)
        torch._foreach_addcmul_(grads_local, clean_local, [-alpha] * len(clean_local))


def rho_min(args) -> float:
    """GSAM's lower radius: `sam_rho_min`, or `sam_rho` itself when unset (a constant radius, whatever it is now)."""
    return args.sam_rho if args.sam_rho_min is None else args.sam_rho_min


def scheduled_rho(args, learning_rate: float, peak_learning_rate: float | None) -> float:
    """`sam_rho`, or rho moving linearly with the learning rate from `sam_rho` at the peak to `sam_rho_min` at 0.

    GSAM's schedule, available to every method: it is off while `sam_rho_min` is unset or equals `sam_rho`.
    """
    low = rho_min(args)
    if low >= args.sam_rho or not peak_learning_rate:
        return args.sam_rho
    ratio = min(1.0, max(0.0, learning_rate / peak_learning_rate))
    return low + (args.sam_rho - low) * ratio
