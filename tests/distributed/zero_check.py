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

`default` is the set the default test suite runs (one launch, about 60 s on 2 CPU cores); `full` runs every
method of the test table under both stages (marked `slow`).
"""

from __future__ import annotations

import contextlib
import math
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
from tests.test_faults import Snapshots


def zero(stage: int, fp16_scale_power: int | None = None) -> dict:
    """A ZeRO config that runs on CPU: Trainer fills the "auto" fields and builds its own torch optimizer. With
    `fp16_scale_power`, DeepSpeed's fp16 (dynamic loss scale starting at 2 ** power) follows `fp16=True`."""
    fp16 = (
        {"enabled": False}
        if fp16_scale_power is None
        else {"enabled": "auto", "initial_scale_power": fp16_scale_power}
    )
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": fp16,
    }


def fp16_supported() -> bool:
    """Whether DeepSpeed's accelerator (its CPU one here) accepts fp16; its `is_fp16_supported` may return None."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def method_overrides(name: str) -> dict:
    """A table row's arguments with its short-run overrides (the ones its FSDP2 check uses)."""
    case = METHOD_CASES[name]
    extra = case["fsdp"] if isinstance(case["fsdp"], dict) else {}
    overrides = {**case["args"], **extra}
    if not overrides.get("esam_swp", name == "esam"):
        overrides.setdefault("sam_ascent_sync", True)  # ESAM's SWP needs each rank's own ascent
    return overrides


# Every method of the table but none and sam (run below), with the stage it runs under in the default suite; `full`
# runs each under both stages. The default suite runs one method per code path that differs under DeepSpeed: plain
# windows between SAM steps, descent transforms on SAM and plain steps, the Fisher passes, ESAM's selection,
# mSAM's shards, the method's own optimizer, the loss terms (ASAM, GSAM, F-SAM, SSAM-D and late-sam take a path
# already there, and run in `full`).
DEFAULT_FAMILIES = ("ss-sam", "stable-sam", "looksam", "ssam-f", "esam", "msam", "adasam", "saf", "mesa")
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
# Gradient clipping is DeepSpeed's (gradient_clipping from max_grad_norm), on the reduced descent gradient.
CLIPPED = {"sam-clip": dict(sam_method="sam", sam_rho=RHO, sam_ascent_sync=True, max_grad_norm=0.05)}
# DeepSpeed's fp16: a loss scale of 2 ** 18 overflows the first steps, which DeepSpeed skips while halving it (rho 0
# must skip exactly as the plain run does); at 2 ** 8 nothing overflows, and Stable SAM's unnormalized ascent
# (eps = rho g) shows whether the scale the held gradient carries was divided out.
FP16 = {
    "fp16-none": dict(sam_method="none", fp16_scale_power=18, max_steps=6),
    "fp16-sam-rho0": dict(sam_method="sam", sam_rho=0.0, fp16_scale_power=18, max_steps=6),
    "fp16-stable-sam": dict(
        sam_method="stable-sam", sam_ascent="unnormalized", sam_ascent_sync=True, fp16_scale_power=8
    ),
}
SHIPPED_CONFIG = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "examples", "accelerate_configs", "deepspeed_zero2.json")
)
RESUMED = ("fsam", "mesa")  # an ascent rule's average, a loss term's teacher
RESUMED_FULL = ("ssam-d", "looksam", "saf")
# The weight average (decay 0.6: the warm-up and the plain decay both occur in 4 steps), built from the weights
# DeepSpeed copies from its master partitions into the module after every step.
WEIGHT_EMA = dict(sam_method="sam", sam_rho=RHO, sam_ascent_sync=True, weight_ema_decay=0.6, max_steps=4)


class EngineProbe(TrainerCallback):
    """Records, on the DeepSpeed engine, what the final weights cannot show (see the module docstring)."""

    def __init__(self):
        self.trainer = None
        self.start: list[torch.Tensor] | None = None
        self.first_step = 0
        self.step_diffs: list[float] = []  # max |w - w_start| right before each engine.step()
        # (max |w - w_start|, max |.grad|, optimizer step) at each backward
        self.backwards: list[tuple[float, float, int]] = []

    def _distance(self) -> float:
        params = list(self.trainer.model.parameters())
        return max(float((p.detach() - s).abs().max()) for p, s in zip(params, self.start))

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step  # after resuming, the checkpoint's step
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


class NaNLossAtStep(RecordingTrainer):
    """The loss of every training pass of optimizer step `nan_step` is NaN: DeepSpeed's overflow check skips that step,
    as it skips an fp16 overflow, and reports it as its optimizer's `overflow` (accelerate's
    `optimizer_step_was_skipped`)."""

    nan_step: int | None = None

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * math.nan if self.state.global_step == self.nan_step and torch.is_grad_enabled() else loss


class Iterates(TrainerCallback):
    """The trained weights after every optimizer step, for the weight average by hand."""

    def __init__(self):
        self.trainer = None
        self.weights: list[torch.Tensor] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.weights.append(flat(self.trainer.model).float())


def iterates_average(start: torch.Tensor, weights: list[torch.Tensor], decay: float) -> tuple[torch.Tensor, list[int]]:
    """The weight average by hand, over the iterates that changed the weights (from `start`): it starts at the first
    of them, then w_avg <- d_t w_avg + (1 - d_t) w with d_t = min(decay, (1 + t) / (10 + t)). Also returns the steps
    that changed no weight."""
    unchanged = [t for t, w in enumerate(weights) if torch.equal(w, ([start] + weights)[t])]
    average = None
    for t, w in enumerate(w for step, w in enumerate(weights) if step not in unchanged):
        d = min(decay, (1 + t) / (10 + t))
        average = w.clone() if average is None else d * average + (1 - d) * w
    return average, unchanged


def run(name, overrides, out_dir, rank, world, stage=None, resume=None, **extra):
    """Train the tiny BERT (SGD, 3 steps of 2 examples per rank) under ZeRO `stage` (or the DeepSpeed JSON file it
    names), or under DDP when None."""
    overrides = {**overrides, **extra}
    train_size = overrides.pop("train_size", 32)
    nan_step = overrides.pop("nan_step", None)
    sgd = dict(optim="sgd", learning_rate=LR, weight_decay=0.0)
    if overrides.get("sam_method") == "adasam":  # brings its own optimizer
        del sgd["optim"]
    if overrides.get("gradient_accumulation_steps", 1) > 1:
        overrides.setdefault("per_device_train_batch_size", 1)
    fp16_scale_power = overrides.pop("fp16_scale_power", None)
    if isinstance(stage, str):  # a DeepSpeed JSON file
        overrides["deepspeed"] = stage
    elif stage is not None:
        overrides["deepspeed"] = zero(stage, fp16_scale_power)
    if fp16_scale_power is not None:
        overrides["fp16"] = True
    # An Accelerator built with a DeepSpeed plugin leaves ACCELERATE_USE_DEEPSPEED=true in the environment, which
    # would turn the next run's TrainingArguments into DeepSpeed (with a default plugin) even without `deepspeed=`.
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    model = tiny_bert(dropout=0.0)
    args = check_arguments(os.path.join(out_dir, name), **{**sgd, **overrides})
    probe = EngineProbe() if stage is not None else None
    iterates = Iterates() if args.weight_ema_decay > 0 else None
    callbacks = [c for c in (probe, iterates) if c is not None]
    eval_dataset = tiny_dataset(8, seed=1) if args.eval_strategy != "no" else None
    trainer = NaNLossAtStep(model=model, args=args, train_dataset=tiny_dataset(train_size), eval_dataset=eval_dataset,
                            callbacks=callbacks or None)  # fmt: skip
    trainer.nan_step = nan_step
    for callback in callbacks:
        callback.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    final = flat(trainer.model).float()
    gathered = [None] * world
    dist.all_gather_object(gathered, final)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    result = {
        "skipped_steps": getattr(trainer.model_wrapped, "skipped_steps", None),  # DeepSpeed's overflow skips
        "sam_skipped_logged": [e.get("sam/skipped") for e in logs],
        "wrapper": type(trainer.model_wrapped).__name__,
        "stage": stage,
        "sam_ascent_sync": trainer.args.sam_ascent_sync,
        "ranks_identical": all(torch.equal(g, gathered[0]) for g in gathered),
        "finite": bool(torch.isfinite(final).all()),
        "moved_from_init": float((final - flat(tiny_bert(dropout=0.0)).float()).abs().max()),
        "steps": trainer.state.global_step,
        "sam_passes_logged": [e.get("sam/passes_per_step") for e in logs],
        "step_diffs": probe.step_diffs if probe else None,
        "first_step": probe.first_step if probe else None,
        "backwards": probe.backwards if probe else None,
        "param_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()}),
        "eval_losses": [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e],
    }
    if iterates is not None and resume is None:
        average, unchanged = iterates_average(flat(tiny_bert(dropout=0.0)).float(), iterates.weights,
                                              args.weight_ema_decay)  # fmt: skip
        result["ema_vs_iterates"] = float((final - average).abs().max())
        result["ema_vs_last_iterate"] = float((final - iterates.weights[-1]).abs().max())
        result["unchanged_steps"] = unchanged
    del trainer
    return result, final


def faults(out_dir, rank, world) -> dict:
    """The faults of tests/test_faults.py under ZeRO: a NaN loss at w + eps (the update is dropped: DeepSpeed's
    overflow skip), a NaN clean loss (the ascent is skipped), and an interrupt between the passes (w restored, the
    engine's hold and accelerate's wrapper put back)."""
    from tests.test_faults import FaultInjector

    results = {}
    for name, stage, phase, value in (
        ("nan-perturbed", 2, "perturbed", math.nan),
        ("nan-clean", 1, "clean", math.nan),
        ("interrupt", 2, "perturbed", KeyboardInterrupt()),
    ):
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        snapshots = Snapshots()
        args = check_arguments(os.path.join(out_dir, f"fault-{name}"), optim="sgd", learning_rate=LR, weight_decay=0.0,
                               sam_method="sam", sam_ascent_sync=True, max_steps=4, deepspeed=zero(stage))  # fmt: skip
        trainer = FaultInjector(model=tiny_bert(dropout=0.0), args=args, train_dataset=tiny_dataset(32),
                                callbacks=[snapshots], phase=phase, value=value)  # fmt: skip
        try:
            trainer.train()
        except KeyboardInterrupt:
            pass
        engine, hit = trainer.model_wrapped, trainer.hit_step
        now = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        at_hit = snapshots.end.get(hit, now)
        logs = [e for e in trainer.state.log_history if "loss" in e]
        results[name] = {
            "hit_step": hit,
            "steps": trainer.state.global_step,
            "hit_step_update_max": max(float((at_hit[n] - snapshots.begin[hit][n]).abs().max()) for n in now),
            "moved_after_hit": max(float((now[n] - at_hit[n]).abs().max()) for n in now),
            "finite": all(bool(torch.isfinite(p).all()) for p in now.values()),
            "skipped_steps": engine.skipped_steps,
            "sam_skipped": sum(e.get("sam/skipped", 0.0) for e in logs),
            "sam_skipped_updates": sum(e.get("sam/skipped_updates", 0.0) for e in logs),
            "grads_left": sum(p.grad is not None for p in trainer.model.parameters()),
            "engine_holding": bool(engine.inside_no_sync_ctxt),
            "accelerate_wrapper": type(trainer.accelerator.deepspeed_engine_wrapped).__name__,
        }
        del trainer
    return results


def refused_resumes(out_dir, rank, world) -> dict:
    """Resuming an AdaSAM checkpoint (its optimizer state is AdaSAMOptimizer's) with another method under ZeRO-2: the
    engine reads that state into the optimizer it has just built, before Trainer's `_load_optimizer_and_scheduler`,
    where hf_sam checks it under DDP (torch's optimizers fail on it with a bare KeyError). Records each refusal."""
    saved = {**method_overrides("adasam"), "max_steps": 2}
    run("adasam-saved", saved, out_dir, rank, world, stage=2, save_strategy="steps", save_steps=2)
    checkpoint = os.path.join(out_dir, "adasam-saved", "checkpoint-2")
    results = {}
    for other in ("sam", "none"):
        try:
            # AdamW (Trainer's default): torch's SGD takes AdaSAM's state without a word, AdamW's fails on it.
            run(f"adasam-as-{other}", {"sam_method": other, "max_steps": 4, "optim": "adamw_torch"}, out_dir, rank,
                world, stage=2, resume=checkpoint)  # fmt: skip
            results[other] = "resumed"
        except Exception as error:  # the refusal (or the crash) is what is checked
            results[other] = f"{type(error).__name__}: {error}"
    return results


class StopInWindow(TrainerCallback):
    """Stops training at the start of optimizer step `at`: Trainer leaves its loop after that window's first
    micro-batch, a window cut short."""

    def __init__(self, at: int = 1):
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            control.should_training_stop = True


def stopped_windows(out_dir, rank, world) -> dict:
    """A window of 2 micro-batches cut short after its first one (a callback stops training), where the weights are
    back at w by then: SAM's micro mode, and a plain window of a schedule (late-sam's first steps). The engine must
    let go of the held reduction and hand accelerate's wrapper back, as after an interrupt."""
    results = {}
    for name, overrides in (
        ("micro", dict(sam_method="sam", sam_rho=RHO, sam_accumulation="micro")),
        ("plain", dict(sam_method="late-sam")),
    ):
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        snapshots = Snapshots()
        args = check_arguments(os.path.join(out_dir, f"stop-{name}"), optim="sgd", learning_rate=LR, weight_decay=0.0,
                               gradient_accumulation_steps=2, per_device_train_batch_size=1, deepspeed=zero(2),
                               **overrides)  # fmt: skip
        trainer = RecordingTrainer(model=tiny_bert(dropout=0.0), args=args, train_dataset=tiny_dataset(32),
                                   callbacks=[snapshots, StopInWindow(1)])  # fmt: skip
        trainer.train()
        engine = trainer.model_wrapped
        now = {n: p.detach() for n, p in trainer.model.named_parameters()}
        results[name] = {
            "steps": trainer.state.global_step,
            "micro_batches": len(trainer.seen),
            "moved_in_cut_window": max(float((now[n] - snapshots.begin[1][n]).abs().max()) for n in now),
            "grads_left": sum(p.grad is not None for p in trainer.model.parameters()),
            "engine_holding": bool(engine.inside_no_sync_ctxt),
            "accelerate_wrapper": type(trainer.accelerator.deepspeed_engine_wrapped).__name__,
        }
        del trainer
    return results


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
            for stage in (1, 2) if full or name != "sam-micro-ga2" else (2,):
                record(f"{name}-z{stage}", overrides, tmp, rank, world, stage=stage)
            if name in SAM or name == "sam-micro-ga2":
                record(f"{name}-ddp", overrides, tmp, rank, world)
        families = {name: (1, 2) if full else (stage,) for name, stage in FAMILIES.items()}
        if not full:
            families = {name: stages for name, stages in families.items() if name in DEFAULT_FAMILIES}
        for name, stages in families.items():
            overrides = method_overrides(name)
            for stage in stages:
                record(f"{name}-z{stage}", overrides, tmp, rank, world, stage=stage)
            record(f"{name}-ddp", overrides, tmp, rank, world)
        # The shipped config (ZeRO-2 with overlap_comm and contiguous_gradients), as `deepspeed=` its file path.
        record("sam-sync-shipped-json", SAM["sam-sync"], tmp, rank, world, stage=SHIPPED_CONFIG)
        for name, overrides in CLIPPED.items():
            record(f"{name}-z2", overrides, tmp, rank, world, stage=2)
            record(f"{name}-ddp", overrides, tmp, rank, world)
        # DeepSpeed's CPU accelerator has fp16 only where oneDNN does (CPUs with AVX512-FP16 or AMX-FP16); elsewhere
        # its engine refuses fp16 at start-up, so these runs are left out and their test skips.
        results["fp16_supported"] = fp16_supported()
        if results["fp16_supported"]:
            for name, overrides in FP16.items():
                record(f"{name}-z2", overrides, tmp, rank, world, stage=2)
            record("fp16-stable-sam-fp32-z2", {**FP16["fp16-stable-sam"], "fp16_scale_power": None}, tmp, rank,
                   world, stage=2)  # fmt: skip
        results["faults"] = faults(tmp, rank, world)
        results["refused_resumes"] = refused_resumes(tmp, rank, world)
        results["stopped"] = stopped_windows(tmp, rank, world)
        for name in ("none", "sam-sync", "sam-rho0"):
            for stage in (1, 2) if full or name == "sam-sync" else (2,):
                record(f"bf16-{name}-z{stage}", {**SAM.get(name, PLAIN.get(name, {}))}, tmp, rank, world,
                       stage=stage, bf16=True)  # fmt: skip
        for name in RESUMED + (RESUMED_FULL if full else ()):
            stage = FAMILIES[name]
            resumable = {**method_overrides(name), "max_steps": 4}
            record(f"{name}-straight", resumable, tmp, rank, world, stage=stage)
            run(f"{name}-saved", resumable, tmp, rank, world, stage=stage, save_strategy="steps", save_steps=2)
            checkpoint = os.path.join(tmp, f"{name}-saved", "checkpoint-2")
            record(f"{name}-resumed", resumable, tmp, rank, world, stage=stage, resume=checkpoint)
        # The weight average: evaluated after every step and left in the model (ZeRO-1 against DDP), a step that
        # DeepSpeed's overflow check skips (the first: fp16's initial loss scale often overflows), and the resume.
        record("weight-ema-z1", WEIGHT_EMA, tmp, rank, world, stage=1, eval_strategy="steps", eval_steps=1)
        record("weight-ema-ddp", WEIGHT_EMA, tmp, rank, world, eval_strategy="steps", eval_steps=1)
        record("none-weight-ema-skip-z2", dict(sam_method="none", weight_ema_decay=0.6, max_steps=4, nan_step=0), tmp,
               rank, world, stage=2)  # fmt: skip
        record("weight-ema-straight", WEIGHT_EMA, tmp, rank, world, stage=2)
        run("weight-ema-saved", WEIGHT_EMA, tmp, rank, world, stage=2, save_strategy="steps", save_steps=2)
        checkpoint = os.path.join(tmp, "weight-ema-saved", "checkpoint-2")
        record("weight-ema-resumed", WEIGHT_EMA, tmp, rank, world, stage=2, resume=checkpoint)
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
