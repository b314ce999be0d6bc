"""A loss at w + eps that is NaN on rank 1 only (DDP, CPU, gloo): the update is dropped on both ranks, and the logged
sam/perturbed_loss leaves the step out on both ranks, as docs/methods.md#logged-metrics promises.

Launch: `torchrun --nproc_per_node 2 tests/distributed/ddp_dropped_metrics_check.py OUT.json`; rank 0 writes OUT.json.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch.distributed as dist

from hf_sam import SAMTrainer
from tests.distributed.process_group import start_gloo, write_and_close
from tests.helpers import sam_args, tiny_bert, tiny_dataset


HIT = 1  # the optimizer step whose loss at w + eps is NaN on rank 1


class OneRankNaN(SAMTrainer):
    """NaN loss at w + eps on rank 1 at step HIT; records every SAM step's loss at w + eps on this rank."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.perturbed: dict[int, float] = {}

    def _sam_perturbed_pass(self, *args, **kwargs):
        if dist.get_rank() == 1 and self.state.global_step == HIT:
            self._nan = True
        loss = super()._sam_perturbed_pass(*args, **kwargs)
        step = self.state.global_step
        self.perturbed[step] = self.perturbed.get(step, 0.0) + float(loss)
        return loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if getattr(self, "_nan", False):
            self._nan = False
            loss = loss * float("nan")
        return loss


def main():
    rank, world = start_gloo()
    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    results = {}
    for logging_steps in (1, 4):
        for accumulation in ("window", "micro"):
            name = f"{accumulation}-log{logging_steps}"
            args = sam_args(os.path.join(folder[0], name), max_steps=4, per_device_train_batch_size=2,
                            gradient_accumulation_steps=2, sam_accumulation=accumulation, sam_method="sam",
                            logging_steps=logging_steps, dataloader_drop_last=True)  # fmt: skip
            trainer = OneRankNaN(model=tiny_bert(), args=args, train_dataset=tiny_dataset(48))
            trainer.train()
            every = [None] * world
            dist.all_gather_object(every, trainer.perturbed)
            logs = [h for h in trainer.state.log_history if "sam/skipped_updates" in h]
            # Each log's expected mean: every rank's losses of the SAM steps in its window whose update was kept.
            expected = []
            for log in logs:
                steps = [s for s in range(log["step"] - logging_steps, log["step"]) if s != HIT]
                values = [per_rank[s] for per_rank in every for s in steps]
                expected.append(sum(values) / len(values) if values else None)
            results[name] = {
                "logged": [h.get("sam/perturbed_loss") for h in logs],
                "expected": expected,
                "skipped_updates": [h.get("sam/skipped_updates") for h in logs],
                "rank1_hit_is_nan": math.isnan(every[1][HIT]),
            }
            del trainer
    write_and_close(sys.argv[1], results if rank == 0 else None)


if __name__ == "__main__":
    main()
