"""What the host trainer counts per pass, kept to the step's clean pass.

A host trainer may count tokens or collect metrics inside `compute_loss` or `training_step` (TRL's trainers keep a
`_metrics` store of per-pass values and a `_total_train_tokens` counter). The SAM step runs more passes than the
host expects: the perturbed pass at w + eps, ESAM's scoring forward, Sparse SAM's Fisher passes. Each of them is run
inside `off_the_record(trainer)`, which puts the host's counters and metric stores back as they were, so what the
host logs is what the plain trainer would log for the clean passes alone.

What counts as a counter or a metric store, on the trainer object itself (its `vars()`): numbers (not bools),
one-element tensors, and dicts whose values are lists or dicts of lists (`defaultdict`s included). Everything else
(the model, the optimizer, the state, hf_sam's own `_sam*` attributes) is left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def _is_metric_store(value: Any, depth: int = 0) -> bool:
    if not isinstance(value, dict):
        return False
    return all(isinstance(v, list) or (depth == 0 and _is_metric_store(v, 1)) for v in value.values())


def _copy_store(store: dict) -> dict:
    # Keeps each dict's type and default factory, so a restored `defaultdict` still fills in missing keys.
    copied = type(store)(store.default_factory) if hasattr(store, "default_factory") else type(store)()
    for key, value in store.items():
        copied[key] = _copy_store(value) if isinstance(value, dict) else list(value)
    return copied


def _restore_store(store: dict, saved: dict) -> None:
    # In place: code holding the store (or one of its inner dicts) keeps seeing the restored values.
    for key in [k for k in store if k not in saved]:
        del store[key]
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(store.get(key), dict):
            _restore_store(store[key], value)
        else:
            store[key] = _copy_store(value) if isinstance(value, dict) else list(value)


def snapshot(trainer) -> dict[str, tuple[str, Any, Any]]:
    """The host's counters and metric stores: name -> (kind, the object, its saved value)."""
    saved: dict[str, tuple[str, Any, Any]] = {}
    for name, value in vars(trainer).items():
        if name.startswith("_sam"):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            saved[name] = ("number", value, value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad:
            saved[name] = ("tensor", value, value.detach().clone())
        elif _is_metric_store(value):
            saved[name] = ("store", value, _copy_store(value))
    return saved


def restore(trainer, saved: dict[str, tuple[str, Any, Any]]) -> None:
    """Put back what `snapshot` saved (in place for stores and tensors, so no reference to them goes stale)."""
    for name, (kind, original, value) in saved.items():
        if kind == "number":
            setattr(trainer, name, value)
        elif kind == "tensor":
            original.copy_(value)
            setattr(trainer, name, original)
        else:
            _restore_store(original, value)
            setattr(trainer, name, original)


@contextlib.contextmanager
def off_the_record(trainer) -> Iterator[None]:
    """Run a pass that is not the step's clean pass: the host's counters and metric stores are restored after it."""
    saved = snapshot(trainer)
    try:
        yield
    finally:
        restore(trainer, saved)
