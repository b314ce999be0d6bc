"""mSAM (Behdin et al. 2022, arXiv 2212.04343): each micro-batch split into shards, one perturbation per shard.

The per-shard step itself is the mixin's micro accumulation; this module splits the batch. docs/methods.md#msam.
"""

from __future__ import annotations

from typing import Any

import torch


def split_batch(inputs: dict[str, Any], shards: int) -> list[dict[str, Any]]:
    """Split every batch-sized tensor of `inputs` into `shards` contiguous pieces; drop empty pieces."""
    if shards == 1:
        return [inputs]
    sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(
            f"sam_micro_batches={shards} needs inputs whose tensors share one batch dimension; got sizes {sizes}."
        )
    batch = sizes.pop()
    pieces = [dict(inputs) for _ in range(min(shards, batch))]
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            for piece, part in zip(pieces, torch.tensor_split(value, len(pieces))):
                piece[key] = part
    return pieces


def shard_sizes(shards: list[dict[str, Any]]) -> list[int]:
    """The number of examples in each shard of `split_batch` (one shard: 1, whatever the batch holds)."""
    if len(shards) == 1:
        return [1]
    return [
        next(v.shape[0] for v in shard.values() if isinstance(v, torch.Tensor) and v.dim() > 0) for shard in shards
    ]
