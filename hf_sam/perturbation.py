"""The perturbed parameter set and the perturb / restore cycle of one SAM step."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from .ascent import AscentRule
from .momentum_sam import base_optimizer
from .tensors import global_norm, local, zero_non_finite_


def select_perturbed(
    model: nn.Module, include: str | None, exclude: str | None, held: set[int] | None = None
) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters of `model` whose name matches `include` and not `exclude` (both regexes, optional), and
    that the optimizer holds (`held`: their ids, see `optimizer_held`; None takes every trainable parameter).

    Frozen parameters (e.g. a LoRA base model) are never perturbed, nor is a parameter that requires grad but that the
    optimizer does not hold (one built over a subset): it is never updated, as constant as a frozen one. A tied weight
    (GPT-2's `lm_head.weight` is `transformer.wte.weight`) is one tensor under several names: it is listed once, under
    the name `named_parameters()` gives it, and matched on every one of its names, so `lm_head` includes or excludes
    it whichever module registered it first.
    """
    include_re = re.compile(include) if include else None
    exclude_re = re.compile(exclude) if exclude else None
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    selected = []
    for name, param in model.named_parameters():
        if not param.requires_grad or (held is not None and id(param) not in held):
            continue
        names = aliases[id(param)]
        if include_re is not None and not any(include_re.search(n) for n in names):
            continue
        if exclude_re is not None and any(exclude_re.search(n) for n in names):
            continue
        selected.append((name, param))
    return selected


def optimizer_held(trainer) -> set[int] | None:
    """The ids of the parameters that `trainer.optimizer` updates, or None where it cannot tell: no optimizer yet, or
    one whose groups hold copies of the weights instead of the model's parameters (DeepSpeed's flat partitions)."""
    if trainer.optimizer is None:
        return None
    held = {id(p) for group in base_optimizer(trainer.optimizer).param_groups for p in group["params"]}
    return held if any(id(p) in held for p in trainer.model.parameters()) else None


class Perturbation:
    """Applies eps to the perturbed parameters and restores them bit-exactly (copy back, not subtract).

    The backup buffers are allocated once and reused: the only persistent extra memory is one copy of the
    perturbed parameters.

    Args:
        named_params (`list[tuple[str, nn.Parameter]]`): The parameters eligible for perturbation.
        rule (`AscentRule`): Turns the clean gradient into eps.
        mask (`SparseMask`, *optional*): Zeroes eps off the mask, after normalization by the full norm.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], rule: AscentRule, mask=None):
        self.names = [name for name, _ in named_params]
        self.mask = mask  # a SparseMask (Sparse SAM) or None
        self.params = [p for _, p in named_params]
        self.rule = rule
        self._backup: dict[int, torch.Tensor] = {}
        self._active: list[torch.nn.Parameter] = []

    def with_grads(self) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
        """Names, parameters and gradients of the perturbed parameters that currently have a gradient."""
        chosen = [(n, p) for n, p in zip(self.names, self.params) if p.grad is not None]
        return [n for n, _ in chosen], [p for _, p in chosen], [p.grad for _, p in chosen]

    @property
    def active(self) -> bool:
        """Whether weights are currently perturbed (between `ascend` and `restore`)."""
        return bool(self._active)

    @torch.no_grad()
    def ascend(self, rho: float, grad_unit: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn the clean gradient in `.grad` into eps (in place) and move the weights to w + eps.

        A non-finite gradient (fp16 overflow, NaN loss), or a rule whose normalizer is not finite, gives eps = 0 for
        this step, decided on the device without a host sync, and counts as skipped.

        Args:
            rho (`float`): Radius for this step.
            grad_unit (`torch.Tensor` or `float`): `.grad` times this is the true gradient g (it undoes the fp16
                loss scale and, in micro accumulation, the micro-batch's share of the window).

        Returns:
            `(grad_norm, skipped)`: ||g|| in `.grad` units (multiply by `grad_unit` for the true norm) and a 0/1
            float tensor that is 1 when the ascent was skipped.
        """
        names, params, grads = self.with_grads()
        if not grads:
            # No perturbed parameter got a gradient in this step (`sam_include` on a head or tower the batch does not
            # use): eps = 0, nothing moves (the rules' foreach ops refuse an empty list).
            nothing = torch.zeros((), device=self.params[0].device if self.params else None)
            return nothing, nothing
        grad_norm = global_norm(grads)
        finite = torch.isfinite(grad_norm)
        # A radius of 0 when g is not finite, then NaN/inf -> 0: eps = 0 everywhere, without a separate pass.
        rule_ok = self.rule(names, params, grads, rho * finite, grad_unit, grad_norm)
        if rule_ok is not None:  # the rule's own normalizer (||T g||, F-SAM's ||g - sigma m||) overflowed
            finite = finite & rule_ok
        if self.mask is not None:
            self.mask.apply_(names, grads)
        local_grads = [local(g) for g in grads]
        zero_non_finite_(local_grads)
        local_params = self._back_up(params)
        torch._foreach_add_(local_params, local_grads)
        return grad_norm, (~finite).float()

    @torch.no_grad()
    def shift(self, directions: list[torch.Tensor | None], rho: float) -> torch.Tensor:
        """Move the weights to w + rho d / ||d|| (Momentum-SAM: d = m, rho < 0); a None direction leaves its tensor.

        A non-finite or zero norm moves nothing, decided on the device without a host sync.

        Returns:
            ||d|| over the tensors that have a direction.
        """
        chosen = [(p, d) for p, d in zip(self.params, directions) if d is not None]
        if not chosen:
            return torch.zeros(())
        params = [p for p, _ in chosen]
        norm = global_norm([d for _, d in chosen])
        scale = torch.where(torch.isfinite(norm) & (norm > 0), rho / norm, torch.zeros_like(norm))
        local_params = self._back_up(params)
        # w += d * scale, with the scale as a device tensor: no host sync, no temporary copy of the directions.
        torch._foreach_addcmul_(
            local_params, [local(d) for _, d in chosen], [scale.to(local_params[0].dtype)] * len(params)
        )
        return norm

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved weights back: w is bit-identical to what it was before `ascend`."""
        if not self._active:
            return
        torch._foreach_copy_([local(p) for p in self._active], [self._backup[id(p)] for p in self._active])
        self._active = []

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Run the block with w in the model, then put w + eps back bit for bit (no-op when nothing is perturbed).

        Window mode and Momentum-SAM hold w + eps across the micro-batches of a window, so a callback that evaluates
        or saves between two of them (`on_substep_end`) would otherwise score or save the perturbed weights.
        """
        if not self._active:
            yield
            return
        active = self._active
        with torch.no_grad():
            perturbed = [local(p).detach().clone() for p in active]
            torch._foreach_copy_([local(p) for p in active], [self._backup[id(p)] for p in active])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([local(p) for p in active], perturbed)

    def _back_up(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy `params` into their backup buffers and mark them perturbed; returns their local shards to move."""
        local_params = [local(p) for p in params]
        torch._foreach_copy_([self._backup_for(p) for p in params], local_params)
        self._active = params
        return local_params

    def _backup_for(self, param: torch.Tensor) -> torch.Tensor:
        buffer = self._backup.get(id(param))
        if buffer is None:
            buffer = torch.empty_like(local(param))
            self._backup[id(param)] = buffer
        return buffer
