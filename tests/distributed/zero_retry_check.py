"""`auto_find_batch_size` under DeepSpeed ZeRO-2 (CPU, gloo): the retry after an out-of-memory error.

Launch: `torchrun --nproc_per_node 2 tests/distributed/zero_retry_check.py OUT.json`. Rank 0 writes OUT.json; the
asserts live in `tests/test_distributed.py`.

Both ranks raise an out-of-memory error in the perturbed pass of the first SAM step (batch 8); Trainer releases the
engine, builds a new one and runs its inner loop again at batch 7. The run must then equal the one started at batch
7, and every SAM step must hold its passes on the engine Trainer trains with (`model_wrapped`).
"""

from __future__ import annotations

import os
import sys
import tempfile


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

from hf_sam import SAMTrainingArguments
from tests.distributed.process_group import start_gloo, write_and_close
from tests.distributed.zero_check import zero
from tests.helpers import SequentialSAMTrainer, sam_args, tiny_bert, tiny_dataset
from tests.test_faults import OutOfMemoryOnce


class EngineCheck(OutOfMemoryOnce):
    """Records, after every training step, whether the SAM step held the engine Trainer trains with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.current_engine: list[bool] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.current_engine.append(self._sam.zero.engine is self.model_wrapped)
        return loss


def arguments(batch: int, auto: bool) -> SAMTrainingArguments:
    return sam_args(
        tempfile.mkdtemp(),
        ddp_backend="gloo",
        per_device_train_batch_size=batch,
        auto_find_batch_size=auto,
        max_steps=3,
        lr_scheduler_type="linear",  # the engine steps its scheduler: a released engine's would show
        deepspeed=zero(2),
        sam_method="sam",
        sam_ascent_sync=True,
    )


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def sam_logs(trainer) -> list[dict]:
    keep = ("loss", "learning_rate")
    return [{k: v for k, v in h.items() if k in keep or k.startswith("sam/")} for h in trainer.state.log_history]


def main() -> None:
    out_path = sys.argv[1]
    start_gloo()
    retried = EngineCheck(model=tiny_bert(), args=arguments(8, True), train_dataset=tiny_dataset(64), at=2)
    retried.train()
    fresh = SequentialSAMTrainer(model=tiny_bert(), args=arguments(7, False), train_dataset=tiny_dataset(64))
    fresh.train()
    results = {
        "batch": retried._train_batch_size,
        "current_engine": retried.current_engine,
        "max_diff": float((flat(retried.model) - flat(fresh.model)).abs().max()),
        "logs_retried": sam_logs(retried),
        "logs_fresh": sam_logs(fresh),
    }
    del retried, fresh
    write_and_close(out_path, results)


if __name__ == "__main__":
    main()
