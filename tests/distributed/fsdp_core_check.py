"""hf_sam's shard-aware core (`tensors.global_norm`, `Perturbation`) on FSDP2 DTensor shards (CPU, gloo).

Launch: `torchrun --nproc_per_node 2 tests/distributed/fsdp_core_check.py OUT.json`. Rank 0 writes OUT.json; the
asserts live in `tests/test_distributed.py`.

Every rank builds the same MLP, keeps an unsharded deep copy as reference and shards the original with
`fully_shard` on a 1-D CPU mesh. Each rank runs forward+backward on its own half of a fixed batch; FSDP2's
reduce-scatter averages, so the sharded gradient equals the mean over ranks of the per-half gradients, which the
reference computes on the unsharded copy. The last layer has 5 output rows, so its shards are uneven (3 + 2 rows):
the padding FSDP2 adds must not leak into the norm.

For each ascent rule ("sam", "adaptive") the check compares, against the reference:
- `global_norm` of the sharded gradients (and of the sharded weights) with the norm over the full tensors;
- `tensors.dot` of the sharded gradients with itself;
- the `grad_norm` returned by `Perturbation.ascend`;
- every perturbed weight (`full_tensor()`) with w + eps, eps written out here (`reference_eps`);
- the gradient of a forward+backward at the perturbed shards (the descent pass) with the reference at w + eps;
and that after `restore()` every local shard is bit-identical to the one before `ascend`.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from types import SimpleNamespace


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from hf_sam.perturbation import Perturbation, select_perturbed
from hf_sam.tensors import dot, global_norm, local, shard_rows
from tests.distributed.process_group import start_gloo, whole, write_and_close


RHO = {"sam": 0.05, "adaptive": 0.5}
ETA = 0.01
PER_RANK = 4


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))


def data(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(world * PER_RANK, 8, generator=generator)
    y = torch.randn(world * PER_RANK, 5, generator=generator)
    return x, y


def loss_on(model, x, y, rank):
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return F.mse_loss(model(x[part]), y[part])


def reference_grads(reference: nn.Module, x, y, world: int) -> None:
    """Put mean_r grad(loss on rank r's half) into `reference`'s `.grad`, as FSDP2's averaging reduce-scatter does."""
    reference.zero_grad(set_to_none=True)
    total = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    for r in range(world):
        reference.zero_grad(set_to_none=True)
        loss_on(reference, x, y, r).backward()
        for n, p in reference.named_parameters():
            total[n] += p.grad
    for n, p in reference.named_parameters():
        p.grad = total[n] / world


def reference_grads_at(reference: nn.Module, x, y, world: int, eps: dict[str, torch.Tensor]):
    """The averaged gradient at w + eps (w put back exactly afterwards), as {name: tensor}."""
    named = dict(reference.named_parameters())
    saved = {n: p.detach().clone() for n, p in named.items()}
    clean = {n: p.grad for n, p in named.items()}
    with torch.no_grad():
        for n, e in eps.items():
            named[n].add_(e)
    reference_grads(reference, x, y, world)
    out = {n: p.grad.detach().clone() for n, p in named.items()}
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(saved[n])
            p.grad = clean[n]
    return out


def reference_eps(reference: nn.Module, rule: str) -> dict[str, torch.Tensor]:
    """eps written out. SAM: rho g / (||g|| + 1e-12).

    ASAM: T = |w| + eta on weights, T = 1 on biases; eps = rho T^2 g / (||T g|| + 1e-12).
    """
    named = [(n, p) for n, p in reference.named_parameters() if p.grad is not None]
    if rule == "adaptive":
        ops = {n: torch.ones_like(p) if n.endswith("bias") else p.detach().abs() + ETA for n, p in named}
    else:
        ops = {n: torch.ones_like(p) for n, p in named}
    scaled = {n: ops[n] * p.grad for n, p in named}
    norm = torch.sqrt(sum((s.double() ** 2).sum() for s in scaled.values())).float()
    return {n: RHO[rule] * ops[n] * scaled[n] / (norm + 1e-12) for n, _ in named}


def make_perturbation(named, rule: str) -> Perturbation:
    """`Perturbation` over `named` with the ascent rule the trainer would build for `rule` ("sam" / "adaptive")."""
    try:
        from hf_sam.components import build_ascent
    except ImportError:  # the first API: the rule by name, ASAM's eta passed along
        return Perturbation(named, rule, ETA)
    from hf_sam import SAMTrainingArguments

    method = {"sam": "sam", "adaptive": "asam"}[rule]
    args = SAMTrainingArguments(
        output_dir=tempfile.gettempdir(),
        use_cpu=True,
        report_to="none",
        sam_method=method,
        sam_rho=RHO[rule],
        sam_adaptive_eta=ETA,
        # the paper's T = 1 on biases, which the reference here writes out (the asam preset scales them)
        **({"sam_adaptive_bias": False} if rule == "adaptive" else {}),
    )
    return Perturbation(named, build_ascent(args))


def check_rule(rule, model, reference, x, y, rank, world):
    reference_grads(reference, x, y, world)
    ref_named = dict(reference.named_parameters())
    ref_grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref_named.values())))
    ref_weight_norm = float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in ref_named.values())))
    ref_eps = reference_eps(reference, rule)

    model.zero_grad(set_to_none=True)
    loss_on(model, x, y, rank).backward()
    named = select_perturbed(model, None, None)
    params = [p for _, p in named]
    grads = [p.grad for p in params]
    kinds = sorted({type(p).__name__ for p in params} | {type(g).__name__ for g in grads})
    local_shapes = {n: list(local(p).shape) for n, p in named}

    grad_diff = max(float((whole(p.grad) - ref_named[n].grad).abs().max()) for n, p in named)
    norm_grads = float(global_norm(grads))
    norm_weights = float(global_norm([p.detach() for p in params]))
    dot_grads = float(dot(grads, grads))

    before = [local(p).detach().clone() for p in params]
    perturbation = make_perturbation(named, rule)
    ascend_norm, skipped = perturbation.ascend(RHO[rule])
    perturbed_diff = 0.0
    eps_abs_max = 0.0
    for n, p in named:
        expected = ref_named[n].detach() + ref_eps[n]
        perturbed_diff = max(perturbed_diff, float((whole(p) - expected).abs().max()))
        eps_abs_max = max(eps_abs_max, float(ref_eps[n].abs().max()))
    was_active = perturbation.active
    # The descent pass as the trainer runs it: zero .grad in place, forward+backward at w + eps. FSDP2 must
    # all-gather the perturbed shards, so the gradient equals the reference gradient at w + eps.
    torch._foreach_zero_([p.grad for p in params])
    loss_on(model, x, y, rank).backward()
    ref_at_eps = reference_grads_at(reference, x, y, world, ref_eps)
    descent_diff = max(float((whole(p.grad) - ref_at_eps[n]).abs().max()) for n, p in named)
    descent_moved = max(float((ref_at_eps[n] - ref_named[n].grad).abs().max()) for n, _ in named)
    perturbation.restore()
    restore_exact = all(torch.equal(local(p).detach(), b) for p, b in zip(params, before))
    restore_full_diff = max(float((whole(p) - ref_named[n].detach()).abs().max()) for n, p in named)
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    return {
        "rule_impl": perturbation.rule if isinstance(perturbation.rule, str) else type(perturbation.rule).__name__,
        "param_and_grad_types": kinds,
        "local_shapes": local_shapes,
        "grad_vs_reference_max_diff": grad_diff,
        "ref_grad_norm": ref_grad_norm,
        "global_norm_grads": norm_grads,
        "ref_weight_norm": ref_weight_norm,
        "global_norm_weights": norm_weights,
        "dot_grads": dot_grads,
        "ascend_grad_norm": float(ascend_norm),
        "skipped": float(skipped),
        "perturbed_max_diff": perturbed_diff,
        "eps_abs_max": eps_abs_max,
        "descent_grad_max_diff": descent_diff,
        "descent_grad_vs_clean_grad_max_diff": descent_moved,
        "active_after_ascend": was_active,
        "active_after_restore": perturbation.active,
        "restore_exact": restore_exact,
        "restore_vs_reference_max_diff": restore_full_diff,
    }


def whole_mask(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The full bool mask of `param` from every rank's shard mask."""
    shard = DTensor.from_local(
        mask.to(torch.uint8), param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )
    return shard.full_tensor().bool()


def check_masks(model, reference, rank, world):
    """Sparse SAM's masks on FSDP2 shards against the same masks built on the unsharded copy."""
    from hf_sam.masks import SparseMask, top_k_mask

    named, ref_named = select_perturbed(model, None, None), select_perturbed(reference, None, None)
    names, params = [n for n, _ in named], [p for _, p in named]
    ref_params = [p for _, p in ref_named]
    args = SimpleNamespace(sam_mask="dynamic", seed=3, sam_sparsity=0.6, sam_mask_drop_rate=0.5)
    sharded, single = SparseMask(args, names, params), SparseMask(args, names, ref_params)

    def same_as_single() -> bool:
        return all(torch.equal(whole_mask(sharded.masks[n], p), single.masks[n]) for n, p in zip(names, params))

    out = {"initial_equal": same_as_single(), "density": sharded.density(), "ref_density": single.density()}
    generator = torch.Generator().manual_seed(5)
    full_grads = [torch.randn(p.shape, generator=generator) for p in ref_params]
    sharded.drop_and_grow([shard_rows(g, p) for g, p in zip(full_grads, params)], params, step=3, progress=0.25)
    single.drop_and_grow(full_grads, ref_params, step=3, progress=0.25)
    out["drop_and_grow_equal"] = same_as_single()
    out["drop_and_grow_density"], out["drop_and_grow_ref_density"] = sharded.density(), single.density()
    fisher = [torch.rand(p.shape, generator=generator) for p in ref_params]
    sharded.set_fisher([shard_rows(f, p) for f, p in zip(fisher, params)], params)
    single.set_fisher(fisher, ref_params)
    out["fisher_equal"] = same_as_single()
    # Ties: scores in {0, 1, 2, 3}, so the k-th largest value is shared by many entries on both ranks.
    tied = [torch.randint(0, 4, p.shape, generator=generator).float() for p in ref_params]
    k = 1234 if sum(p.numel() for p in ref_params) > 1234 else sum(p.numel() for p in ref_params) // 2
    chosen = top_k_mask([shard_rows(t, p) for t, p in zip(tied, params)], k, sharded.group)
    whole = [whole_mask(c, p) for c, p in zip(chosen, params)]
    picked = torch.cat([t[m] for t, m in zip(tied, whole)])
    left = torch.cat([t[~m] for t, m in zip(tied, whole)])
    out["ties_count"], out["ties_k"] = int(sum(int(m.sum()) for m in whole)), k
    out["ties_ordered"] = bool(picked.min() >= left.max())
    return out


def main():
    out_path = sys.argv[1]
    rank, world = start_gloo()
    mesh = init_device_mesh("cpu", (world,))
    model = build_model()
    reference = copy.deepcopy(model)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = data(world)

    results = {rule: check_rule(rule, model, reference, x, y, rank, world) for rule in ("sam", "adaptive")}
    masks = check_masks(model, reference, rank, world)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    out = None
    if rank == 0:
        out = {"world_size": world, "per_rank": gathered, "masks": masks}
        # Every rank must agree on the collective results (norms are all-reduced, weights gathered).
        out["ranks_agree"] = all(
            g[rule][key] == gathered[0][rule][key]
            for g in gathered
            for rule in results
            for key in ("global_norm_grads", "ascend_grad_norm", "perturbed_max_diff", "dot_grads")
        )
    del model, reference, mesh  # they hold the process group (FSDP state, the mesh)
    write_and_close(out_path, out)


if __name__ == "__main__":
    main()
