"""What the perturbed pass must not change or must see again: the RNG stream and batch-norm statistics."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn


# torch's CPU state, the CUDA generator's (or None), Python's `random` and NumPy's global state.
RNGState = tuple[torch.Tensor, torch.Tensor | None, Any, Any]


def capture_rng(device: torch.device) -> RNGState:
    """The CPU RNG state and, on CUDA, the device generator's state (no device sync); also Python's and NumPy's
    global generators, which a host or a user's override may draw from in each pass (TRL's GKDTrainer decides with
    `random.random()` whether a step trains on generated completions, a `compute_loss` override may draw a mixup
    coefficient from `np.random`): replayed, the perturbed pass makes the clean pass's draws, and the streams after
    the step are the plain trainer's."""
    device_state = None
    if device.type == "cuda" and torch.cuda.is_initialized():
        device_state = torch.cuda.get_rng_state(device)
    return torch.get_rng_state(), device_state, random.getstate(), np.random.get_state()


def restore_rng(state: RNGState, device: torch.device) -> None:
    """Rewind the RNG so the next forward draws the same dropout masks as the one after `capture_rng`."""
    cpu_state, device_state, python_state, numpy_state = state
    torch.set_rng_state(cpu_state)
    if device_state is not None:
        torch.cuda.set_rng_state(device_state, device)
    random.setstate(python_state)
    np.random.set_state(numpy_state)


@contextlib.contextmanager
def rng_untouched(device: torch.device, collator: Any = None) -> Iterator[None]:
    """Leave every random stream as it was before the block: the global ones (`capture_rng`) and a data collator's
    own generator (transformers' `DataCollatorForLanguageModeling(seed=...)` keeps one in `.generator`), for passes
    that are no training passes of the host's (SSAM-F's Fisher examples, collated and run between two steps)."""
    rng = capture_rng(device)
    generator = getattr(collator, "generator", None)
    if isinstance(generator, torch.Generator):
        saved = generator.get_state()
    elif isinstance(generator, np.random.Generator):
        saved = generator.bit_generator.state
    try:
        yield
    finally:
        restore_rng(rng, device)
        if generator is None and getattr(collator, "generator", None) is not None:
            collator.generator = None  # created in the block: the next training batch creates it from its seed again
        elif isinstance(generator, torch.Generator):
            generator.set_state(saved)
        elif isinstance(generator, np.random.Generator):
            generator.bit_generator.state = saved


def batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every batch-norm layer of `model` that tracks running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def bn_buffers(layers: list[nn.modules.batchnorm._BatchNorm]) -> list[torch.Tensor]:
    """The running statistics of `layers`, `num_batches_tracked` included."""
    buffers = [b for layer in layers for b in (layer.running_mean, layer.running_var, layer.num_batches_tracked)]
    return [b for b in buffers if b is not None]


def bn_snapshot(layers: list[nn.modules.batchnorm._BatchNorm]) -> list[torch.Tensor]:
    """A copy of the running statistics of `layers` (on their device, no sync), for `restore_bn`."""
    return [b.clone() for b in bn_buffers(layers)]


def restore_bn(layers: list[nn.modules.batchnorm._BatchNorm], snapshot: list[torch.Tensor]) -> None:
    """Put back the running statistics `bn_snapshot` copied."""
    with torch.no_grad():
        torch._foreach_copy_(bn_buffers(layers), snapshot)


@contextlib.contextmanager
def frozen_bn_stats(layers: list[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Put back the running statistics of `layers` after the block.

    Snapshot-and-restore rather than momentum=0: it also covers `momentum=None` (cumulative average), where
    `num_batches_tracked` drives the update.
    """
    if not layers:
        yield
        return
    saved = bn_snapshot(layers)
    try:
        yield
    finally:
        restore_bn(layers, saved)
