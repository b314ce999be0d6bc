"""DeepSpeed ZeRO stage 1 and 2 under `SAMMixin`: the SAM step's passes held back from the engine's reduction.

accelerate's DeepSpeed `backward` reduces the gradient and calls `engine.step()` at the end of every window, so
the first pass of a SAM step cannot go through it. Under ZeRO-1/2 every rank holds the whole weights and only the
optimizer state (ZeRO-1) and the reduced gradient (ZeRO-2) are partitioned, so a SAM step runs as under DDP:

- every pass of the step runs `engine.backward` inside `engine.coalesce_grad_reduction()`, which leaves each rank's
  own gradient in `.grad` (nothing is reduced or stepped): the ascent uses it as it is (`sam_ascent_sync=False`,
  each rank's own ascent) or after one flat all-reduce (`sam_ascent_sync=True`), as under DDP;
- the weights are restored to w, then the block exits, and DeepSpeed reduces the step's descent gradient into its
  partitions in one pass; `engine.step()` then clips, checks for overflow and updates, exactly as on its own path.

Norms and inner products run on the gradient each rank holds (never a per-parameter gather of partitions).
ZeRO-3 (partitioned weights), CPU offload and bf16 ZeRO-1 with fp32 gradient accumulation (DeepSpeed's
`BF16_Optimizer`) are refused before training (`check_zero_config`, `check_zero_data_types`).
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch


# A user who wants DeepSpeed's shared-memory all-reduce op on CPU sets this to 1 (it is JIT-built with a compiler).
SHM_ENV = "HF_SAM_DEEPSPEED_SHM"


def deepspeed_config_dict(deepspeed_config: Any) -> dict | None:
    """A DeepSpeed config in any form transformers takes it (a dict, the path of a JSON file as a `str` or
    `os.PathLike`, a JSON string, or a base64-encoded JSON string, the forms accelerate's `HfDeepSpeedConfig` reads),
    as a dict.

    Returns None where it cannot be read here: transformers then refuses it itself, saying which forms it takes.
    """
    config = deepspeed_config
    if isinstance(config, (str, os.PathLike)):
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as handle:
                config = json.load(handle)
        else:
            text = os.fspath(config)
            try:
                config = json.loads(text)
            except ValueError:
                try:  # accelerate's HfDeepSpeedConfig tries base64 after JSON
                    config = json.loads(base64.urlsafe_b64decode(text).decode("utf-8"))
                except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
                    return None
    return config if isinstance(config, dict) else None


def zero_config(deepspeed_config: Any) -> dict:
    """The `zero_optimization` block of a DeepSpeed config in any form `deepspeed_config_dict` reads ({} if absent)."""
    return (deepspeed_config_dict(deepspeed_config) or {}).get("zero_optimization") or {}


def check_zero_config(zero: dict, where: str, sam_step: bool = True) -> None:
    """Refuse, before training, what the held-back SAM step cannot run: ZeRO-3, CPU/NVMe offload and (for the
    SAM-step methods) stage 0, which has no `coalesce_grad_reduction`.

    Args:
        zero (`dict`): The DeepSpeed config's `zero_optimization` block.
        where (`str`): Where the config came from, for the message.
        sam_step (`bool`): Whether the method runs SAM steps (the loss terms run DeepSpeed's own path).

    Raises:
        `ValueError`: naming the field and pointing to ZeRO-2 or FSDP2.
    """
    stage = str(zero.get("stage", 0))  # an int in a dict, a string in some configs
    if sam_step and stage not in ("1", "2", "3"):
        raise ValueError(
            f"hf_sam runs SAM steps under DeepSpeed ZeRO stage 1 and 2, but {where} sets zero_optimization.stage="
            f"{stage} (0 when absent): stage 0 cannot hold a backward's gradient back from its reduction. Set"
            " zero_optimization.stage to 2 (or 1), or train with DDP."
        )
    if stage == "3":
        raise ValueError(
            f"hf_sam supports DeepSpeed ZeRO stage 1 and 2, but {where} sets zero_optimization.stage=3: ZeRO-3"
            " partitions the weights, which a SAM step perturbs and restores whole on every rank. Use"
            " zero_optimization.stage=2 (optimizer state and gradients partitioned), or FSDP2 for sharded weights."
        )
    for field in ("offload_optimizer", "offload_param"):
        device = (zero.get(field) or {}).get("device", "none")
        if str(device).lower() not in ("none", ""):
            raise ValueError(
                f"hf_sam does not support DeepSpeed offload: {where} sets zero_optimization.{field}.device="
                f"{device!r}, whose gradient path bypasses the SAM step's held-back passes. Remove {field} (ZeRO-2"
                " without offload), or use FSDP2."
            )


def check_zero_data_types(config: dict, where: str, bf16: bool) -> None:
    """Refuse, before training, bf16 weights with fp32 gradient accumulation under ZeRO-1 for the SAM-step methods.

    DeepSpeed runs that combination through its `BF16_Optimizer` instead of the ZeRO optimizer, and its engine cannot
    hold a backward's gradient back there (`coalesce_grad_reduction` raises NotImplementedError at the first step).

    Args:
        config (`dict`): The whole DeepSpeed config.
        where (`str`): Where the config came from, for the message.
        bf16 (`bool`): The arguments' `bf16`, which a `"bf16": {"enabled": "auto"}` block follows.

    Raises:
        `ValueError`: naming `data_types.grad_accum_dtype` and pointing to ZeRO-2.
    """
    stage = str((config.get("zero_optimization") or {}).get("stage", 0))
    accumulation = str((config.get("data_types") or {}).get("grad_accum_dtype", "")).lower()
    block = config.get("bf16") or config.get("bfloat16") or {}
    enabled = block.get("enabled", False) if isinstance(block, dict) else False
    enabled = bf16 if enabled == "auto" else bool(enabled)
    if stage == "1" and enabled and accumulation in ("fp32", "float32", "float", "torch.float32"):
        raise ValueError(
            f"hf_sam cannot run SAM steps under DeepSpeed ZeRO-1 with bf16 and fp32 gradient accumulation: {where}"
            f" sets data_types.grad_accum_dtype={accumulation!r} with zero_optimization.stage=1 and bf16, which"
            " DeepSpeed runs through its BF16_Optimizer, whose engine cannot hold a pass's gradient back from its"
            " reduction. Use zero_optimization.stage=2 (it accumulates in fp32 there too), or drop"
            " data_types.grad_accum_dtype."
        )


def check_zero_optimizer(config: dict, where: str, method: str, own: type | None) -> None:
    """Refuse, before training, a DeepSpeed `optimizer` block for a method that brings its own optimizer (AdaSAM).

    With that block transformers hands DeepSpeed a placeholder instead of the Trainer's optimizer and DeepSpeed builds
    the block's optimizer, so the method would be plain SAM over it. The first step would refuse it too, but only
    after the engine was built, and without knowing where the other optimizer came from.

    Args:
        config (`dict`): The whole DeepSpeed config.
        where (`str`): Where the config came from, for the message.
        method (`str`): The arguments' `sam_method`.
        own (`type`, *optional*): The optimizer class the method brings (None: the method brings none).

    Raises:
        `ValueError`: naming the `optimizer` block and how to drop it.
    """
    block = config.get("optimizer")
    if own is None or not block:
        return
    kind = block.get("type") if isinstance(block, dict) else block
    raise ValueError(
        f"sam_method={method!r} brings its own optimizer ({own.__name__}), but {where} has an `optimizer` block"
        f" (type {kind!r}), from which DeepSpeed builds another optimizer in place of the Trainer's: {method} would be"
        f" plain SAM over it. Remove the `optimizer` block from the DeepSpeed config (the Trainer then builds"
        f" {own.__name__} and DeepSpeed wraps it), or use sam_method='sam' with that optimizer."
    )


def check_deepspeed_version() -> None:
    """The held passes need `DeepSpeedEngine.coalesce_grad_reduction` (DeepSpeed 0.19.8 is tested).

    Raises:
        `ValueError`: the installed DeepSpeed has no such method.
    """
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not hasattr(DeepSpeedEngine, "coalesce_grad_reduction"):
        raise ValueError(
            f"hf_sam's SAM step under DeepSpeed needs DeepSpeedEngine.coalesce_grad_reduction, which deepspeed"
            f" {deepspeed.__version__} lacks: pip install 'deepspeed>=0.19.8' (or pip install 'hf-sam[deepspeed]')."
        )


@contextlib.contextmanager
def without_shm_comm_build() -> Iterator[None]:
    """Skip DeepSpeed's JIT build of its shared-memory all-reduce op (`deepspeed_shm_comm`) inside the block.

    On its CPU accelerator DeepSpeed compiles that optional op (g++ and ninja, about a minute) at every
    `init_distributed`, and fails without a compiler; gloo carries every collective without it. Only the CPU
    accelerator is affected (on GPUs the function is left alone), only inside the block, and setting
    `HF_SAM_DEEPSPEED_SHM=1` keeps the build.
    """
    if os.environ.get(SHM_ENV) == "1":
        yield
        return
    try:
        # `import deepspeed.comm.torch as m` would bind the `torch` package that deepspeed.comm re-exports.
        module = importlib.import_module("deepspeed.comm.torch")
        from deepspeed.accelerator import get_accelerator

        on_cpu = get_accelerator().device_name() == "cpu"
    except Exception:  # deepspeed absent or unusable: nothing to skip
        yield
        return
    if not on_cpu:
        yield
        return
    previous = module.build_shm_op
    module.build_shm_op = lambda: None  # TorchBackend then runs without the op, as without a compatible builder
    try:
        yield
    finally:
        module.build_shm_op = previous


class HeldBackward:
    """Stands in for accelerate's `DeepSpeedEngineWrapper` during a SAM step: `engine.backward` only.

    accelerate's wrapper sets the accumulation boundary and steps the engine after the window's last backward;
    inside `engine.coalesce_grad_reduction()` the backward leaves this rank's gradient in `.grad`, and
    `ZeroStep.finish` reduces and steps once the weights are back at w.
    """

    def __init__(self, engine):
        self.engine = engine

    def backward(self, loss: torch.Tensor, sync_gradients: bool = True, **kwargs: Any) -> None:
        self.engine.backward(loss, **kwargs)


class ZeroStep:
    """One optimizer step of a SAM run under ZeRO-1/2: the passes held, then one reduction and `engine.step()`.

    Args:
        accelerator: The trainer's `Accelerator` (its `deepspeed_engine_wrapped` is swapped while the step runs).
        engine: The `DeepSpeedEngine`.
    """

    def __init__(self, accelerator, engine):
        self.accelerator = accelerator
        self.engine = engine
        self._block: contextlib.ExitStack | None = None
        self._wrapper = None

    @property
    def open(self) -> bool:
        return self._block is not None

    def begin(self) -> None:
        """Hold the engine's reduction and stepping until `finish` (called at the window's first micro-batch)."""
        if self._block is not None:
            return
        block = contextlib.ExitStack()
        block.enter_context(self.engine.coalesce_grad_reduction())
        self._wrapper = self.accelerator.deepspeed_engine_wrapped
        self.accelerator.deepspeed_engine_wrapped = HeldBackward(self.engine)
        self._block = block

    def finish(self, step: bool = True) -> None:
        """Hand the held gradient to DeepSpeed (one reduction into its partitions) and, if `step`, step the engine.

        Called once the weights are back at w: `engine.step()` copies its fp32 master partitions into the module,
        so weights left at w + eps would be overwritten there and the error would not show in the final weights.
        """
        block, self._block = self._block, None
        if block is None:
            return
        self.accelerator.deepspeed_engine_wrapped = self._wrapper
        self._wrapper = None
        block.close()  # the engine reduces the held gradient here
        if step:
            # What accelerate's wrapper does after the window's last backward.
            self.engine.set_gradient_accumulation_boundary(is_boundary=True)
            self.engine.step()

    def abort(self) -> None:
        """Close a step cut short by an exception: its gradient is dropped, the engine does not step."""
        if self._block is None:
            return
        for param in self.engine.module.parameters():
            param.grad = None
        self.finish(step=False)
        self.engine.optimizer.zero_grad()

    def loss_scale(self) -> float | None:
        """DeepSpeed's current fp16 loss scale (the held `.grad` carries it), or None without fp16."""
        if not self.engine.fp16_enabled():
            return None
        return float(self.engine.optimizer.loss_scale)

    def drop_update(self, params: list[torch.Tensor]) -> None:
        """Make `engine.step()` skip this step's update, as it skips an fp16 overflow: its overflow check finds the
        NaN, leaves weights and optimizer state as they are and clears the gradient. (Dropping `.grad` instead
        would hand DeepSpeed zeros, which momentum and weight decay still turn into an update.)"""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, float("nan"))
