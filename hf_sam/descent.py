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

from .tensors import dot, global_norm, local, shard_group


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


class Renormalize(DescentTransform):
    """Stable SAM (Tan et al. 2024): g_hat = (||g|| / ||g_tilde||) g_tilde, so the descent keeps the ascent's norm."""

    needs_clean_copy = False

    def after_sam_step(self, names, grads, clean, clean_norm) -> None:
        scale = clean_norm / (global_norm(grads) + NORM_EPS)
        scale = torch.where(torch.isfinite(clean_norm), scale, 1.0)  # a skipped ascent keeps the plain gradient
        torch._foreach_mul_([local(g) for g in grads], scale)


class SurrogateGap(DescentTransform):
    """GSAM (Zhuang et al. 2022): g_perp = g - (<g, g~>/||g~||^2) g~, descent g~ - alpha g_perp."""

    def after_sam_step(self, names, grads, clean, clean_norm) -> None:
        # alpha = 0 after a skipped ascent: g~ (the plain gradient then) stays as it is.
        alpha = self.args.gsam_alpha * torch.isfinite(clean_norm)
        coef = dot(clean, grads) / (global_norm(grads).square() + NORM_EPS)
        grads_local, clean_local = [local(g) for g in grads], [local(c) for c in clean]
        # g~ - alpha (g - coef g~) = (1 + alpha coef) g~ - alpha g
        torch._foreach_mul_(grads_local, 1 + alpha * coef)
        torch._foreach_addcmul_(grads_local, clean_local, [-alpha] * len(clean_local))


class LookAhead(DescentTransform):
    """LookSAM (Liu et al. 2022): keep g_v = g~ - (<g~, g>/||g||^2) g on SAM steps (whole parameter vector);
    on the k-1 plain steps in between, descend along g + alpha (||g|| / ||g_v||) g_v with one pass."""

    def __init__(self, args):
        super().__init__(args)
        self.g_v: dict[str, torch.Tensor] = {}
        self._g_v_norm: torch.Tensor | None = None

    def after_sam_step(self, names, grads, clean, clean_norm) -> None:
        coef = dot(grads, clean) / (clean_norm.square() + NORM_EPS)
        orthogonal = torch._foreach_mul([local(c) for c in clean], -coef)
        torch._foreach_add_(orthogonal, [local(g) for g in grads])
        # coef is not finite after a skipped ascent or with a non-finite descent gradient (an fp16 overflow that
        # GradScaler skips): g_v keeps its previous value (zero before the first one), never NaN.
        keep = torch.isfinite(coef)
        zero = torch.zeros((), device=keep.device)
        for name, new in zip(names, orthogonal):
            torch.where(keep, new, self.g_v.get(name, zero), out=new)
        self.g_v = dict(zip(names, orthogonal))
        self._g_v_norm = None

    def after_plain_step(self, names, grads) -> None:
        if not self.g_v:  # no SAM step yet (e.g. resumed mid-period from a checkpoint without g_v)
            return
        g_v = [self.g_v[name] for name in names]
        if self._g_v_norm is None:  # g_v is fixed until the next SAM step: its norm too
            # g_v holds local shards under FSDP2: sum over the ranks the gradients are sharded over.
            self._g_v_norm = global_norm(g_v, group=shard_group(grads))
        scale = self.args.looksam_alpha * global_norm(grads) / (self._g_v_norm + NORM_EPS)
        # g += scale * g_v in one pass, without a temporary copy of g_v (scale stays on the device).
        torch._foreach_addcmul_([local(g) for g in grads], g_v, [scale] * len(g_v))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"looksam_gv.{name}": value for name, value in self.g_v.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.g_v = {key[len("looksam_gv.") :]: value.clone() for key, value in state.items()}
        self._g_v_norm = None
