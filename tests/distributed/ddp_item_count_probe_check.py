"""The one-off check whether the model returns its own mean (`SAMMixin._sam_loss_ignores_item_count`) decides on every
rank at the same call (DDP, CPU, gloo): a rank whose probed loss was exactly 0 (no scored token in its first
micro-batch) stayed undecided and ran its probe forwards again at its next step, alone.

Launch: `torchrun --nproc_per_node 2 tests/distributed/ddp_item_count_probe_check.py OUT.json`; rank 0 writes OUT.json.
"""

from __future__ import annotations

import os
import sys
import tempfile


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch.distributed as dist

from hf_sam import SAMTrainer
from tests.distributed.process_group import start_gloo, write_and_close
from tests.helpers import sam_args
from tests.test_loss_terms import lm_dataset, tiny_llama


PROBES = []  # one entry per eval-mode loss on this rank (not on the trainer: the probe runs off its record)


class ZeroFirstProbeOnRank1(SAMTrainer):
    """Rank 1's first probe (its two eval-mode losses) is exactly 0."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if not model.training:
            PROBES.append(self.state.global_step)
            if dist.get_rank() == 1 and len(PROBES) <= 2:
                loss = loss * 0
        return loss


def main():
    rank, _ = start_gloo()
    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    args = sam_args(folder[0], max_steps=3, per_device_train_batch_size=2, sam_method="mesa")
    trainer = ZeroFirstProbeOnRank1(model=tiny_llama(), args=args, train_dataset=lm_dataset(16))
    trainer.train()
    per_rank = [None, None]
    dist.all_gather_object(per_rank, {"probes": PROBES, "decision": trainer._sam.loss_ignores_item_count})
    del trainer
    write_and_close(sys.argv[1], {"per_rank": per_rank} if rank == 0 else None)


if __name__ == "__main__":
    main()
