"""Batched tensor helpers shared by the SAM step. They work on plain tensors and on FSDP2 DTensor shards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist


try:  # DTensor is public from torch 2.4 on.
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - old torch
    DTensor, Shard = (), ()

try:  # FSDP2's module class (public from torch 2.6 on)
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - old torch
    FSDPModule = ()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this rank holds: the local shard of a DTensor, the tensor itself otherwise.

    In-place ops on the result change the DTensor, so elementwise SAM math can run on shards directly.
    """
    if isinstance(tensor, DTensor):
        return tensor._local_tensor
    return tensor


def shard_rows(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full`, a tensor shaped like the whole `param`: under FSDP2 the dim-0 `torch.chunk`
    the rank holds (FSDP2's split), for a plain tensor `full` itself."""
    if not isinstance(param, DTensor):
        return full
    mesh = param.device_mesh
    chunks = torch.chunk(full, mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    part = chunks[rank] if rank < len(chunks) else full[:0]
    if part.shape != local(param).shape:
        raise NotImplementedError(
            f"hf_sam expected FSDP2's dim-0 chunk of shape {tuple(part.shape)}, got a shard of"
            f" {tuple(local(param).shape)}."
        )
    return part


def shard_group(tensors: list[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group over which `tensors` are sharded, or `None` when they are whole on every rank."""
    for tensor in tensors:
        if isinstance(tensor, DTensor):
            mesh = tensor.device_mesh
            if mesh.ndim != 1 or not all(isinstance(p, Shard) for p in tensor.placements):
                raise NotImplementedError(
                    "hf_sam's shard-aware norm supports 1-D FSDP2 meshes with Shard placements; got "
                    f"{tensor.placements} on a {mesh.ndim}-D mesh (HSDP / tensor parallel are not supported yet)."
                )
            return mesh.get_group()
    return None


def global_norm(tensors: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """L2 norm over all `tensors` together, in fp32, summed over every rank's shard under FSDP2.

    `group` sums over those ranks when `tensors` are plain local shards (method state kept as local tensors);
    DTensors find their group themselves. No host sync: the result stays on the device.
    """
    shards = [local(t) for t in tensors]
    if not shards:
        return torch.zeros((), dtype=torch.float32)
    # A bf16 or fp16 tensor's norm comes back in its own dtype, rounded to 3 or 4 significant digits: ask for fp32.
    # fp32 and fp64 lists keep the plain call (the same kernel, so the same bits as before).
    if any(s.dtype in (torch.float16, torch.bfloat16) for s in shards):
        norms = torch._foreach_norm(shards, 2, dtype=torch.float32)
    else:
        norms = torch._foreach_norm(shards)
    squared = torch.stack([n.float() for n in norms]).square().sum()
    group = shard_group(tensors) if group is None else group
    if group is not None:
        dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=group)
    return squared.sqrt()


def average_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype to keep a running average of `tensor` in (a weight's, a gradient's): float32 for bf16 and fp16, whose
    resolution rounds an average's small updates away, the tensor's own dtype otherwise (float64 and complex
    tensors included, whose values float32 would round or drop)."""
    return torch.float32 if tensor.is_floating_point() and tensor.element_size() < 4 else tensor.dtype


def _real_parts(tensor: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real and imaginary parts side by side (a real view), a real tensor as it is."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Inner product of two parameter-shaped lists, in fp32, summed over shards under FSDP2.

    A complex parameter counts as its real and imaginary parts, as its norm does (Re <x, y>): `.float()` of a complex
    tensor keeps the real part alone.
    """
    products = [(_real_parts(local(x)).float() * _real_parts(local(y)).float()).sum() for x, y in zip(a, b)]
    total = torch.stack(products).sum() if products else torch.zeros(())
    group = shard_group(a)
    if group is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def bounded_groups(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices of `tensors` in consecutive groups of at most the largest tensor's bytes each (its local shard's).

    A foreach op that returns new tensors (`torch._foreach_abs`) run group by group holds one tensor's worth of them
    at a time instead of a copy of every tensor, in a few calls rather than one per tensor.
    """
    sizes = [local(t).numel() * local(t).element_size() for t in tensors]
    limit = max(sizes, default=0)
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if not groups or total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def zero_non_finite_(tensors: list[torch.Tensor]) -> None:
    """Replace NaN and +-inf entries by 0 in place (there is no `_foreach_nan_to_num_`)."""
    for tensor in tensors:
        torch.nan_to_num_(tensor, nan=0.0, posinf=0.0, neginf=0.0)


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average `tensors` over all ranks in place, as one flat all-reduce (a no-op without a process group)."""
    if not tensors or not dist.is_available() or not dist.is_initialized():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    torch._foreach_copy_(
        tensors, [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
    )


@contextlib.contextmanager
def resharded_after(model: torch.nn.Module) -> Iterator[None]:
    """Reshard every FSDP2 module of `model` when the block exits (a no-op without FSDP2).

    FSDP2 keeps the root module's parameters gathered after a forward (it expects the backward to need them), and a
    forward without gradient (evaluation, prediction) has no backward to reshard them. Weights that hf_sam then writes
    into the shards (the weight average's restore, Momentum-SAM's shift, MESA's teacher swap) would not reach the
    next forward, which would run on the stale gathered copy.
    """
    try:
        yield
    finally:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
