"""Descent transforms (GSAM, LookSAM) under DDP with per-rank ascent, on a model with a branch one rank never uses.

Launch: `torchrun --nproc_per_node 2 tests/distributed/ddp_unused_check.py OUT.json WORKDIR`; rank 0 writes OUT.json.
With `ddp_find_unused_parameters=True`, a tensor unused on a rank has no clean gradient there (`.grad` is None after
the unsynced ascent backward), so the ranks hold clean gradients of different tensors when the transform's clean copy
is all-reduced.
"""

from __future__ import annotations

import gc
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hf_sam import SAMTrainer
from tests.distributed.process_group import start_gloo, write_and_close
from tests.helpers import sam_args, tiny_dataset


class RankBranch(nn.Module):
    """Head `b` adds to the logits on rank 1 only: on rank 0 it gets no gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 8)
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 3)

    def forward(self, input_ids, labels=None):
        hidden = self.emb(input_ids).mean(1)
        logits = self.a(hidden)
        if dist.get_rank() == 1:
            logits = logits + self.b(hidden)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def main() -> None:
    out_path, workdir = sys.argv[1], sys.argv[2]
    start_gloo()
    results = {}
    for method in ("gsam", "looksam"):
        args = sam_args(os.path.join(workdir, method), max_steps=4, per_device_train_batch_size=2,
                        ddp_find_unused_parameters=True, sam_method=method, sam_ascent_sync=False)  # fmt: skip
        trainer = SAMTrainer(model=RankBranch(), args=args, train_dataset=tiny_dataset(32))
        trainer.train()
        final = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
        del trainer
        gc.collect()
        finals = [None] * dist.get_world_size()
        dist.all_gather_object(finals, final)
        results[method] = {
            "ranks_identical": all(torch.equal(f, finals[0]) for f in finals),
            "finite": bool(torch.isfinite(final).all()),
        }
    write_and_close(out_path, results)


if __name__ == "__main__":
    main()
