"""SAM under DDP's own options: `ddp_static_graph`, and `ddp_find_unused_parameters` (transformers' default) with
tensors that a pass reaches on some micro-batches, ranks or weights only.

Launch: `torchrun --nproc_per_node 2 tests/distributed/ddp_options_check.py OUT.json WORKDIR`; rank 0 writes
OUT.json, the asserts live in `tests/test_distributed.py`.

- `static`: a per-rank ascent under `ddp_static_graph` is refused when the trainer is built (DDP's reducer failed on an
  internal assert in its first unsynced backward); SSAM-F with a synced ascent under it equals the run without it
  (its Fisher passes' backward was taken for the static graph's first iteration, and nothing was all-reduced after).
- `routed`: a model whose weights choose its expert (`b` at the initial weights, `c` at w + eps and after the first
  update) trains under per-rank ascent as the hand-written mean of per-rank SAM steps (DDP's reduction failed on `b`,
  reached by the unsynced clean pass only).
- `branch`: head `b` is used only by micro-batches whose first token is even, so on some micro-batches of some
  ranks. Micro accumulation with a synced ascent at rho 0 equals the plain Trainer, and mSAM's shards at rho 0 equal
  their per-rank ascent (a tensor reached by an earlier micro-batch's or shard's descent only was left out of DDP's
  reduction: the ranks drifted apart).
"""

from __future__ import annotations

import copy
import gc
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_sam import SAMTrainer
from tests.distributed import ddp_check as ref
from tests.distributed.ddp_unused_check import RankBranch
from tests.distributed.process_group import start_gloo, write_and_close
from tests.helpers import sam_args, tiny_bert, tiny_dataset


class Routed(RankBranch):
    """Expert `b` while the weights are those it was built with, expert `c` anywhere else (a router whose choice
    w + eps flips). No `**kwargs` in `forward`: Trainer then takes the loss as the batch mean (scale 1)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Linear(8, 3)
        self.register_buffer("w0", self.a.weight.detach().clone(), persistent=False)

    def forward(self, input_ids, labels=None):
        hidden = self.emb(input_ids).mean(1)
        expert = self.b if torch.equal(self.a.weight, self.w0) else self.c
        logits = self.a(hidden) + expert(hidden)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class DataBranch(RankBranch):
    """Head `b` adds to the logits of micro-batches whose first token is even only (on any rank)."""

    def forward(self, input_ids, labels=None):
        hidden = self.emb(input_ids).mean(1)
        logits = self.a(hidden)
        if int(input_ids[0, 0]) % 2 == 0:
            logits = logits + self.b(hidden)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, tensor)
    return out


def train(model, workdir: str, n: int = 32, **overrides) -> list[torch.Tensor]:
    """Every rank's final weights."""
    trainer = SAMTrainer(model=model, args=sam_args(workdir, **overrides), train_dataset=tiny_dataset(n))
    trainer.train()
    final = ref.flat(trainer.model)
    del trainer
    gc.collect()
    return gathered(final)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def ranks_identical(finals: list[torch.Tensor]) -> bool:
    return all(torch.equal(f, finals[0]) for f in finals)


def static(workdir: str) -> dict:
    try:
        SAMTrainer(model=tiny_bert(), args=sam_args(workdir, sam_method="sam", ddp_static_graph=True),
                   train_dataset=tiny_dataset())  # fmt: skip
        refused = None
    except ValueError as error:
        refused = str(error)
    common = dict(sam_method="ssam-f", sam_fisher_samples=8, sam_ascent_sync=True, per_device_train_batch_size=2,
                  max_steps=3)  # fmt: skip
    plain = train(tiny_bert(), os.path.join(workdir, "dynamic"), **common)
    graph = train(tiny_bert(), os.path.join(workdir, "static"), ddp_static_graph=True, **common)
    return {
        "local_ascent_refused": refused,
        "ranks_identical": ranks_identical(graph),
        "static_vs_dynamic": max_diff(graph, plain),
        "moved": float((plain[0] - ref.flat(tiny_bert())).abs().max()),
    }


def routed_reference(initial: nn.Module, per_rank_batches: list) -> torch.Tensor:
    """Per-rank ascent by hand: each rank's descent gradient at its own w + eps, averaged over the ranks (0 for a
    tensor a rank's descent pass did not reach, as DDP counts it); SGD."""
    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=ref.LR)
    for step in range(ref.STEPS):
        descents = []
        for batches in per_rank_batches:
            batch = ref.to_batch(batches[step])
            descents.append(ref.mean_ce_grad(model, batch, ref.sam_eps(ref.mean_ce_grad(model, batch), ref.RHO)))
        names = {name for descent in descents for name in descent}
        ref.set_grads(model, {n: sum(d[n] for d in descents if n in d) / len(descents) for n in names})
        optimizer.step()
        model.zero_grad(set_to_none=True)
    return ref.flat(model)


def routed(workdir: str) -> dict:
    model = Routed()
    initial = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=ref.LR)
    args = ref.check_arguments(workdir, sam_method="sam", sam_rho=ref.RHO)
    trainer = ref.RecordingTrainer(model=model, args=args, train_dataset=tiny_dataset(), optimizers=(optimizer, None))
    trainer.train()
    finals = gathered(ref.flat(trainer.model))
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, trainer.seen)
    del trainer
    gc.collect()
    reference = routed_reference(initial, seen)
    return {
        "ranks_identical": ranks_identical(finals),
        "ref_max_diff": float((finals[0] - reference).abs().max()),
        "moved": float((reference - ref.flat(initial)).abs().max()),
    }


def branch(workdir: str) -> dict:
    window = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=6)
    plain = train(DataBranch(), os.path.join(workdir, "none"), sam_method="none", **window)
    micro = train(DataBranch(), os.path.join(workdir, "micro"), sam_method="sam", sam_rho=0.0, sam_ascent_sync=True,
                  sam_accumulation="micro", **window)  # fmt: skip
    shards = dict(sam_method="msam", sam_rho=0.0, sam_micro_batches=2, per_device_train_batch_size=2, max_steps=6)
    msam_local = train(DataBranch(), os.path.join(workdir, "msam-local"), **shards)
    msam_sync = train(DataBranch(), os.path.join(workdir, "msam-sync"), sam_ascent_sync=True, **shards)
    return {
        "micro_ranks_identical": ranks_identical(micro),
        "micro_vs_plain": max_diff(micro, plain),
        "msam_ranks_identical": ranks_identical(msam_sync),
        "msam_sync_vs_local": max_diff(msam_sync, msam_local),
        "plain_moved": float((plain[0] - ref.flat(DataBranch())).abs().max()),
    }


def main() -> None:
    out_path, workdir = sys.argv[1], sys.argv[2]
    start_gloo()
    results = {}
    for name, part in (("static", static), ("routed", routed), ("branch", branch)):
        try:
            results[name] = part(os.path.join(workdir, name))
        except Exception as error:  # on every rank alike (the same model and steps): reported by the test
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            gc.collect()
        dist.barrier()
    write_and_close(out_path, results)


if __name__ == "__main__":
    main()
