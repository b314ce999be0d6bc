"""LookSAM (Liu et al. 2022, arXiv 2203.02714): full SAM every `looksam_k` steps, and on the steps between, one pass
plus the reused component of the last SAM gradient orthogonal to its clean gradient. docs/methods.md#looksam.
"""

from __future__ import annotations

import torch

from .descent import NORM_EPS, DescentTransform
from .tensors import dot, global_norm, local, shard_group


class LookSAMReuse(DescentTransform):
    """LookSAM (Liu et al. 2022): keep g_v = g~ - (<g~, g>/||g||^2) g on SAM steps (whole parameter vector);
    on the k-1 plain steps in between, descend along g + alpha (||g|| / ||g_v||) g_v with one pass."""

    def __init__(self, args):
        super().__init__(args)
        self.g_v: dict[str, torch.Tensor] = {}
        self._g_v_norm: torch.Tensor | None = None

    @property
    def acts(self) -> bool:
        return self.args.looksam_alpha > 0  # alpha 0 reuses nothing: SAM every k steps, g~ as it is

    def after_sam_step(self, names, grads, clean, clean_norm) -> None:
        if self.args.looksam_alpha == 0:  # nothing is reused: keep no copy of the parameters
            return
        coef = dot(grads, clean) / (clean_norm.square() + NORM_EPS)
        # Written into `clean`, the step's own copy of g that the pipeline drops after this step: a new buffer would
        # be one more copy of the perturbed parameters while that copy and the previous g_v are still alive.
        orthogonal = [local(c) for c in clean]
        torch._foreach_mul_(orthogonal, -coef)
        torch._foreach_add_(orthogonal, [local(g) for g in grads])
        # coef is not finite after a skipped ascent or with a non-finite descent gradient (an fp16 overflow that
        # GradScaler skips): g_v keeps its previous value (zero before the first one), never NaN.
        keep = torch.isfinite(coef)
        zero = torch.zeros((), device=keep.device)
        for name, new in zip(names, orthogonal):
            torch.where(keep, new, self.g_v.get(name, zero), out=new)
        self.g_v = dict(zip(names, orthogonal))
        self._g_v_norm = None

    def after_zero_radius_step(self) -> None:
        # g~ = g: g_v is 0, so the plain steps until the next SAM step add nothing (as before the first SAM step).
        self.g_v = {}
        self._g_v_norm = None

    def after_plain_step(self, names, grads) -> None:
        if not self.g_v:  # no SAM step yet (e.g. resumed mid-period from a checkpoint without g_v)
            return
        if self._g_v_norm is None:  # g_v is fixed until the next SAM step: its norm too
            # g_v holds local shards under FSDP2: sum over the ranks the gradients are sharded over.
            self._g_v_norm = global_norm(list(self.g_v.values()), group=shard_group(grads))
        scale = self.args.looksam_alpha * global_norm(grads) / (self._g_v_norm + NORM_EPS)
        # A routed model can give a tensor a gradient now that had none at the last SAM step: its g_v is 0.
        pairs = [(local(g), self.g_v[name]) for name, g in zip(names, grads) if name in self.g_v]
        # g += scale * g_v in one pass, without a temporary copy of g_v (scale stays on the device).
        torch._foreach_addcmul_([g for g, _ in pairs], [v for _, v in pairs], [scale] * len(pairs))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"looksam_gv.{name}": value for name, value in self.g_v.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.g_v = {key[len("looksam_gv.") :]: value.clone() for key, value in state.items()}
        self._g_v_norm = None
