"""Ascent rules: turn the clean gradient g (held in `.grad`) into the perturbation eps, in place.

A rule is called as `rule(names, params, grads, rho, grad_unit, grad_norm)` over the perturbed parameters that
have a gradient; on return `grads[i]` holds eps for `params[i]`, and the rule returns `None`, or a 0-dim bool
tensor that is False when its own normalizer was not finite (the ascent is then skipped and counted). `rho` may be
a 0-dim device tensor (it is 0 on a step whose gradient is not finite), and `grad_norm` is ||grads||, which the
caller has already computed.
`.grad` holds `g / grad_unit` (fp16 loss scale, a micro-batch's share of its window): normalized rules are free
of that factor, the others multiply it back.
Rules with state (F-SAM's EMA) expose it through `state_dict` / `load_state_dict` for checkpoints.
"""

from __future__ import annotations

import torch

from .tensors import bounded_groups, global_norm, local


NORM_EPS = 1e-12


class AscentRule:
    """Base class: the plain SAM ascent eps = rho g / (||g|| + 1e-12)."""

    def __init__(self, args):
        self.args = args

    def __call__(self, names, params, grads, rho, grad_unit, grad_norm) -> torch.Tensor | None:
        scale = rho / (grad_norm + NORM_EPS)
        torch._foreach_mul_([local(g) for g in grads], scale)
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class AdaptiveAscent(AscentRule):
    """ASAM (Kwon et al.): T = |w| + eta, eps = rho T^2 g / (||T g|| + 1e-12).

    The paper leaves biases unscaled (T = 1); `sam_adaptive_bias` scales them by |b| + eta as well.
    """

    def __call__(self, names, params, grads, rho, grad_unit, grad_norm) -> torch.Tensor:
        scale_all = self.args.sam_adaptive_bias
        weights = [i for i, name in enumerate(names) if scale_all or not name.endswith("bias")]
        weight_grads = [local(grads[i]) for i in weights]
        weight_params = [local(params[i]) for i in weights]
        # T is built group by group, twice (the same bits both times): kept for every tensor between the two
        # multiplications, it would be one more copy of the perturbed weights at every step.
        groups = bounded_groups(weight_params)
        for group in groups:
            self._times_operator([weight_grads[j] for j in group], [weight_params[j] for j in group])  # T g
        norm = global_norm(grads)
        scale = rho / (norm + NORM_EPS)
        for group in groups:
            self._times_operator([weight_grads[j] for j in group], [weight_params[j] for j in group])  # T^2 g
        torch._foreach_mul_([local(g) for g in grads], scale)  # T = 1 on biases
        return torch.isfinite(norm)

    def _times_operator(self, grads: list[torch.Tensor], params: list[torch.Tensor]) -> None:
        """grads <- T grads, T = |w| + eta."""
        operator = torch._foreach_abs(params)
        torch._foreach_add_(operator, self.args.sam_adaptive_eta)
        torch._foreach_mul_(grads, operator)


class UnnormalizedAscent(AscentRule):
    """USAM (the ascent of the Stable SAM paper's experiments): eps = rho g, g the true (unscaled) gradient."""

    def __call__(self, names, params, grads, rho, grad_unit, grad_norm) -> None:
        torch._foreach_mul_([local(g) for g in grads], rho * grad_unit)
        return None
