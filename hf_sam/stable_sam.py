"""Stable SAM (Tan et al. 2024, arXiv 2401.07250): the descent gradient rescaled to the ascent gradient's norm.

docs/methods.md#stable-sam.
"""

from __future__ import annotations

import torch

from .descent import NORM_EPS, DescentTransform
from .tensors import global_norm, local


class Renormalize(DescentTransform):
    """Stable SAM (Tan et al. 2024): g_hat = (||g|| / ||g_tilde||) g_tilde, so the descent keeps the ascent's norm."""

    needs_clean_copy = False

    def after_sam_step(self, names, grads, clean, clean_norm) -> None:
        scale = clean_norm / (global_norm(grads) + NORM_EPS)
        scale = torch.where(torch.isfinite(clean_norm), scale, 1.0)  # a skipped ascent keeps the plain gradient
        torch._foreach_mul_([local(g) for g in grads], scale)
