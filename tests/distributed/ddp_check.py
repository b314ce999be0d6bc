"""SAM under DDP (CPU, gloo), checked against a plain-PyTorch reference built from the batches each rank saw.

Launch: `torchrun --nproc_per_node 2 tests/distributed/ddp_check.py OUT.json`. Rank 0 writes OUT.json; the asserts
live in `tests/test_distributed.py`, so a wrong result is reported with numbers instead of a bare crash.

Three configurations run in the one process group:

- `none`: plain Trainer; the reference is SGD on the mean over ranks of the per-rank gradients.
- `sam_local` (`sam_ascent_sync=False`): every rank perturbs with its own gradient g_r (eps_r = rho g_r / ||g_r||)
  and computes its descent gradient h_r at w + eps_r; DDP averages the h_r.
- `sam_sync` (`sam_ascent_sync=True`): eps from the all-reduced gradient mean_r g_r, one shared w + eps, and the
  mean of the h_r there (single-process full-batch SAM).

Loss scale: Trainer multiplies the loss by the world size when `average_tokens_across_devices` is on and the model
takes `**kwargs` (`model_accepts_loss_kwargs`), expecting the model to divide its summed loss by the global
`num_items_in_batch`. `BertForSequenceClassification` takes `**kwargs` but returns a plain mean, so bare it would
train on world_size x the mean gradient; `tests.helpers.tiny_bert` declares `accepts_loss_kwargs = False`, which
gives the plain mean (factor 1). The script derives the factor from the trainer and a probe of the model (see
`effective_loss_scale`) and compares the first step's synced gradient with the reference as a direct check of it.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from transformers import TrainerCallback

from hf_sam import SAMTrainingArguments
from tests.distributed.process_group import start_gloo, write_and_close
from tests.helpers import SequentialSAMTrainer, tiny_bert, tiny_dataset


LR = 0.1
RHO = 0.05
STEPS = 3
BATCH = 2

CONFIGS = {
    "none": dict(sam_method="none"),
    "sam_local": dict(sam_method="sam", sam_rho=RHO),
    "sam_sync": dict(sam_method="sam", sam_rho=RHO, sam_ascent_sync=True),
}


class RecordingTrainer(SequentialSAMTrainer):
    """Keeps a copy of every micro-batch this rank trained on, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append((inputs["input_ids"].detach().clone().cpu(), inputs["labels"].detach().clone().cpu()))
        return super().training_step(model, inputs, num_items_in_batch)


class CommProbe(TrainerCallback):
    """Counts DDP bucket all-reduces through a comm hook and keeps the synced gradient of the first step."""

    def __init__(self):
        self.trainer = None
        self.allreduces = 0
        self.first_step_grad: torch.Tensor | None = None

    def _hook(self, state, bucket):
        self.allreduces += 1
        return allreduce_hook(None, bucket)

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model_wrapped
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise RuntimeError(f"expected the Trainer to wrap the model in DDP, got {type(model).__name__}")
        model.register_comm_hook(state=None, hook=self._hook)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == 0:
            params = [p for p in self.trainer.model.parameters() if p.requires_grad]
            self.first_step_grad = torch.cat([p.grad.detach().reshape(-1).clone() for p in params])


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def model_uses_num_items(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether the model's loss changes when `num_items_in_batch` is passed (i.e. it sums and divides by it)."""
    ids, labels = batch
    with torch.no_grad():
        plain = model(input_ids=ids, labels=labels).loss
        counted = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(1000 * len(labels))).loss
    return not torch.allclose(plain, counted)


def effective_loss_scale(trainer, uses_num_items: bool, world: int, local_items: int, global_items: int) -> float:
    """Factor f with: rank's backward loss = f * (mean CE over the rank's batch), mirroring Trainer.compute_loss.

    DDP then averages the ranks' gradients, so the synced gradient is f * mean_r g_r.
    """
    counted = trainer.model_accepts_loss_kwargs and trainer.compute_loss_func is None
    if not counted:
        return 1.0  # plain mean loss, no num_items_in_batch anywhere
    base = local_items / global_items if uses_num_items else 1.0  # sum/N_global, or the model's own mean
    return base * (world if trainer.args.average_tokens_across_devices else 1.0)


# ---------------------------------------------------------------------- reference (rank 0, no hf_sam code)
# Self-contained on purpose: SAM's math written out here, so the check does not move with other test helpers.


def to_batch(pair):
    ids, labels = pair
    return {"input_ids": ids, "labels": labels}


def mean_ce_grad(model, batch, eps=None):
    """Gradient of the mean cross-entropy over `batch`, at w (or at w + eps; w is put back exactly)."""
    params = dict(model.named_parameters())
    saved = {}
    if eps is not None:
        with torch.no_grad():
            for n, e in eps.items():
                saved[n] = params[n].detach().clone()
                params[n].add_(e)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"]).logits
    F.cross_entropy(logits, batch["labels"]).backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for n, w in saved.items():
            params[n].copy_(w)
    return grads


def sam_eps(grads, rho):
    """eps = rho g / (||g|| + 1e-12), ||.|| the L2 norm over every trainable parameter together."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).float()
    return {n: rho * g / (norm + 1e-12) for n, g in grads.items()}


def set_grads(model, grads):
    for n, p in model.named_parameters():
        p.grad = grads[n].clone() if n in grads else None


def mean_of(dicts):
    return {n: sum(d[n] for d in dicts) / len(dicts) for n in dicts[0]}


def norm_of(grads):
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


def reference_run(initial, per_rank_batches, mode, scale):
    """Final flat weights, first-step synced gradient and per-step logged grad norm expected from the Trainer."""
    model = copy.deepcopy(initial)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ranks = len(per_rank_batches)
    first_grad, grad_norms = None, []
    for step in range(STEPS):
        batches = [to_batch(per_rank_batches[r][step]) for r in range(ranks)]
        clean = [mean_ce_grad(model, batch) for batch in batches]
        if mode == "none":
            descent = mean_of(clean)
        elif mode == "sam_local":
            # Each rank perturbs with its own gradient; DDP averages the descent gradients.
            descent = mean_of([mean_ce_grad(model, b, sam_eps(g, RHO)) for b, g in zip(batches, clean)])
            grad_norms.append(sum(scale * norm_of(g) for g in clean) / ranks)
        elif mode == "sam_sync":
            # One eps from the averaged gradient, every rank's descent gradient at that one w + eps.
            mean_clean = mean_of(clean)
            eps = sam_eps(mean_clean, RHO)
            descent = mean_of([mean_ce_grad(model, b, eps) for b in batches])
            grad_norms.append(scale * norm_of(mean_clean))
        else:
            raise ValueError(mode)
        descent = {n: scale * g for n, g in descent.items()}
        if step == 0:
            first_grad = torch.cat([descent[n].reshape(-1) for n, _ in model.named_parameters()])
        set_grads(model, descent)
        optimizer.step()
        model.zero_grad(set_to_none=True)
    return flat(model), first_grad, grad_norms


# ---------------------------------------------------------------------- one configuration


def check_arguments(output_dir: str, **overrides) -> SAMTrainingArguments:
    """The check scripts' Trainer settings: CPU, no clipping, constant lr, STEPS steps of BATCH, a log every step."""
    settings = dict(
        output_dir=output_dir,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        disable_tqdm=True,
        seed=0,
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        dataloader_num_workers=0,
        logging_steps=1,
    )
    return SAMTrainingArguments(**{**settings, **overrides})


def run_config(name, overrides, out_dir, rank, world):
    model = tiny_bert(dropout=0.0)
    initial = copy.deepcopy(model)
    args = check_arguments(os.path.join(out_dir, name), **overrides)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    probe = CommProbe()
    trainer = RecordingTrainer(
        model=model,
        args=args,
        train_dataset=tiny_dataset(),
        optimizers=(optimizer, None),
        callbacks=[probe],
    )
    probe.trainer = trainer
    trainer.train()

    final = flat(trainer.model)
    seen = trainer.seen
    uses_items = bool(trainer.model_accepts_loss_kwargs) and model_uses_num_items(initial, seen[0])
    local_items = len(seen[0][1])
    gathered = [None] * world
    dist.all_gather_object(
        gathered,
        {
            "final": final,
            "seen": seen,
            "allreduces": probe.allreduces,
            "first_grad": probe.first_step_grad,
            "local_items": local_items,
        },
    )
    dist.barrier()
    if rank != 0:
        return None

    sizes = {len(labels) for g in gathered for _, labels in g["seen"]}
    global_items = sum(g["local_items"] for g in gathered)
    scale = effective_loss_scale(trainer, uses_items, world, local_items, global_items)
    ref_final, ref_first_grad, ref_norms = reference_run(initial, [g["seen"] for g in gathered], name, scale)
    sam_logs = [
        {k: v for k, v in entry.items() if k.startswith("sam/")}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    logged_norms = [entry.get("sam/grad_norm") for entry in sam_logs]
    return {
        "world_size": world,
        "steps_per_rank": [len(g["seen"]) for g in gathered],
        "batch_sizes": sorted(sizes),
        "distinct_batches_across_ranks": len(
            {tuple(ids.reshape(-1).tolist()) for g in gathered for ids, _ in g["seen"]}
        ),
        "rank_max_diff": max(float((g["final"] - gathered[0]["final"]).abs().max()) for g in gathered),
        "ranks_identical": all(torch.equal(g["final"], gathered[0]["final"]) for g in gathered),
        "allreduces_per_rank": [g["allreduces"] for g in gathered],
        "ref_max_diff": float((gathered[0]["final"] - ref_final).abs().max()),
        "moved_from_init": float((gathered[0]["final"] - flat(initial)).abs().max()),
        "first_step_grad_max_diff": float((gathered[0]["first_grad"] - ref_first_grad).abs().max()),
        "first_step_grad_abs_max": float(ref_first_grad.abs().max()),
        "model_accepts_loss_kwargs": bool(trainer.model_accepts_loss_kwargs),
        "model_uses_num_items_in_batch": uses_items,
        "average_tokens_across_devices": bool(trainer.args.average_tokens_across_devices),
        "loss_scale": scale,
        "sam_ascent_sync": trainer.args.sam_ascent_sync,
        "sam_log_keys": sorted({k for entry in sam_logs for k in entry}),
        "sam_log_count": len(sam_logs),
        "logged_grad_norms": logged_norms,
        "ref_grad_norms": ref_norms,
        "final_weights": gathered[0]["final"].tolist(),
    }


def main():
    out_path = sys.argv[1]
    rank, world = start_gloo()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CONFIGS.items():
            results[name] = run_config(name, overrides, tmp, rank, world)
    if rank == 0:
        finals = {name: torch.tensor(results[name].pop("final_weights")) for name in results}
        results["max_diff_sam_local_vs_sync"] = float((finals["sam_local"] - finals["sam_sync"]).abs().max())
        results["max_diff_sam_local_vs_none"] = float((finals["sam_local"] - finals["none"]).abs().max())
    write_and_close(out_path, results)  # its gc frees the DDP wrappers (and their reducers) first


if __name__ == "__main__":
    main()
