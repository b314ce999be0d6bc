"""Joining and leaving the torchrun process group, shared by the two-process check scripts."""

from __future__ import annotations

import gc
import json

import torch
import torch.distributed as dist


def start_gloo() -> tuple[int, int]:
    """Join the process group torchrun set up (gloo, CPU), one thread per process; returns (rank, world size)."""
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    return dist.get_rank(), dist.get_world_size()


def write_and_close(out_path: str, results: dict | None) -> None:
    """Rank 0 writes `results` to `out_path` as JSON; then every rank leaves the process group.

    Callers drop what holds the group (DDP reducers, FSDP meshes) first: left to interpreter teardown, gloo's
    shutdown sometimes aborts ("terminate called without an active exception", torch 2.13).
    """
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
