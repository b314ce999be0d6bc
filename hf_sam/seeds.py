"""Seeded CPU generators for the draws pieces make per optimizer step.

Each piece draws from its own stream, a generator seeded from (stream name, seed, step): the same numbers on every
rank, for every micro-batch of the window and after a resume, and independent of the other pieces' draws and of the
global RNG, which dropout uses. SS-SAM's coin and SSAM-D's masks draw from here; ESAM's kept tensors and SSAM-F's
Fisher sample keep seeds of their own (`seed * 1000003 + step`, plus 7919 for ESAM), which no stream here shares.
"""

from __future__ import annotations

import hashlib

import torch


def step_generator(stream: str, seed: int, step: int) -> torch.Generator:
    """A CPU generator for `stream`'s draws at optimizer step `step` of a run seeded with `seed`."""
    key = hashlib.sha256(f"{stream}|{seed}|{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
