"""SAMTrainer under FSDP2 through accelerate (CPU, gloo), checked against a plain-PyTorch reference.

Launch: `torchrun --nproc_per_node 2 tests/distributed/fsdp_trainer_check.py OUT.json PART` (one of `PARTS`).
Rank 0 writes OUT.json; the asserts live in `tests/test_distributed.py`.

accelerate turns FSDP on only for accelerator devices (on CPU it falls back to DDP), so after the Trainer is
built this script switches the shared `AcceleratorState` to FSDP with the plugin the Trainer's arguments describe
(`fsdp=True`, `fsdp_config={"version": 2}`). Everything after that is the real path: `accelerator.prepare` runs
accelerate's `fsdp2_prepare_model` (`fully_shard` per `BertLayer` and on the root), the Trainer builds its SGD
optimizer over the DTensor shards, and SAMTrainer's steps run on them.

FSDP2 reduce-scatters every backward, so the ascent is the all-reduced gradient (`sam_ascent_sync` is forced
on) and each configuration must end at the weights of full-batch single-process training on the union of the
batches both ranks saw:

- `none`: plain Trainer, SGD on the mean gradient;
- `sam`: eps = rho g / ||g|| from the mean gradient, the mean descent gradient at w + eps;
- `stable-sam` with `sam_ascent=unnormalized` (the paper's USAM): eps = rho g, descent rescaled to ||g|| (norms
  over the whole model, summed over both ranks' shards).

Every other method that runs under FSDP runs twice, under FSDP2 and under DDP with the synced ascent, which is
the same SAM step (DDP's methods are checked against hand-written loops elsewhere), so both runs must end at the
same weights. Sparse SAM takes a new mask every step there: a global top-k over both ranks' shards under FSDP2,
over whole tensors under DDP. ESAM's SWP (it needs a local ascent) refuses FSDP.

Resume: Sparse SAM (its masks), F-SAM (its EMA) and MESA (its teacher's EMA) run 4 steps straight, and 2 steps
+ checkpoint + resume + 2 steps, with `state_dict_type` SHARDED_STATE_DICT (the Trainer's FULL_STATE_DICT save
fails in this CPU setup, inside transformers' `save_pretrained`, before any hf_sam code).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from tests.distributed.ddp_check import (
    LR,
    RHO,
    STEPS,
    RecordingTrainer,
    check_arguments,
    flat,
    mean_ce_grad,
    mean_of,
    norm_of,
    sam_eps,
    set_grads,
    to_batch,
)
from tests.distributed.process_group import start_gloo, whole, write_and_close
from tests.helpers import tiny_bert, tiny_dataset
from tests.method_cases import METHOD_CASES


CONFIGS = {
    "none": dict(sam_method="none"),
    "sam": dict(sam_method="sam", sam_rho=RHO),
    "stable-sam": dict(sam_method="stable-sam", sam_ascent="unnormalized", sam_rho=RHO),
    "sam-ga2": dict(sam_method="sam", sam_rho=RHO, gradient_accumulation_steps=2),
}
# Every method of the test table with FSDP2 overrides (its `fsdp` entry; adasam's eps 1e-3 in its row: with v_hat
# starting at eps^2, AdaSAM turns 1e-9 rounding differences of reduce-scatter vs all-reduce into steps of size lr;
# SAF on 8 examples, so step 3 is in epoch 1 where its targets exist; MESA with a fast EMA and big steps, so the
# teacher is far from the model), then features on top of SAM.
TABLE_UNDER_FSDP = {name: case for name, case in METHOD_CASES.items() if isinstance(case["fsdp"], dict)}
SAME_AS_DDP = {
    **{name: {**case["args"], **case["fsdp"]} for name, case in TABLE_UNDER_FSDP.items()},
    "esam-sds": dict(sam_method="esam", esam_swp=False, esam_gamma=0.5),
    "lora-sam": dict(sam_method="sam", lora=True, learning_rate=1.0),
    "checkpointed-sam": dict(sam_method="sam", gradient_checkpointing=True),  # SDS only: SWP needs a local ascent
    "sam-ga2": dict(sam_method="sam", gradient_accumulation_steps=2),  # also against the reference (CONFIGS)
    "sam-micro-ga2": dict(sam_method="sam", gradient_accumulation_steps=2, sam_accumulation="micro"),
    # SSAM-F's Fisher passes on a window's first micro-batch, inside Trainer's FSDP2 deferral of the reduce-scatter.
    "ssam-f-ga2": dict(sam_method="ssam-f", sam_fisher_samples=16, gradient_accumulation_steps=2),
    # A callback ends the first epoch after a window's first micro-batch: its held-back descent gradient is dropped.
    "sam-epoch-cut": dict(
        sam_method="sam", gradient_accumulation_steps=2, max_steps=-1, num_train_epochs=2, train_size=16, stop_at=1
    ),
}
# bf16 under FSDP2 (accelerate's MixedPrecisionPolicy): rho 0 must give the plain run bit for bit (the fp32
# shards are restored exactly, the descent pass is the clean pass), and SAM must run and move elsewhere.
BF16 = {
    "bf16-none": dict(sam_method="none"),
    "bf16-sam-rho0": dict(sam_method="sam", sam_rho=0.0),
    "bf16-sam": dict(sam_method="sam", sam_rho=RHO),
}
# Resume from a sharded checkpoint, for the rows that ask for it (their state: masks, F-SAM's EMA, MESA's teacher).
RESUMED = {name: {**case["args"], **case["fsdp"]} for name, case in METHOD_CASES.items() if case.get("fsdp_resume")}
FSDP = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}}


def force_fsdp_on_cpu(trainer) -> None:
    """What accelerate would set up on GPUs for these arguments: distributed type FSDP with the Trainer's plugin."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    # `accelerator.prepare` builds an `AcceleratedOptimizer`, whose `AcceleratorState()` copies the distributed type
    # back from `PartialState`: set it there too, or Trainer runs the sharded model as MULTI_CPU (no FSDP2 no_sync).
    PartialState().distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if trainer.args.bf16:  # as accelerate does: FSDP2 gathers bf16 copies of the fp32 shards and reduces in bf16
        state.fsdp_plugin.set_mixed_precision("bf16")
    trainer.is_fsdp_enabled = True


class EpochStopAt(TrainerCallback):
    """Ends the epoch at the start of optimizer step `step`, once: Trainer leaves after the first micro-batch."""

    def __init__(self, step: int):
        self.step, self.done = step, False

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step and not self.done:
            self.done = control.should_epoch_stop = True


def full_flat(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter, whole, as one vector."""
    return torch.cat([whole(p).reshape(-1).clone() for p in model.parameters()])


def reference_run(initial, per_rank_batches, name):
    """Final flat weights of single-process training on the union of the ranks' batches (no hf_sam code)."""
    model = copy.deepcopy(initial)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ga = len(per_rank_batches[0]) // STEPS  # micro-batches per optimizer step (window accumulation)
    method = name.removesuffix("-ga2")
    for step in range(STEPS):
        batches = [to_batch(seen[step * ga + i]) for seen in per_rank_batches for i in range(ga)]
        clean = mean_of([mean_ce_grad(model, batch) for batch in batches])
        if method == "none":
            descent = clean
        elif method == "sam":
            eps = sam_eps(clean, RHO)
            descent = mean_of([mean_ce_grad(model, b, eps) for b in batches])
        elif method == "stable-sam":
            eps = {n: RHO * g for n, g in clean.items()}
            perturbed = mean_of([mean_ce_grad(model, b, eps) for b in batches])
            factor = norm_of(clean) / norm_of(perturbed)
            descent = {n: g * factor for n, g in perturbed.items()}
        else:
            raise ValueError(name)
        set_grads(model, descent)
        optimizer.step()
        model.zero_grad(set_to_none=True)
    return flat(model)


def run_config(name, overrides, out_dir, rank, world):
    overrides = dict(overrides)
    train_size = overrides.pop("train_size", 32)
    resume = overrides.pop("resume_from_checkpoint", None)
    lora = overrides.pop("lora", False)
    stop_at = overrides.pop("stop_at", None)
    model = tiny_bert(dropout=0.0)
    if lora:  # adapters on query/value; the frozen base is sharded too and must stay bit-identical
        import peft

        config = peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"])
        model = peft.get_peft_model(model, config)
    initial = copy.deepcopy(model)
    # The Trainer builds SGD itself: under FSDP2 it must be built over the shards, after the model is prepared.
    sgd = dict(optim="sgd", learning_rate=LR, weight_decay=0.0)
    if overrides.get("sam_method") == "adasam":  # brings its own optimizer (AdaSAMOptimizer): it refuses optim
        del sgd["optim"]
    args = check_arguments(os.path.join(out_dir, name), **{**sgd, **overrides})
    trainer = RecordingTrainer(model=model, args=args, train_dataset=tiny_dataset(train_size))
    if stop_at is not None:
        trainer.add_callback(EpochStopAt(stop_at))
    if overrides.get("fsdp"):
        force_fsdp_on_cpu(trainer)
    trainer.train(resume_from_checkpoint=resume)
    params = list(trainer.model.parameters())
    sharded = all(isinstance(p, DTensor) for p in params)
    before = dict(initial.named_parameters())
    frozen_unchanged = all(
        torch.equal(whole(p), before[n].detach()) for n, p in trainer.model.named_parameters() if not p.requires_grad
    )
    final = full_flat(trainer.model)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"final": final, "seen": trainer.seen})
    logs = [e for e in trainer.state.log_history if "loss" in e]
    if rank != 0:
        return None
    reference = reference_run(initial, [g["seen"] for g in gathered], name) if name in CONFIGS else None
    return {
        "wrapper": type(trainer.model_wrapped).__name__,
        "accelerate_fsdp2": trainer.accelerator.is_fsdp2,  # Trainer's own FSDP2 paths (its deferral of the reduction)
        "sharded_dtensor_params": sharded,
        "optimizer_params_are_dtensors": all(
            isinstance(p, DTensor) for group in trainer.optimizer.param_groups for p in group["params"]
        ),
        "sam_ascent_sync": trainer.args.sam_ascent_sync,
        "steps_per_rank": [len(g["seen"]) for g in gathered],
        "ranks_identical": all(torch.equal(g["final"], gathered[0]["final"]) for g in gathered),
        "ref_max_diff": float((gathered[0]["final"] - reference).abs().max()) if reference is not None else None,
        "moved_from_init": float((gathered[0]["final"] - flat(initial)).abs().max()),
        "sam_passes_logged": [e.get("sam/passes_per_step") for e in logs],
        "mask_density_logged": [e.get("sam/mask_density") for e in logs],
        "saf_coverage_logged": [e.get("saf/coverage") for e in logs],
        "saf_kl_logged": [e.get("saf/kl") for e in logs],
        "mesa_kl_logged": [e.get("mesa/kl") for e in logs],
        "param_dtypes": sorted({str(p.dtype) for p in params}),
        "frozen_count": sum(not p.requires_grad for p in params),
        "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "frozen_unchanged": frozen_unchanged,
        "finite": bool(torch.isfinite(final).all()),
        "final": gathered[0]["final"].tolist(),
    }


# The script runs one part per launch (`PARTS`), so that the two test workers can share the parts out and a part
# that hangs or fails names itself. Each part trains its own `sam` run, the baseline its comparisons need.
PARTS = ("reference", "table", "features", "resume")
FEATURES = ("esam-sds", "lora-sam", "checkpointed-sam", "sam-ga2", "sam-micro-ga2", "ssam-f-ga2", "sam-epoch-cut")


def same_as_ddp_in(part: str) -> list[str]:
    """The names of `SAME_AS_DDP` that `part` runs under FSDP2 and under DDP."""
    if part == "table":
        return list(TABLE_UNDER_FSDP)
    return list(FEATURES) if part == "features" else []


def run_part(part, tmp, rank, world):
    results = {}
    if part == "reference":
        for name, overrides in CONFIGS.items():
            results[name] = run_config(name, {**overrides, **FSDP}, tmp, rank, world)
        for name, overrides in BF16.items():
            results[name] = run_config(name, {**overrides, **FSDP, "bf16": True}, tmp, rank, world)
    elif part in ("table", "features"):
        results["sam"] = run_config("sam", {**CONFIGS["sam"], **FSDP}, tmp, rank, world)
        for name in same_as_ddp_in(part):
            overrides = SAME_AS_DDP[name]
            results[name] = run_config(name, {**overrides, **FSDP}, tmp, rank, world)
            results[f"{name}-ddp"] = run_config(name, {**overrides, "sam_ascent_sync": True}, tmp, rank, world)
    elif part == "resume":
        for name, overrides in RESUMED.items():
            # 4 steps straight, and 2 steps + checkpoint + resume + 2 steps: the same weights (masks, EMA restored).
            resumable = {**overrides, **FSDP, "max_steps": 4}
            resumable["fsdp_config"] = {**FSDP["fsdp_config"], "state_dict_type": "SHARDED_STATE_DICT"}
            results[f"{name}-straight"] = run_config(f"{name}-straight", resumable, tmp, rank, world)
            saved = {**resumable, "save_strategy": "steps", "save_steps": 2}
            run_config(f"{name}-saved", saved, tmp, rank, world)
            checkpoint = os.path.join(tmp, f"{name}-saved", "checkpoint-2")
            resumed = {**resumable, "resume_from_checkpoint": checkpoint}
            results[f"{name}-resumed"] = run_config(f"{name}-resumed", resumed, tmp, rank, world)
            if rank == 0:  # what the state file says it was written for (another process count is refused)
                with safe_open(os.path.join(checkpoint, "sam_state-rank0.safetensors"), framework="pt") as handle:
                    results[f"{name}_saved_settings"] = json.loads(handle.metadata()["settings"])
    else:
        raise ValueError(f"unknown part {part!r}: one of {PARTS}")
    return results


def compare(part, results):
    """Rank 0: the differences between final weights that the tests read."""
    finals = {
        name: torch.tensor(run.pop("final"))
        for name, run in results.items()
        if isinstance(run, dict) and "final" in run
    }
    if part == "reference":
        results["bf16_rho0_vs_none_max_diff"] = float((finals["bf16-sam-rho0"] - finals["bf16-none"]).abs().max())
        results["bf16_sam_vs_none_max_diff"] = float((finals["bf16-sam"] - finals["bf16-none"]).abs().max())
        results["bf16_sam_vs_fp32_sam_max_diff"] = float((finals["bf16-sam"] - finals["sam"]).abs().max())
        results["max_diff_sam_vs_none"] = float((finals["sam"] - finals["none"]).abs().max())
    for name in RESUMED if part == "resume" else ():
        results[f"{name}_resume_max_diff"] = float(
            (finals[f"{name}-straight"] - finals[f"{name}-resumed"]).abs().max()
        )
    for name in same_as_ddp_in(part):
        results[f"{name}_fsdp_vs_ddp_max_diff"] = float((finals[name] - finals[f"{name}-ddp"]).abs().max())
        if finals[name].shape == finals["sam"].shape:  # (LoRA adds parameters)
            results[f"{name}_vs_sam_max_diff"] = float((finals[name] - finals["sam"]).abs().max())


def main():
    out_path, part = sys.argv[1], sys.argv[2]
    rank, world = start_gloo()
    # One folder for every rank (checkpoints are written by several ranks and read by all of them).
    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    with contextlib.ExitStack() as cleanup:
        if rank == 0:
            cleanup.callback(shutil.rmtree, folder[0], ignore_errors=True)
        results = run_part(part, folder[0], rank, world)
    if rank == 0:
        compare(part, results)
        results["world_size"] = world
    write_and_close(out_path, results if rank == 0 else None)


if __name__ == "__main__":
    main()
