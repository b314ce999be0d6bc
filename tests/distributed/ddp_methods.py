"""Every registered method under DDP (CPU, gloo): no deadlock, ranks end identical, and resume under DDP equals
an uninterrupted run (per-rank method state comes back to its rank). SAF also runs across epochs, where the
shuffled sampler moves examples between ranks: its all-gathered logit bank must be complete and the same on every
rank.

Launch: `torchrun --nproc_per_node 2 tests/distributed/ddp_methods.py OUT.json WORKDIR`; rank 0 writes OUT.json.
"""

from __future__ import annotations

import gc
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
import torch.distributed as dist

from hf_sam import SAMTrainer
from tests.distributed.process_group import start_gloo, write_and_close
from tests.helpers import sam_args, tiny_bert, tiny_dataset
from tests.method_cases import METHOD_CASES


STATEFUL = tuple(name for name, case in METHOD_CASES.items() if case.get("ddp_resume"))


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run(method: str, workdir: str, resume: str | None = None, save_at: int | None = None) -> torch.Tensor:
    overrides = {"max_steps": 4, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2,
                 "dataloader_drop_last": True, **METHOD_CASES[method]["args"]}  # fmt: skip
    if save_at:
        overrides.update(save_strategy="steps", save_steps=save_at)
    trainer = SAMTrainer(
        model=tiny_bert(dropout=0.1), args=sam_args(workdir, **overrides), train_dataset=tiny_dataset(48)
    )
    trainer.train(resume_from_checkpoint=resume)
    final = flat(trainer.model)
    del trainer
    gc.collect()
    return final


def saf_across_epochs(workdir: str) -> dict:
    """SAF for 3 epochs of 4 steps per rank (16 examples, batch 2 x 2 ranks), the term on from epoch 1."""
    common = {"max_steps": -1, "num_train_epochs": 3, "per_device_train_batch_size": 2, "sam_method": "saf"}

    def train(path, resume=None, **extra):
        trainer = SAMTrainer(model=tiny_bert(dropout=0.1), args=sam_args(path, **common, **extra),
                             train_dataset=tiny_dataset(16))  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = train(os.path.join(workdir, "a"))
    bank = straight._sam.loss_term.bank
    banks = [None] * dist.get_world_size()
    dist.all_gather_object(banks, (bank.bank.cpu(), bank.written.cpu()))
    coverage = [h["saf/coverage"] for h in straight.state.log_history if "saf/coverage" in h]
    final = flat(straight.model)
    train(os.path.join(workdir, "b"), save_strategy="steps", save_steps=6)
    dist.barrier()
    resumed = train(os.path.join(workdir, "b"), resume=os.path.join(workdir, "b", "checkpoint-6"))
    return {
        "saf_steps": straight.state.global_step,
        "saf_bank_identical": all(torch.equal(b[0], banks[0][0]) and torch.equal(b[1], banks[0][1]) for b in banks),
        # every example holds logits of the last two epochs: rows written by the other rank too
        "saf_bank_complete": bool((bank.written.sort(dim=1).values == torch.tensor([1, 2])).all()),
        "saf_coverage": coverage,
        "saf_resume_max_diff": float((flat(resumed.model) - final).abs().max()),
    }


def main() -> None:
    out_path, workdir = sys.argv[1], sys.argv[2]
    start_gloo()
    results = {}
    for method in METHOD_CASES:
        straight = run(method, os.path.join(workdir, method, "a"))
        finals = [None] * dist.get_world_size()
        dist.all_gather_object(finals, straight)
        entry = {
            "ranks_identical": all(torch.equal(f, finals[0]) for f in finals),
            "finite": bool(torch.isfinite(straight).all()),
        }
        if method in STATEFUL:
            run(method, os.path.join(workdir, method, "b"), save_at=2)
            dist.barrier()
            resumed = run(method, os.path.join(workdir, method, "b"),
                          resume=os.path.join(workdir, method, "b", "checkpoint-2"))  # fmt: skip
            entry["resume_max_diff"] = float((resumed - straight).abs().max())
        if method == "saf":
            entry.update(saf_across_epochs(os.path.join(workdir, "saf-epochs")))
        results[method] = entry
    write_and_close(out_path, results)


if __name__ == "__main__":
    main()
