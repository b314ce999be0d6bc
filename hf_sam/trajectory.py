"""One-pass methods that add a loss term from the training trajectory: SAF and MESA.

Both add lambda * tau^2 * mean KL(softmax(z_hat / tau) || softmax(z / tau)) to the loss, z the logits of this pass:

- SAF (Du et al. 2022): z_hat_i are the logits recorded for example i `saf_lag_epochs` epochs earlier, kept in a
  `LogitBank` on the device (N x (lag + 1) x C ring buffer, with the epoch each slot was written).
- MESA: z_hat are the logits of an `EMATeacher`, an exponential moving average of the weights (eval mode, no grad).

Neither runs the SAM passes: the mixin adds the term in `compute_loss` of Trainer's one pass per micro-batch.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from .tensors import local


try:  # FSDP2's module class (public from torch 2.6 on)
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - old torch
    FSDPModule = ()


LOSS_TERMS = ("none", "saf", "mesa")
INDEX_COLUMN = "idx"


# ---------------------------------------------------------------------- example index (SAF)


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


# ---------------------------------------------------------------------- the term


def logits_of(outputs, method: str) -> torch.Tensor:
    """The logits of a model output: a `ModelOutput`/dict with `logits`, or a tuple `(loss, logits, ...)` (with
    labels) or `(logits, ...)` (without)."""
    if isinstance(outputs, Mapping) or hasattr(outputs, "keys"):
        if "logits" in outputs.keys():
            return outputs["logits"]
    elif isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        if outputs[0].dim() > 0:
            return outputs[0]
        if len(outputs) >= 2 and isinstance(outputs[1], torch.Tensor):
            return outputs[1]
    raise ValueError(
        f"sam_method={method!r} needs the model to return logits (an output with `.logits`, or a tuple"
        f" (loss, logits, ...)); got {type(outputs).__name__}."
    )


def one_output_message(method: str) -> str:
    return (
        f"sam_method={method!r} adds a KL term between softmax distributions over the model's outputs, but this"
        " model has one output per example (a regression head, num_labels=1): a softmax over one value is always 1,"
        " so the term would be 0 and the method would do nothing (at its full cost). For regression use a method"
        " that perturbs the weights, e.g. --sam_method sam."
    )


def kl_to_target(logits: torch.Tensor, target: torch.Tensor, tau: float, method: str = "saf") -> torch.Tensor:
    """KL(softmax(target / tau) || softmax(logits / tau)) over the last dimension, in fp32, gradient to `logits`."""
    if logits.shape[-1] < 2:
        raise ValueError(one_output_message(method))
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_q = F.log_softmax(logits.float() / tau, dim=-1)
        log_p = F.log_softmax(target.detach().float() / tau, dim=-1)
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def token_mask(logits: torch.Tensor, labels: torch.Tensor | None, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions that count for MESA: the logits to compare, and a bool mask of the same leading shape.

    `(batch, classes)` logits: every example whose label is not -100 (every example for multi-label targets).
    `(batch, ..., vocab)`: every position whose label is not -100; with `shift` (causal LM) the logits at t are
    scored against the label at t + 1. Without labels every position counts.
    """
    if shift and logits.dim() >= 3:
        logits = logits[:, :-1]
        labels = labels[:, 1:] if labels is not None else None
    if labels is None or (logits.dim() == 2 and labels.shape != logits.shape[:1]):
        return logits, torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"sam_method='mesa' compares logits per labelled position: logits {tuple(logits.shape)} do not match"
            f" labels {tuple(labels.shape)} (expected labels of shape logits.shape[:-1])."
        )
    return logits, labels.ne(-100)


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
        """Store `logits` as epoch `epoch`'s for bank `rows` (row `num_examples` marks padding: kept nowhere)."""
        self._check(logits, rows)
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


class EMATeacher:
    """MESA's teacher: a copy of the model whose trainable weights follow v <- decay v + (1 - decay) w.

    Frozen parameters and buffers are shared with the model, not copied (under LoRA only the adapters are
    averaged and stored). The copy stays in eval mode (no dropout) and runs without gradient.
    State: `mesa_ema.<parameter name>` per trainable parameter.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        shared = {id(p): p for p in model.parameters() if not p.requires_grad}
        shared.update({id(b): b for b in model.buffers()})
        self.module = copy.deepcopy(model, memo=shared)
        # accelerate patches `forward` on the instance (autocast, fp32 outputs); the copy uses the class's own
        # forward, and the caller enters the autocast context itself.
        for attribute in ("forward", "_original_forward"):
            self.module.__dict__.pop(attribute, None)
        self.module.eval()
        self.names: list[str] = []
        self.student: list[torch.Tensor] = []
        self.ema: list[torch.Tensor] = []
        for (name, p), (copy_name, v) in zip(model.named_parameters(), self.module.named_parameters()):
            if name != copy_name:  # pragma: no cover - deepcopy keeps the module tree
                raise RuntimeError(f"EMA copy is out of order: {name} vs {copy_name}")
            if p.requires_grad:
                v.requires_grad_(False)
                v.grad = None
                self.names.append(name)
                self.student.append(p)
                self.ema.append(v)

    @torch.no_grad()
    def update(self) -> None:
        # v + (1 - beta)(w - v) = beta v + (1 - beta) w, as one pass over the weights (this rank's shards).
        torch._foreach_lerp_(self.ema, [local(p).detach() for p in self.student], 1 - self.decay)

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Any]):
        return self.module(**inputs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"mesa_ema.{name}": v for name, v in zip(self.names, self.ema)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict()
        if set(state) != set(expected):
            missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(
                f"The checkpoint's MESA teacher does not fit this model (missing {missing[:3]}, unknown"
                f" {unknown[:3]}). Resume with the model and trainable parameters of the original run."
            )
        with torch.no_grad():
            for key, value in expected.items():
                if state[key].shape != value.shape:
                    raise ValueError(
                        f"MESA state {key!r} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}."
                    )
                value.copy_(state[key])


class ShardedEMATeacher(EMATeacher):
    """MESA's teacher under FSDP2: the EMA of this rank's shards, and no second model.

    FSDP2 refuses a deep copy, and a whole copy would defeat sharding anyway. The teacher forward runs the sharded
    model itself, in eval mode and without gradient, with the EMA shards copied into its parameters (FSDP2
    all-gathers them like any weights); then every module is resharded, so no gathered EMA weight stays behind
    for the student's passes, and the student's shards are copied back. Extra memory: two shard-sized copies.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = model
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.student = [p for _, p in named]
        self.ema = [local(p).detach().clone() for p in self.student]
        self._held = [torch.empty_like(v) for v in self.ema]  # the student's shards during a teacher forward

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Any]):
        shards = [local(p) for p in self.student]
        torch._foreach_copy_(self._held, shards)
        torch._foreach_copy_(shards, self.ema)
        was_training = self.module.training
        self.module.eval()
        try:
            return self.module(**inputs)
        finally:
            for module in self.module.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
            torch._foreach_copy_(shards, self._held)
            self.module.train(was_training)


class AfterOptimizerStep(TrainerCallback):
    """Calls `hook()` right after every `optimizer.step()` of the Trainer (MESA's EMA update).

    Holds the hook weakly, so the callback does not keep its trainer alive.
    """

    def __init__(self, hook):
        self._hook = weakref.WeakMethod(hook)

    def on_optimizer_step(self, args, state, control, **kwargs):
        hook = self._hook()
        if hook is not None:
            hook()
