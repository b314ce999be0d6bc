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


def split_pairs(inputs: dict[str, Any], shards: int) -> list[dict[str, Any]]:
    """Split a preference batch into `shards` pieces of whole pairs (TRL's DPO collator stacks the rows as
    `[chosen_1 .. chosen_B, rejected_1 .. rejected_B]`, and the loss pairs row i with row B + i).

    Tensors with 2B rows give each shard its chosen rows and the matching rejected rows; tensors with B rows (one
    value per pair, e.g. precomputed reference log-probabilities) are split as they are.
    """
    if shards == 1:
        return [inputs]
    rows = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    pairs = max(rows) // 2 if rows else 0
    if not pairs or max(rows) != 2 * pairs or rows - {pairs, 2 * pairs}:
        raise ValueError(
            f"sam_micro_batches={shards} splits a preference batch by pairs: its tensors must have 2B rows (chosen"
            f" then rejected) or B rows (one value per pair); got sizes {rows}."
        )
    pieces = []
    for group in torch.tensor_split(torch.arange(pairs), min(shards, pairs)):
        piece = dict(inputs)
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                index = torch.cat([group, group + pairs]) if value.shape[0] == 2 * pairs else group
                piece[key] = value.index_select(0, index.to(value.device))
        pieces.append(piece)
    return pieces


def shard_sizes(shards: list[dict[str, Any]]) -> list[int]:
    """The number of examples in each shard of `split_batch` (one shard: 1, whatever the batch holds)."""
    if len(shards) == 1:
        return [1]
    return [
        next(v.shape[0] for v in shard.values() if isinstance(v, torch.Tensor) and v.dim() > 0) for shard in shards
    ]
