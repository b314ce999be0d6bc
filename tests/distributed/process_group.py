"""What the two-process check scripts share: joining and leaving the torchrun process group, whole tensors."""

from __future__ import annotations

import faulthandler
import gc
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def start_gloo() -> tuple[int, int]:
    """Join the process group torchrun set up (gloo, CPU), one thread per process; returns (rank, world size).

    With `HF_SAM_CHECK_HANG_REPORT_S` set (the tests set it), a rank still running that many seconds later prints
    every thread's stack and exits: a hang names its place instead of running into the test's timeout unseen.
    """
    report_after = float(os.environ.get("HF_SAM_CHECK_HANG_REPORT_S", "0"))
    if report_after > 0:
        faulthandler.dump_traceback_later(report_after, exit=True)
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


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: each rank must call it), a plain tensor as it is."""
    return tensor.detach().full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
