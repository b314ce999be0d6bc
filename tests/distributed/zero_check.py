"""SAMTrainer under DeepSpeed ZeRO-1 and ZeRO-2 (CPU, gloo), compared with the same runs under DDP.

Launch: `torchrun --nproc_per_node 2 tests/distributed/zero_check.py OUT.json [default|full]`. Rank 0 writes
OUT.json; the asserts live in `tests/test_distributed.py`.

Under ZeRO-1/2 every rank holds the whole weights, so a SAM step there is the SAM step of DDP with the same
`sam_ascent_sync`: each run is made twice, with `deepspeed=` a ZeRO config and under DDP, and both must end at the
same weights (DDP's runs are checked against hand-written loops elsewhere). Besides the final weights, an
`EngineProbe` watches the engine itself, because under ZeRO a missing restore is invisible in the final weights
(`engine.step()` copies its fp32 master partitions back into the module): right before every `engine.step()` the
module's weights must equal those at the start of the step, and at the start of every backward the probe records
how far the weights are from that start (0 for a clean pass, > 0 at w + eps) and the largest `.grad` entry (0 at
a step's first pass at w + eps: no gradient of a first pass reaches the second).

`default` is the set the default test suite runs (one launch, about 50 s on 2 CPU cores); `full` adds every
method of the test table under both stages (marked `slow`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from tests.distributed.ddp_check import LR, RHO, RecordingTrainer, check_arguments, flat
from tests.distributed.process_group import start_gloo, write_and_close
from tests.helpers import tiny_bert, tiny_dataset
from tests.method_cases import METHOD_CASES


def zero(stage: int) -> dict:
    """A ZeRO config that runs on CPU: Trainer fills the "auto" fields and builds its own torch optimizer."""
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": False},
    }


def method_overrides(name: str) -> dict:
    """A table row's arguments with its short-run overrides (the ones its FSDP2 check uses)."""
    case = METHOD_CASES[name]
    extra = case["fsdp"] if isinstance(case["fsdp"], dict) else {}
    overrides = {**case["args"], **extra}
    if not overrides.get("esam_swp", name == "esam"):
        overrides.setdefault("sam_ascent_sync", True)  # ESAM's SWP needs each rank's own ascent
    return overrides


# One method per family in the default suite (the stage alternates, both stages run for SAM itself), every method of
# the table under both stages in `full`.
FAMILIES = {
    "asam": 1, "ss-sam": 2, "late-sam": 1, "stable-sam": 1, "adasam": 2, "msam": 1, "looksam": 2, "gsam": 1,
    "fsam": 2, "ssam-f": 2, "ssam-d": 1, "esam": 1, "saf": 2, "mesa": 1,
}  # fmt: skip
SAM = {
    "sam-local": dict(sam_method="sam", sam_rho=RHO, sam_ascent_sync=False),
    "sam-sync": dict(sam_method="sam", sam_rho=RHO, sam_ascent_sync=True),
}
# Against SAM's synced run above: the same 3 steps of 4 examples per rank as 2 micro-batches of 2 (window mode is
# the SAM step of the whole window; micro mode perturbs per micro-batch, so it is compared with DDP instead).
GA2 = {
    "sam-ga2": dict(sam_method="sam", sam_rho=RHO, sam_ascent_sync=True, gradient_accumulation_steps=2),
    "sam-micro-ga2": dict(
        sam_method="sam", sam_rho=RHO, sam_ascent_sync=True, gradient_accumulation_steps=2, sam_accumulation="micro"
    ),
}
PLAIN = {"none": dict(sam_method="none"), "sam-rho0": dict(sam_method="sam", sam_rho=0.0)}
RESUMED = ("fsam", "mesa")  # an ascent rule's average, a loss term's teacher
RESUMED_FULL = ("ssam-d", "looksam", "saf")


class EngineProbe(TrainerCallback):
    """Records, on the DeepSpeed engine, what the final weights cannot show (see the module docstring)."""

    def __init__(self):
        self.trainer = None
        self.start: list[torch.Tensor] | None = None
        self.step_diffs: list[float] = []  # max |w - w_start| right before each engine.step()
        # (max |w - w_start|, max |.grad|, optimizer step) at each backward
        self.backwards: list[tuple[float, float, int]] = []

    def _distance(self) -> float:
        params = list(self.trainer.model.parameters())
        return max(float((p.detach() - s).abs().max()) for p, s in zip(params, self.start))

    def on_train_begin(self, args, state, control, **kwargs):
        engine = self.trainer.model_wrapped
        step, backward = engine.step, engine.backward

        def probed_step(*a, **k):
            self.step_diffs.append(self._distance())
            return step(*a, **k)

        def probed_backward(loss, *a, **k):
            grads = [p.grad.abs().max() for p in self.trainer.model.parameters() if p.grad is not None]
            self.backwards.append((self._distance(), float(max(grads)) if grads else 0.0, len(self.step_diffs)))
            return backward(loss, *a, **k)

        engine.step, engine.backward = probed_step, probed_backward

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = [p.detach().clone() for p in self.trainer.model.parameters()]


def run(name, overrides, out_dir, rank, world, stage=None, resume=None, **extra):
    """Train the tiny BERT (SGD, 3 steps of 2 examples per rank) under ZeRO `stage`, or DDP when None."""
    overrides = {**overrides, **extra}
    train_size = overrides.pop("train_size", 32)
    sgd = dict(optim="sgd", learning_rate=LR, weight_decay=0.0)
    if overrides.get("sam_method") == "adasam":  # brings its own optimizer
        del sgd["optim"]
    if overrides.get("gradient_accumulation_steps", 1) > 1:
        overrides.setdefault("per_device_train_batch_size", 1)
    if stage is not None:
        overrides["deepspeed"] = zero(stage)
    # An Accelerator built with a DeepSpeed plugin leaves ACCELERATE_USE_DEEPSPEED=true in the environment, which
    # would turn the next run's TrainingArguments into DeepSpeed (with a default plugin) even without `deepspeed=`.
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    model = tiny_bert(dropout=0.0)
    args = check_arguments(os.path.join(out_dir, name), **{**sgd, **overrides})
    probe = EngineProbe() if stage is not None else None
    trainer = RecordingTrainer(
        model=model, args=args, train_dataset=tiny_dataset(train_size), callbacks=[probe] if probe else None
    )
    if probe is not None:
        probe.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    final = flat(trainer.model).float()
    gathered = [None] * world
    dist.all_gather_object(gathered, final)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    result = {
        "wrapper": type(trainer.model_wrapped).__name__,
        "stage": stage,
        "sam_ascent_sync": trainer.args.sam_ascent_sync,
        "ranks_identical": all(torch.equal(g, gathered[0]) for g in gathered),
        "finite": bool(torch.isfinite(final).all()),
        "moved_from_init": float((final - flat(tiny_bert(dropout=0.0)).float()).abs().max()),
        "steps": trainer.state.global_step,
        "sam_passes_logged": [e.get("sam/passes_per_step") for e in logs],
        "step_diffs": probe.step_diffs if probe else None,
        "backwards": probe.backwards if probe else None,
        "param_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()}),
    }
    del trainer
    return result, final


def main():
    out_path = sys.argv[1]
    full = len(sys.argv) > 2 and sys.argv[2] == "full"
    rank, world = start_gloo()
    results, finals = {}, {}
    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)

    def record(key, *args, **kwargs):
        results[key], finals[key] = run(key, *args, **kwargs)

    with contextlib.ExitStack() as cleanup:
        tmp = folder[0]
        if rank == 0:
            cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        for name, overrides in {**SAM, **GA2, **PLAIN}.items():
            for stage in (1, 2):
                record(f"{name}-z{stage}", overrides, tmp, rank, world, stage=stage)
            if name in SAM or name == "sam-micro-ga2":
                record(f"{name}-ddp", overrides, tmp, rank, world)
        families = {name: (1, 2) if full else (stage,) for name, stage in FAMILIES.items()}
        for name, stages in families.items():
            overrides = method_overrides(name)
            for stage in stages:
                record(f"{name}-z{stage}", overrides, tmp, rank, world, stage=stage)
            record(f"{name}-ddp", overrides, tmp, rank, world)
        for name in ("none", "sam-sync", "sam-rho0"):
            for stage in (1, 2):
                record(f"bf16-{name}-z{stage}", {**SAM.get(name, PLAIN.get(name, {}))}, tmp, rank, world,
                       stage=stage, bf16=True)  # fmt: skip
        for name in RESUMED + (RESUMED_FULL if full else ()):
            stage = FAMILIES[name]
            resumable = {**method_overrides(name), "max_steps": 4}
            record(f"{name}-straight", resumable, tmp, rank, world, stage=stage)
            run(f"{name}-saved", resumable, tmp, rank, world, stage=stage, save_strategy="steps", save_steps=2)
            checkpoint = os.path.join(tmp, f"{name}-saved", "checkpoint-2")
            record(f"{name}-resumed", resumable, tmp, rank, world, stage=stage, resume=checkpoint)
    if rank == 0:
        results["world_size"] = world
        results["sam-sync-ddp-final"] = finals["sam-sync-ddp"].tolist()  # for the `accelerate launch` check
        results["finals_max_diff"] = {
            f"{a}|{b}": float((finals[a] - finals[b]).abs().max())
            for a in finals
            for b in finals
            if a < b and finals[a].shape == finals[b].shape
        }
    write_and_close(out_path, results)


if __name__ == "__main__":
    main()
