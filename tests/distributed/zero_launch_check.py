"""SAMTrainer under `accelerate launch` with the shipped DeepSpeed config (CPU, gloo, two processes).

Launch: `accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml --num_processes 2
tests/distributed/zero_launch_check.py OUT.json`. The DeepSpeed config then comes from accelerate (the arguments carry
no `deepspeed=`); the run is SAM with the synced ascent, as `sam-sync` in `zero_check.py`, whose DDP run it must
equal. A second run gives the same JSON as `deepspeed=` a file path. Rank 0 writes OUT.json; the asserts live in
`tests/test_distributed.py`.
"""

from __future__ import annotations

import os
import sys
import tempfile


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
import torch.distributed as dist

from tests.distributed.ddp_check import LR, RHO, RecordingTrainer, check_arguments, flat
from tests.distributed.process_group import write_and_close
from tests.helpers import tiny_bert, tiny_dataset


CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "accelerate_configs", "deepspeed_zero2.json")


def run(**extra) -> tuple[dict, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        args = check_arguments(tmp, optim="sgd", learning_rate=LR, weight_decay=0.0, sam_method="sam", sam_rho=RHO,
                               sam_ascent_sync=True, **extra)  # fmt: skip
        trainer = RecordingTrainer(model=tiny_bert(dropout=0.0), args=args, train_dataset=tiny_dataset(32))
        trainer.train()
    final = flat(trainer.model).float()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, final)
    plugin = trainer.accelerator.state.deepspeed_plugin
    result = {
        "args_deepspeed": args.deepspeed,
        "wrapper": type(trainer.model_wrapped).__name__,
        "zero": plugin.deepspeed_config["zero_optimization"],
        "ranks_identical": all(torch.equal(g, gathered[0]) for g in gathered),
        "steps": trainer.state.global_step,
    }
    del trainer
    return result, final


def main():
    out_path = sys.argv[1]
    results, final = run()
    # The same JSON given as `deepspeed=` a file path: the same run.
    results["from_file"], from_file = run(deepspeed=os.path.abspath(CONFIG))
    results["from_file_max_diff"] = float((from_file - final).abs().max())
    results["world_size"] = dist.get_world_size()
    results["final"] = final.tolist()
    write_and_close(out_path, results)


if __name__ == "__main__":
    main()
