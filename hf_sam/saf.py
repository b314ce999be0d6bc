"""SAF (Du et al. 2022, arXiv 2205.14083, "Sharpness-Aware training for Free"): the KL to the logits each example
had `saf_lag_epochs` epochs earlier, kept in a `LogitBank` on the device. The math: docs/methods.md#saf.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from .loss_term import LossTerm, kl_to_target, logits_of, term_scale


INDEX_COLUMN = "idx"


# ---------------------------------------------------------------------- example index


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items (mappings) get their position as `idx` (replacing any `idx` they carry)."""

    def __init__(self, dataset, column: str = INDEX_COLUMN):
        self.dataset = dataset
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if not isinstance(item, Mapping):
            raise ValueError(
                f"add_example_index needs dataset items that are mappings (dicts); item {i} is {type(item).__name__}."
            )
        return {**item, self.column: i}


def is_map_style(dataset) -> bool:
    """Whether `dataset` has a length and items by position (not a torch or `datasets` iterable dataset)."""
    return not isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, "__len__")


def _is_hf_dataset(dataset) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        return False
    return isinstance(dataset, datasets.Dataset)


def add_example_index(dataset, column: str = INDEX_COLUMN):
    """Return `dataset` with an index column (`idx`: example i has the value i), as SAF needs.

    A `datasets.Dataset` that already has the column is returned unchanged (GLUE datasets ship one: any distinct
    integers, which `example_ids` maps to bank rows); one without gets a real column. Any other map-style dataset
    of dicts is wrapped in an `IndexedDataset`, which numbers its items by position. `SAMTrainer` calls this on
    its training set when `sam_loss_term="saf"`.

    Args:
        dataset (`datasets.Dataset` or `torch.utils.data.Dataset`): The training set (with `__len__`).
        column (`str`, *optional*, defaults to `"idx"`): The column name.

    Raises:
        `ValueError`: for an iterable dataset (SAF needs each example's position in a fixed list).
    """
    if _is_hf_dataset(dataset):
        if column in dataset.column_names:
            return dataset
        return dataset.add_column(column, list(range(len(dataset))))
    if not is_map_style(dataset):
        raise ValueError(
            "SAF records logits per example, so it needs a map-style training set with __len__ (not an iterable"
            " dataset). Use sam_method='mesa', which needs no example index."
        )
    if isinstance(dataset, IndexedDataset):
        return dataset
    # Items that carry their own `idx` are numbered by position too: reading every item to check its ids would
    # load the whole set (images), and positions are what the bank needs.
    return IndexedDataset(dataset, column)


def example_ids(dataset, column: str = INDEX_COLUMN) -> torch.Tensor | None:
    """The sorted example ids of a `datasets.Dataset`'s index column, or None when they are 0..len-1 (positions).

    The logit bank has one row per example: row r belongs to the r-th smallest id, so ids of any size (a GLUE
    subset's 1000..1999, hashes up to 2^63) cost nothing, and the rows stay those of the same examples when the
    set is reordered. Checked: one integer per example, no repeats. Other datasets are numbered by position.
    """
    if not _is_hf_dataset(dataset):
        return None
    import numpy as np

    values = np.asarray(dataset.with_format("numpy", columns=[column])[column])
    if values.size == 0:
        raise ValueError("SAF needs a non-empty training set.")
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"The training set's {column!r} column must hold one integer per example (SAF's example id); got dtype"
            f" {values.dtype}, shape {values.shape}. Drop or rename it to let hf_sam number the examples."
        )
    ids = np.sort(values.astype(np.int64))
    if (ids[1:] == ids[:-1]).any():
        raise ValueError(
            f"The training set's {column!r} column repeats values: SAF would mix up the logits of different"
            " examples. Drop or rename it to let hf_sam number the examples."
        )
    if ids[0] == 0 and ids[-1] == ids.size - 1:
        return None
    return torch.from_numpy(ids)


# ---------------------------------------------------------------------- the bank


class LogitBank:
    """SAF's record of past logits: for each example and each of the last `lag + 1` epochs, its logits.

    `bank[i, e % (lag + 1)]` holds example i's logits of epoch e, `written[i, e % (lag + 1)] = e`; a lookup in
    epoch e reads slot (e - lag) % (lag + 1) and is valid only where that slot was written in epoch e - lag.
    State: `saf_bank` (N x (lag + 1) x C, fp32) and `saf_written` (N x (lag + 1), int64, -1 = never).

    One extra row, N, takes the padding rows of an all-gather (index N), so recording never needs to know on the
    host which rows are real; it is not part of the state.
    """

    def __init__(self, num_examples: int, lag: int, device: torch.device, ids: torch.Tensor | None = None):
        self.lag = lag
        self.slots = lag + 1
        self.num_examples = num_examples
        # Sorted example ids when they are not the positions 0..N-1 (see `example_ids`): row r holds ids[r].
        self.ids = ids.to(device) if ids is not None else None
        self._written = torch.full((num_examples + 1, self.slots), -1, dtype=torch.long, device=device)
        self._bank: torch.Tensor | None = None  # allocated at the first batch, when the class count is known

    @property
    def written(self) -> torch.Tensor:
        return self._written[: self.num_examples]

    @property
    def bank(self) -> torch.Tensor | None:
        return None if self._bank is None else self._bank[: self.num_examples]

    def _check(self, logits: torch.Tensor, index: torch.Tensor) -> None:
        if logits.dim() != 2 or logits.shape[0] != index.shape[0]:
            raise ValueError(
                f"sam_method='saf' records one (batch, classes) logit row per example, but the model returned logits"
                f" of shape {tuple(logits.shape)} for {index.shape[0]} examples. For token-level or other outputs"
                " use --sam_method mesa (an EMA teacher instead of a per-example bank)."
            )
        classes = logits.shape[1]
        if self._bank is None:
            self._bank = torch.zeros(
                (self.num_examples + 1, self.slots, classes), dtype=torch.float32, device=self._written.device
            )
        elif self._bank.shape[2] != classes:
            raise ValueError(f"SAF's logit bank holds {self._bank.shape[2]} classes, the model returned {classes}.")

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Bank rows of the example ids `index`; an id outside the training set goes to the padding row N (found
        and kept nowhere), on the device: no host sync, and no out-of-range index."""
        if self.ids is None:
            known = (index >= 0) & (index < self.num_examples)
            return torch.where(known, index, self.num_examples)
        position = torch.searchsorted(self.ids, index).clamp(max=self.num_examples - 1)
        return torch.where(self.ids[position] == index, position, self.num_examples)

    def lookup(self, logits: torch.Tensor, rows: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets z_hat for bank `rows` from epoch `epoch - lag`, and whether each was recorded."""
        self._check(logits, rows)
        slot = (epoch - self.lag) % self.slots
        # -1 marks a never-written slot: before epoch `lag` nothing can be found. The padding row is never found.
        found = (self._written[rows, slot] == epoch - self.lag) & (epoch >= self.lag) & (rows < self.num_examples)
        return self._bank[rows, slot], found

    def record(self, logits: torch.Tensor, rows: torch.Tensor, epoch: int) -> None:
        """Store `logits` as epoch `epoch`'s for bank `rows` (row `num_examples` marks padding: kept nowhere).

        A row whose logits are not finite (an fp16 overflow in a batch the GradScaler skips) is kept nowhere either:
        as a target it would make the example's term NaN an epoch later, and the bank unfit for a checkpoint. The
        example then has no target from this epoch, as before its first record.
        """
        self._check(logits, rows)
        rows = torch.where(torch.isfinite(logits).all(-1), rows, self.num_examples)
        slot = epoch % self.slots
        self._bank[rows, slot] = logits.detach().float()
        self._written[rows, slot] = epoch

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._bank is None:
            return {"saf_written": self.written}
        return {"saf_bank": self.bank, "saf_written": self.written}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        written = state.get("saf_written")
        if written is None or written.shape != self.written.shape or set(state) - {"saf_bank", "saf_written"}:
            got = {k: tuple(v.shape) for k, v in state.items()}
            raise ValueError(
                f"The checkpoint's SAF state {got} does not fit this run: expected saf_written of shape"
                f" {tuple(self.written.shape)} (examples x (saf_lag_epochs + 1)). Resume with the training set and"
                " saf_lag_epochs of the original run."
            )
        bank = state.get("saf_bank")
        if bank is not None and (bank.dim() != 3 or bank.shape[:2] != written.shape):
            raise ValueError(f"SAF state: saf_bank {tuple(bank.shape)} does not match {tuple(written.shape)}.")
        self._written[: self.num_examples].copy_(written)
        self._written[self.num_examples :] = -1
        self._bank = None
        if bank is not None:
            self._bank = torch.zeros((self.num_examples + 1, *bank.shape[1:]), device=self._written.device)
            self._bank[: self.num_examples].copy_(bank)


def gather_rows(
    index: torch.Tensor, logits: torch.Tensor, capacity: int, pad_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, logits) of every rank's batch, on every rank, in rank order.

    A no-op without an initialized process group of more than one rank. Each rank pads its rows to `capacity`
    (the per-device batch size, the same on every rank) with index `pad_index`, so one all-gather of a fixed
    shape does it and the host never waits for the device to learn the sizes. Rows are packed as float64, exact
    for both the fp32 logits and indices below 2^53.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return index, logits
    if index.shape[0] > capacity:
        raise ValueError(
            f"sam_method='saf' got a training batch of {index.shape[0]} examples on one rank, more than the per-device"
            f" batch size {capacity} it all-gathers across ranks. Batches must not exceed per_device_train_batch_size."
        )
    rows = torch.zeros((capacity, 1 + logits.shape[1]), dtype=torch.float64, device=logits.device)
    rows[:, 0] = pad_index
    rows[: index.shape[0], 0] = index.to(torch.float64)
    rows[: index.shape[0], 1:] = logits.detach().to(torch.float64)
    gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, rows)
    rows = torch.cat(gathered)
    return rows[:, 0].long(), rows[:, 1:].float()


class SAFTerm(LossTerm):
    """SAF's term: KL to the bank's logits of each example from `saf_lag_epochs` earlier; then record this batch's."""

    def __init__(self, trainer):
        super().__init__(trainer)
        if trainer.train_dataset is None:
            raise ValueError("sam_method='saf' needs a train_dataset: it records logits per training example.")
        dataset = trainer.train_dataset
        self.bank = LogitBank(len(dataset), self.args.saf_lag_epochs, self.args.device, example_ids(dataset))

    def term(self, inputs, captured, index, prepared, num_items_in_batch) -> torch.Tensor | None:
        args, trainer = self.args, self.trainer
        if index is None:
            raise ValueError(
                f"sam_method='saf' needs the example index column {INDEX_COLUMN!r} in every training batch. SAMTrainer"
                " adds it to a datasets.Dataset or a dataset of dicts; a custom collator must pass it through."
            )
        logits = logits_of(captured.output, args.sam_method)
        self.say_if_two_classes(logits)
        bank = self.bank
        rows = bank.rows(index.to(logits.device).long().reshape(-1))
        epoch = trainer.state.epoch or 0.0
        whole = math.floor(epoch)
        term = None
        if epoch >= args.saf_start_epoch:
            target, found = bank.lookup(logits, rows, whole)
            # Examples without a record from epoch e - lag (first epochs, drop_last) add nothing.
            kl = torch.where(found, kl_to_target(logits, target, args.saf_tau, args.sam_method), 0.0)
            scale = term_scale(trainer, rows.numel(), num_items_in_batch)
            term = args.saf_lambda * args.saf_tau**2 * kl.sum() * scale
            hits = found.sum()
            # Counted in examples: the mean over the window's examples that found a reference. A micro-batch without
            # any (the epochs before the lag is reached) is no KL of 0, and a window without any leaves saf/kl out.
            trainer._sam_metrics.add("saf/kl", kl.detach().sum(), count=hits)
            trainer._sam_metrics.add("saf/coverage", hits.float(), count=rows.numel())
        # Every rank records every rank's batch, so a later lookup never misses an example another rank saw.
        all_rows, all_logits = gather_rows(rows, logits.detach().float(), trainer._train_batch_size, bank.num_examples)
        bank.record(all_logits, all_rows, whole)
        trainer._sam_count_passes(1.0)
        return term

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.bank.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.bank.load_state_dict(state)


@contextlib.contextmanager
def signature_with_index(trainer):
    """Trainer's kept columns plus SAF's index column, for the training set's column removal and collator."""
    trainer._set_signature_columns_if_needed()
    saved = trainer._signature_columns
    if INDEX_COLUMN not in saved:
        trainer._signature_columns = [*saved, INDEX_COLUMN]
    try:
        yield
    finally:
        trainer._signature_columns = saved
