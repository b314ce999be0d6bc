"""Gradient synchronization of one backward under DDP or FSDP2, whatever the Trainer's own context says."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Make the backwards inside the block all-reduce / reduce-scatter (`sync`) or defer it, and put back the previous
    setting afterwards: an ascent may sync on an early micro-batch of a window that Trainer defers, and accelerate's
    `no_sync` would turn FSDP2's sync back on when it exits, even inside the Trainer's deferral. A model that is
    neither DDP nor FSDP2 runs the block as it is."""
    if is_ddp(model):
        previous = model.require_backward_grad_sync
        model.require_backward_grad_sync = sync
        try:
            yield
        finally:
            model.require_backward_grad_sync = previous
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        previous = _fsdp2_gradient_sync(model)
        model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(previous)
    else:
        yield


def tracks_used_tensors(model: nn.Module) -> bool:
    """Whether `model` is DDP with `find_unused_parameters` (transformers' default for a model without gradient
    checkpointing): its reducer counts every tensor that a backward since its last reduction reached as used, an
    unsynced backward's too, and fails that reduction on a used tensor whose `.grad` is None ("Encountered gradient
    which is undefined, but still allreduced by DDP reducer"). A synced backward ends DDP's iteration: the tensors
    the unsynced backwards before it reached are forgotten, and a tensor that only they reached is no longer
    averaged by the next reduction."""
    return is_ddp(model) and bool(getattr(model, "find_unused_parameters", False))


def is_ddp(model: nn.Module) -> bool:
    """Whether `model` is a DDP wrapper (it has the gradient-sync switch that `no_sync` flips)."""
    return hasattr(model, "require_backward_grad_sync")


def _fsdp2_gradient_sync(model: nn.Module) -> bool:
    """Whether FSDP2 reduces gradients in the next backward. FSDP2 has a setter only: this reads the flag its
    `set_requires_gradient_sync` writes on the root's parameter group (True, FSDP2's default, if absent)."""
    return bool(getattr(_fsdp_param_group(model), "reduce_grads", True))


def _fsdp_param_group(module: nn.Module):
    """The FSDP2 parameter group of `module` (None for a module that `fully_shard` did not wrap)."""
    get_state = getattr(module, "_get_fsdp_state", None)
    return getattr(get_state(), "_fsdp_param_group", None) if get_state is not None else None


def drop_deferred_grads(model: nn.Module) -> None:
    """Drop the gradients FSDP2 holds back from `.grad` after unsynced backwards (a no-op without FSDP2).

    A backward inside Trainer's deferral (`no_sync` on the early micro-batches of a window) leaves its gradient on
    FSDP2's unsharded parameters, to be reduce-scattered into `.grad` by the next synced backward. Setting `.grad` to
    None does not reach it: a window cut short would pass its partial gradient on to the next step. FSDP2 has no
    public call for this; the attributes read here are the ones its `post_backward` fills.
    """
    for module in model.modules():
        for fsdp_param in getattr(_fsdp_param_group(module), "fsdp_params", None) or []:
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None:
                unsharded.grad = None
            if getattr(fsdp_param, "unsharded_accumulated_grad", None) is not None:
                fsdp_param.unsharded_accumulated_grad = None
