"""Every rank's method-state file is written before rank 0 writes `trainer_state.json` (DDP, CPU, gloo).

`last_complete_checkpoint` takes a checkpoint whose `trainer_state.json` is readable to be whole, since Trainer writes
it last. Rank 0 writes it, while each rank writes its own `sam_state-rank{i}.safetensors`: rank 1 here is slow to
write its file, and rank 0 records, when it writes the trainer state, whether rank 1's file is there.

Launch: `torchrun --nproc_per_node 2 tests/distributed/ddp_checkpoint_order_check.py OUT.json`; rank 0 writes OUT.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch.distributed as dist
from transformers import TrainerState

import hf_sam.checkpoint as checkpoint
from hf_sam import SAMTrainer
from tests.distributed.process_group import start_gloo, write_and_close
from tests.helpers import sam_args, tiny_bert, tiny_dataset


def main():
    rank, _ = start_gloo()
    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    write_state = checkpoint.save_sam_state

    def slow_on_rank_1(*args, **kwargs):
        if rank == 1:
            time.sleep(3)  # a slow disk, a larger state
        write_state(*args, **kwargs)

    checkpoint.save_sam_state = slow_on_rank_1
    seen = []
    save_to_json = TrainerState.save_to_json

    def recording(self, path):
        seen.append(os.path.isfile(os.path.join(os.path.dirname(path), "sam_state-rank1.safetensors")))
        save_to_json(self, path)

    TrainerState.save_to_json = recording
    args = sam_args(folder[0], max_steps=2, sam_method="fsam", save_strategy="steps", save_steps=1)
    SAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset()).train()
    write_and_close(sys.argv[1], {"rank1_file_there_when_the_state_was_written": seen} if rank == 0 else None)


if __name__ == "__main__":
    main()
