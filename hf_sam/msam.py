"""mSAM (Behdin et al. 2022, arXiv 2212.04343): each micro-batch split into shards, one perturbation per shard.

The per-shard step itself is the mixin's micro accumulation; this module splits the batch. docs/methods.md#msam.
"""

from __future__ import annotations

from typing import Any

import torch


# A padding-free batch's per-sequence fields (TRL's collators, transformers' `DataCollatorWithFlattening`): rebuilt
# for the sequences a piece keeps, not sliced.
_CU_SEQ_LENS = ("cu_seq_lens_q", "cu_seq_lens_k")
_MAX_LENGTH = ("max_length_q", "max_length_k")


def sequence_bounds(inputs: dict[str, Any]) -> list[int] | None:
    """Token offsets `[0, end_1, ..., length]` of the sequences of a padding-free batch, else None.

    A padding-free batch (TRL's `padding_free` and its default packing, transformers' `DataCollatorWithFlattening`)
    is one row that holds several sequences back to back, told apart by `position_ids` restarting (and
    `cu_seq_lens_q` where the collator gives it) and without an `attention_mask`: each sequence is one example.
    """
    position_ids = inputs.get("position_ids")
    if "attention_mask" in inputs or not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        return None
    if position_ids.shape[0] != 1:
        return None
    cu_seq_lens = inputs.get("cu_seq_lens_q")
    if isinstance(cu_seq_lens, torch.Tensor) and cu_seq_lens.dim() == 1:
        bounds = [int(b) for b in cu_seq_lens.tolist()]
    else:  # where the position ids do not go up by one, as transformers finds packed sequences
        positions = position_ids[0]
        starts = (torch.diff(positions).ne(1).nonzero().flatten() + 1).tolist()
        bounds = [0, *starts, positions.shape[0]]
    return bounds if len(bounds) > 2 else None


def take_sequences(inputs: dict[str, Any], bounds: list[int], index: list[int]) -> dict[str, Any]:
    """The padding-free batch of the sequences `index` of `inputs` (whose offsets are `bounds`), back to back.

    Per-token tensors (`(1, length, ...)`) keep those sequences' tokens; `cu_seq_lens_*`, `max_length_*` and `seq_idx`
    are rebuilt for them, so the attention kernels see where each kept sequence starts.
    """
    length = bounds[-1]
    lengths = [bounds[i + 1] - bounds[i] for i in index]
    tokens = torch.cat([torch.arange(bounds[i], bounds[i + 1]) for i in index])
    out = dict(inputs)
    for key, value in inputs.items():
        if key in _MAX_LENGTH:
            out[key] = max(lengths)
        elif not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        elif key in _CU_SEQ_LENS:
            offsets = torch.tensor([0, *lengths]).cumsum(0)
            out[key] = offsets.to(dtype=value.dtype, device=value.device)
        elif key == "seq_idx":
            ids = torch.repeat_interleave(torch.arange(len(index)), torch.tensor(lengths))[None]
            out[key] = ids.to(dtype=value.dtype, device=value.device)
        elif value.dim() >= 2 and value.shape[:2] == (1, length):
            out[key] = value.index_select(1, tokens.to(value.device))
        else:
            raise ValueError(
                f"A padding-free batch (one row of {length} tokens) is split by its sequences, but {key!r} of"
                f" shape {tuple(value.shape)} is neither a per-token tensor (1, {length}, ...) nor a known"
                " per-sequence field"
                f" ({', '.join((*_CU_SEQ_LENS, *_MAX_LENGTH, 'seq_idx'))})."
            )
    return out


def split_batch(inputs: dict[str, Any], shards: int) -> list[dict[str, Any]]:
    """Split every batch-sized tensor of `inputs` into `shards` contiguous pieces; drop empty pieces.

    A padding-free batch (`sequence_bounds`) is split by its sequences instead of its one row.
    """
    if shards == 1:
        return [inputs]
    bounds = sequence_bounds(inputs)
    if bounds is not None:
        groups = torch.tensor_split(torch.arange(len(bounds) - 1), min(shards, len(bounds) - 1))
        return [take_sequences(inputs, bounds, group.tolist()) for group in groups]
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


def shard_sizes(shards: list[dict[str, Any]], shifts_labels: bool = False) -> list[int] | list[torch.Tensor]:
    """How much of its micro-batch's loss each shard of `split_batch` carries (one shard: 1, whatever it holds).

    With integer `labels` (class ids or tokens): the labels that count, as Trainer counts `num_items_in_batch`
    (not -100; `shift_labels` if the batch has them, else from the second position on for a causal LM), since a
    model's loss is their mean. A seq2seq or token-level batch padded with -100 holds more labelled tokens in some
    examples than in others: weighted by their examples, the shards' means were not the micro-batch's mean, and mSAM
    at rho 0 was not the plain Trainer. Counted on the device (no host sync), at least 1 per shard. Without integer
    labels: the number of examples (the sequences of a padding-free shard).
    """
    if len(shards) == 1:
        return [1]
    counts = [label_count(shard, shifts_labels) for shard in shards]
    if all(count is not None for count in counts):
        return [count.clamp(min=1).float() for count in counts]
    return [_examples(shard) for shard in shards]


def label_count(batch: dict[str, Any], shifts_labels: bool = False) -> torch.Tensor | None:
    """The integer labels of `batch` that count, as Trainer counts `num_items_in_batch` (not -100; `shift_labels` if
    the batch has them, else from the second position on for a causal LM), on the device; None without such labels."""
    labels = batch.get("shift_labels", batch.get("labels"))
    if not (isinstance(labels, torch.Tensor) and labels.dim() > 0 and not labels.is_floating_point()):
        return None
    if shifts_labels and "shift_labels" not in batch:
        labels = labels[..., 1:]
    return labels.ne(-100).sum()


def _examples(shard: dict[str, Any]) -> int:
    bounds = sequence_bounds(shard)
    if bounds is not None:
        return len(bounds) - 1
    return next(v.shape[0] for v in shard.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
