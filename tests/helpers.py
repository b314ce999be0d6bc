"""Tiny in-process models and data for the tests; nothing is downloaded."""

from __future__ import annotations

import collections
import copy
import os
import traceback
import weakref

import torch
from datasets import Dataset
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import SequentialSampler
from transformers import BertConfig, BertForSequenceClassification, Trainer

import hf_sam
from hf_sam import SAMTrainer, SAMTrainingArguments


VOCAB, SEQ, LABELS = 50, 8, 3


def tiny_bert(seed: int = 0, dropout: float = 0.0, num_labels: int = LABELS) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    model = BertForSequenceClassification(config)
    # transformers 5.x: this model takes **kwargs, so Trainer assumes the loss is already normalized by
    # num_items_in_batch and skips the 1/GA division, but its loss is a plain mean: under GA the plain Trainer
    # would sum micro-batch means. Declaring it makes Trainer divide by GA, so a window's gradient is its mean.
    model.accepts_loss_kwargs = False
    return model


def tiny_dataset(n: int = 32, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict(
        {
            "input_ids": torch.randint(1, VOCAB, (n, SEQ), generator=generator).tolist(),
            "labels": torch.randint(0, LABELS, (n,), generator=generator).tolist(),
        }
    )


def batches(dataset: Dataset, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The dataset in order, as the sequential-sampler Trainer sees it."""
    out = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        out.append({"input_ids": torch.tensor(rows["input_ids"]), "labels": torch.tensor(rows["labels"])})
    return out


class SequentialSAMTrainer(SAMTrainer):
    """Data in dataset order, so a hand-written loop can see the same batches."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class SequentialTrainer(Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def sam_args(tmp_path, **overrides) -> SAMTrainingArguments:
    """Arguments for deterministic CPU runs: constant lr, no clipping, no saving, no logging integrations."""
    values = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return SAMTrainingArguments(**values)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_weights(a: dict, b: dict, exact: bool = True, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), f"{name} differs: max {(a[name] - b[name]).abs().max()}"
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def uneven_token_lm_data() -> tuple[torch.Tensor, torch.Tensor, Dataset]:
    """Four causal-LM rows whose micro-batches of 2 score uneven token counts: micro-batch 0 scores 14 tokens (row 1
    only 3 of them), micro-batch 1 scores 2 (one per row). Returns the ids, the labels and the dataset."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 40, (4, 8), generator=generator)
    labels = ids.clone()
    labels[2:, :6] = -100
    labels[1, :4] = -100
    return ids, labels, Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def tiny_gpt2():
    """A one-layer GPT-2 without dropout (vocabulary 40), seeded; it takes num_items_in_batch and normalizes by it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config)


def copy_model(model):
    return copy.deepcopy(model)


class PeakNewTensorBytes(TorchDispatchMode):
    """Within the block: the peak number of bytes held at once by tensors the ops allocate there (outputs on new
    storage, counted until their tensor is freed), e.g. to check that a pass over the weights does not hold a copy
    of all of them at once."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                nbytes = tensor.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, nbytes)
        return out


# Ops that make the host wait for an accelerator: reading a value (`.item()`, `bool()`, `float()`), and ops whose
# output size depends on the data (their kernels read it on the host).
_SYNCING_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_dim.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten.bincount.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.repeat_interleave.Tensor,
}
# Copies to the host, which on the CPU dispatch no op (the tensor already is there).
_HOST_COPIES = ("tolist", "numpy", "cpu")
_HF_SAM_DIR = os.path.dirname(os.path.abspath(hf_sam.__file__))


class HostSyncs(TorchDispatchMode):
    """Within the block: the calls made from hf_sam's own code that would make the host wait for an accelerator
    (reading a value, an op whose output size depends on the data, a copy to the host). On the CPU nothing waits,
    but the same calls block on CUDA, so the count is what a GPU run would pay.

    `counts[(key(), "file.py:function")]` counts them by what `key()` returned when they ran (e.g. the optimizer
    step; calls while it returns None are not counted) and by the hf_sam function that made them.
    """

    def __init__(self, key):
        super().__init__()
        self.key = key
        self.counts: collections.Counter = collections.Counter()
        self._patched: dict[str, object] = {}

    def _note(self) -> None:
        key = self.key()
        if key is None:
            return
        frames = [f for f in traceback.extract_stack()[:-2] if os.sep + "torch" + os.sep not in f.filename]
        frame = next((f for f in reversed(frames) if f.filename != __file__), None)
        if frame is not None and os.path.dirname(os.path.abspath(frame.filename)) == _HF_SAM_DIR:
            self.counts[(key, f"{os.path.basename(frame.filename)}:{frame.name}")] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if func in _SYNCING_OPS or boolean_index:
            self._note()
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in _HOST_COPIES:
            original = self._patched[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self._note()
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)
