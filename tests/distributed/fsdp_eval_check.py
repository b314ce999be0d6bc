"""Evaluation during training under FSDP2 (CPU, gloo): training must not depend on it.

Launch: `torchrun --nproc_per_node 2 tests/distributed/fsdp_eval_check.py OUT.json`. Rank 0 writes OUT.json; the
asserts live in `tests/test_distributed.py`.

FSDP2 keeps the root module's parameters gathered after a forward without backward (an evaluation). Each case runs
under FSDP2 with an evaluation after every step and without any, and under DDP with the synced ascent: the three must
end at the same weights (Momentum-SAM shifts the shards after the evaluation, the weight average restores them, MESA's
teacher swaps its EMA shards in).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch.distributed as dist

from tests.distributed.ddp_check import RecordingTrainer, check_arguments
from tests.distributed.fsdp_trainer_check import FSDP, force_fsdp_on_cpu, full_flat
from tests.distributed.process_group import start_gloo, write_and_close
from tests.helpers import tiny_bert, tiny_dataset


CASES = {
    "momentum-sam": dict(sam_method="momentum-sam", sam_rho=0.2, optim_args="momentum=0.9"),
    "sam-weight-ema": dict(sam_method="sam", weight_ema_decay=0.5),
    # The average after each window of 2 micro-batches (one optimizer step), from the sharded weights.
    "sam-weight-ema-ga2": dict(
        sam_method="sam", weight_ema_decay=0.5, gradient_accumulation_steps=2, per_device_train_batch_size=1
    ),
    "mesa": dict(sam_method="mesa", mesa_ema_decay=0.5, learning_rate=3.0),
}


def run(name, tmp, overrides):
    settings = {"optim": "sgd", "learning_rate": 0.1, "weight_decay": 0.0, "max_steps": 4, **overrides}
    args = check_arguments(os.path.join(tmp, name), **settings)
    trainer = RecordingTrainer(
        model=tiny_bert(), args=args, train_dataset=tiny_dataset(32), eval_dataset=tiny_dataset(8, seed=1)
    )
    if overrides.get("fsdp"):
        force_fsdp_on_cpu(trainer)
    trainer.train()
    return full_flat(trainer.model)


def main():
    out_path = sys.argv[1]
    rank, _ = start_gloo()
    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    tmp = folder[0]
    results = {}
    for name, overrides in CASES.items():
        evaluated = run(f"{name}-fsdp-eval", tmp, {**overrides, **FSDP, "eval_strategy": "steps", "eval_steps": 1})
        plain = run(f"{name}-fsdp", tmp, {**overrides, **FSDP})
        ddp = run(
            f"{name}-ddp-eval", tmp, {**overrides, "sam_ascent_sync": True, "eval_strategy": "steps", "eval_steps": 1}
        )
        results[name] = {
            "fsdp_eval_vs_fsdp": float((evaluated - plain).abs().max()),
            "fsdp_eval_vs_ddp_eval": float((evaluated - ddp).abs().max()),
        }
    dist.barrier()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    write_and_close(out_path, results)


if __name__ == "__main__":
    main()
