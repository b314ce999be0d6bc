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
    if hasattr(model, "require_backward_grad_sync"):  # DDP
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


def _fsdp2_gradient_sync(model: nn.Module) -> bool:
    """Whether FSDP2 reduces gradients in the next backward. FSDP2 has a setter only: this reads the flag its
    `set_requires_gradient_sync` writes on the root's parameter group (True, FSDP2's default, if absent)."""
    get_state = getattr(model, "_get_fsdp_state", None)
    group = getattr(get_state(), "_fsdp_param_group", None) if get_state is not None else None
    return bool(getattr(group, "reduce_grads", True))
