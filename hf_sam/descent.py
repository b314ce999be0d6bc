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

from .tensors import all_reduce_mean_, global_norm, local, zero_non_finite_


NORM_EPS = 1e-12


class DescentTransform:
    """Base class; `needs_clean_copy` says whether the clean gradient vector (not only its norm) is used, `acts`
    whether the transform changes anything at these arguments (False: the identity, e.g. at a weight of 0)."""

    needs_clean_copy = True

    @property
    def acts(self) -> bool:
        return True

    def __init__(self, args):
        self.args = args

    def after_sam_step(self, names, grads, clean, clean_norm) -> None:
        """Called once per SAM window after the last descent pass, before clipping and the step. `clean` is the
        step's own copy of g, dropped after it: the method's transform (GSAM, LookSAM) may overwrite it."""

    def after_plain_step(self, names, grads) -> None:
        """Called once per plain (non-SAM) window after its last pass."""

    def after_zero_radius_step(self) -> None:
        """Called instead of `after_sam_step` on a SAM step whose radius was 0 (g~ = g): the descent stays g~."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class DescentPipeline:
    """The method's descent transforms in order, and the copy of the clean gradient g that they need.

    At rho = 0 every transform is the identity in exact arithmetic (g~ = g: GSAM's g_perp and LookSAM's g_v vanish);
    computed in floats they are rounding noise, which LookSAM would even rescale to ||g||: they are off there.
    """

    def __init__(self, transforms: list[DescentTransform], args):
        self.transforms = transforms
        self.args = args
        self.clean_copy: list[torch.Tensor] | None = None
        self.clean_names: list[str] = []  # the perturbed tensors that had a clean gradient, in `clean_copy`'s order

    @property
    def active(self) -> bool:
        # A transform that is the identity (LookSAM's preset, alpha 0) must not cost a copy of g per SAM step, nor,
        # under DDP with local ascent or DeepSpeed, an all-reduce of it (or of every plain step's gradient).
        return self.args.sam_rho > 0 and any(t.acts for t in self.transforms)

    def keep_clean(self, perturbation, local_ascent: bool) -> None:
        """Copy g (in `.grad` now, before it becomes eps) when a transform needs it, on the descent gradient's basis:
        under local ascent the descent gradient is all-reduced and g is not, so one extra all-reduce averages it."""
        self.clean_copy = None
        if not self.active or not (local_ascent or any(t.needs_clean_copy for t in self.transforms if t.acts)):
            return
        if local_ascent:
            # Every perturbed tensor, 0 where this rank has no clean gradient: a tensor unused on one rank (a branch
            # under `ddp_find_unused_parameters`) has none there, and an all-reduce over each rank's own list would
            # pair mismatched buffers (gloo aborts, NCCL hangs or mixes tensors). DDP counts it as 0 too.
            self.clean_names = list(perturbation.names)
            self.clean_copy = [
                p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in perturbation.params
            ]
            all_reduce_mean_(self.clean_copy)
            return
        names, _, grads = perturbation.with_grads()
        self.clean_names = names
        self.clean_copy = [g.detach().clone() for g in grads]

    def _clean_for(self, names: list[str], grads: list[torch.Tensor], clean: list[torch.Tensor]) -> list[torch.Tensor]:
        """The clean gradient of each tensor in `names` (those with a descent gradient), 0 where it had none.

        A routed model (mixture of experts, any branch chosen by the weights) can use other tensors at w + eps than
        at w: the lists differ, and pairing them by position would crash or, with equal lengths, silently pair one
        tensor's g with another's g~. A tensor used only at w has no descent gradient, and the transforms leave it
        without one, as the plain step would.
        """
        if names == self.clean_names:
            return clean
        by_name = dict(zip(self.clean_names, clean))
        return [by_name[n] if n in by_name else torch.zeros_like(g) for n, g in zip(names, grads)]

    @torch.no_grad()
    def after_sam_step(self, perturbation, raw_norm: torch.Tensor, rho: float | None = None) -> None:
        """Rewrite the final gradient of a SAM step in the perturbed parameters' `.grad` (`raw_norm`: ||g|| of the
        ascent, used when no copy was kept; `rho`: the step's radius)."""
        clean, self.clean_copy = self.clean_copy, None
        if not self.active:
            return
        if rho == 0:
            # This step's radius is 0 although sam_rho is not (GSAM's schedule where the learning rate is 0, e.g.
            # the first warm-up step): as at sam_rho 0 the transforms are the identity and g_v is 0 in exact
            # arithmetic, and LookSAM would rescale the rounding noise to alpha ||g|| on the next plain step.
            for transform in self.transforms:
                transform.after_zero_radius_step()
            return
        names, _, grads = perturbation.with_grads()
        if not grads:  # no perturbed parameter got a gradient in this step: nothing to rewrite
            return
        clean_norm = global_norm(clean) if clean is not None else raw_norm  # ||g|| over every tensor used at w
        if clean is not None:
            # A non-finite clean gradient skipped the ascent (eps = 0) and shows in clean_norm, which each transform
            # checks; its NaN must not reach their arithmetic, where 0 x NaN is still NaN.
            zero_non_finite_([local(c) for c in clean])
            clean = self._clean_for(names, grads, clean)
        for transform in self.transforms:
            transform.after_sam_step(names, grads, clean, clean_norm)

    @torch.no_grad()
    def after_plain_step(self, perturbation) -> None:
        """Rewrite the final gradient of a plain (non-SAM) step, where a transform acts there (LookSAM)."""
        if not self.active:
            return
        names, _, grads = perturbation.with_grads()
        if not grads:
            return
        for transform in self.transforms:
            transform.after_plain_step(names, grads)
