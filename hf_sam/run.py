"""`SAMRun`: what one `train()` call of `SAMMixin` holds, in one object with one `reset()`.

The pieces are built from the prepared model at the first training step (parameters may be replaced between the
trainer's construction and that step: FSDP2 sharding, `model_init`), and every `train()` call starts a new run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import check_state_keys
from .components import build_ascent, build_descent
from .descent import DescentPipeline
from .esam import ESAM
from .guard import UpdateGuard
from .loss_term import LossTerm
from .masks import SparseMask
from .perturbation import Perturbation, select_perturbed
from .replay import batch_norm_layers
from .stall import StallWatch
from .tensors import local
from .weight_ema import WeightEMA
from .zero import ZeroStep


@dataclass
class SAMRun:
    # The method's pieces (None until the first step builds them).
    perturbation: Perturbation | None = None  # the perturbed set, its ascent rule and mask
    descent: DescentPipeline | None = None
    esam: ESAM | None = None
    loss_term: LossTerm | None = None  # SAF's bank or MESA's teacher
    term_reached: bool = False  # a training pass went through SAMMixin.compute_loss, which adds SAF's / MESA's term
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    bn_layers: list[torch.nn.Module] = field(default_factory=list)  # whose statistics the perturbed pass must not move
    shifts_labels: bool | None = None  # whether the model scores logits at t against labels at t + 1 (causal LM)
    # The accumulation window Trainer prefetched, and where the current step stands in it.
    window: list | None = None
    in_train: bool = False  # inside train(), whose loop prefetches every window through get_batch_samples
    window_next: int = 0
    window_is_sam: bool = True
    # The forward+backward passes of the current micro-batch (`sam/passes_per_step`): Trainer counts one in total_flos
    passes: float = 1.0
    window_clean: list[torch.Tensor] = field(default_factory=list)  # each micro-batch's clean loss
    window_rng: list[Any] = field(default_factory=list)  # the RNG state before each clean pass (dropout replay)
    window_examples: list[Any] = field(default_factory=list)  # ESAM SDS: each micro-batch's per-example losses
    # The batch-norm statistics after each clean pass of the window but its last (window mode): a window that a stop
    # cuts after micro-batch i gets those of micro-batches 0..i back, as the plain Trainer has them.
    window_bn: list[list[torch.Tensor]] = field(default_factory=list)
    # Whether the model (or the compute_loss_func) returns its own mean where Trainer takes its loss as normalized by
    # num_items_in_batch (mSAM's shards, ESAM's subset, SAF's and MESA's term; decided once per run by
    # `SAMMixin._sam_loss_ignores_item_count`)
    loss_ignores_item_count: bool | None = None
    epoch_steps: int | None = None  # Trainer's optimizer steps per epoch (None: a dataloader without a length)
    step_losses: list[tuple[Any, Any]] = field(default_factory=list)  # (clean, perturbed) of each micro-batch so far
    # The last window ended without an optimizer step (an iterable training set ran out inside it, so Trainer's loop
    # takes no step there): its gradient stays in `.grad` and its losses are kept, for the next window's step, where
    # Trainer adds them to the next window's.
    carried: bool = False
    carried_losses: tuple[Any, Any] | None = None  # that window's (clean, perturbed), summed
    carry: dict[torch.Tensor, torch.Tensor] | None = None  # window mode: that gradient, until it joins the descent's
    raw_norm: torch.Tensor | None = None  # ||g|| of the last ascent, in `.grad` units
    rho: float | None = None  # the radius of the last ascent (0 where GSAM's schedule reaches 0)
    stash: dict[int, torch.Tensor] = field(default_factory=dict)  # micro accumulation's gradient buffers
    guard: UpdateGuard = field(default_factory=UpdateGuard)
    zero: ZeroStep | None = None  # under DeepSpeed ZeRO-1/2: holds each step's passes back from the engine
    weight_ema: WeightEMA | None = None  # the moving average of the weights (weight_ema_decay > 0)
    stall: StallWatch = field(default_factory=StallWatch)  # warns when the training loss does not fall
    warned_new_trainable: bool = False  # the warning about parameters unfrozen after the first step, given once

    def build(self, model: torch.nn.Module, args, held: set[int] | None = None) -> None:
        """The method's pieces, from the prepared model: the perturbed set (of the parameters the optimizer holds,
        `held`) with its ascent rule and mask, the descent transforms and ESAM's selection (inactive unless its fields
        are set)."""
        named = select_perturbed(model, args.sam_include, args.sam_exclude, held)
        names, params = [n for n, _ in named], [p for _, p in named]
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.bn_layers = batch_norm_layers(model) if args.sam_freeze_bn_stats else []
        self.esam = ESAM(args, params)
        mask = SparseMask(args, names, params) if args.sam_mask in ("fisher", "dynamic") else None
        self.perturbation = Perturbation(named, build_ascent(args), mask)
        self.descent = build_descent(args)

    def refresh_trainable(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """List again the parameters that get a gradient (at the start of every step): a callback may unfreeze or
        freeze parameters between steps (gradual unfreezing). Listed at the first step only, a parameter unfrozen
        later kept its clean gradient under the descent gradient that the backward at w + eps added to it, so it
        trained on their sum. Returns the trainable parameters outside the perturbed set chosen at the first step."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        if len(trainable) == len(self.trainable) and all(a is b for a, b in zip(trainable, self.trainable)):
            return []  # the usual case, in one pass over the parameters
        known = {id(p) for p in self.perturbation.params} | {id(p) for p in self.trainable}
        self.trainable = trainable
        return [p for p in trainable if id(p) not in known]

    def reset(self) -> None:
        """Back to a run that has not started (at every `train()` call)."""
        self.__dict__.update(SAMRun().__dict__)

    def forget_step(self) -> None:
        """Drop what belongs to the current step only (a step cut short by an exception)."""
        self.window_clean, self.window_rng, self.window_examples, self.window_bn = [], [], [], []
        self.step_losses = []
        self.carry = None
        if self.descent is not None:
            self.descent.clean_copy = None
        self.guard.forget_step()

    # ------------------------------------------------------------------ gradients

    def release_grads(self) -> None:
        """Drop `.grad` (it holds eps, no longer needed): the descent backward then hands its gradient over instead
        of adding it to zeros, which saves two passes over the parameters' size and frees eps's memory."""
        for p in self.trainable:
            p.grad = None

    def drop_update(self) -> None:
        """Leave the weights as they are at this step's optimizer step (the guard's dropped update)."""
        if self.zero is not None:
            self.zero.drop_update(self.trainable)
        else:
            self.release_grads()

    def zero_grads(self) -> None:
        grads = [local(p.grad) for p in self.trainable if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)

    def set_aside_carried(self) -> dict[torch.Tensor, torch.Tensor] | None:
        """At a SAM window's first micro-batch: the gradient that a window without an optimizer step left in
        `.grad` (`carried`), copied aside, and `.grad` zeroed, so the ascent sees this window's own; None if none."""
        held = [p for p in self.trainable if p.grad is not None] if self.carried else []
        if not held:
            return None
        carry = self.stash_grads(held)
        self.zero_grads()
        return carry

    @staticmethod
    def add_back(stash: dict[torch.Tensor, torch.Tensor]) -> None:
        """Add gradients set aside by `stash_grads` to the `.grad` of their parameters."""
        torch._foreach_add_([local(p.grad) for p in stash], list(stash.values()))

    def stash_grads(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Copy the accumulated `.grad` of `params` into reusable buffers (the GA > 1 stash of micro mode)."""
        grads = [local(p.grad) for p in params]  # this rank's shards under FSDP2
        buffers = []
        for p, grad in zip(params, grads):
            buffer = self.stash.get(id(p))
            if buffer is None or buffer.shape != grad.shape:
                buffer = self.stash[id(p)] = torch.empty_like(grad)
            buffers.append(buffer)
        torch._foreach_copy_(buffers, grads)
        return dict(zip(params, buffers))

    # ------------------------------------------------------------------ state

    def stateful_pieces(self) -> dict[str, Any]:
        """Every piece of this run that can hold state, by the namespace its keys are saved under."""
        pieces: dict[str, Any] = {}
        if self.weight_ema is not None:
            pieces["weight_ema"] = self.weight_ema
        if self.loss_term is not None:
            pieces["loss_term"] = self.loss_term
        if self.perturbation is not None:
            pieces["ascent"] = self.perturbation.rule
            if self.perturbation.mask is not None:
                pieces["mask"] = self.perturbation.mask
            for i, transform in enumerate(self.descent.transforms):
                pieces[f"descent.{i}"] = transform
        return pieces

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{namespace}.{key}": value
            for namespace, piece in self.stateful_pieces().items()
            for key, value in piece.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], device, owner: str) -> None:
        """Hand each piece the keys of its namespace, stripped of it; refuse keys no piece owns."""
        pieces = self.stateful_pieces()
        owned: dict[str, dict[str, torch.Tensor]] = {namespace: {} for namespace in pieces}
        for key, value in state.items():
            namespace = next((n for n in pieces if key.startswith(f"{n}.")), None)
            if namespace is None:
                raise ValueError(
                    f"{owner}: the checkpoint holds state {key!r}, which no piece of this run"
                    f" ({', '.join(pieces) or 'none with state'}) owns. Resume with the original run's settings."
                )
            owned[namespace][key[len(namespace) + 1 :]] = value.to(device)
        if self.perturbation is not None:
            # Per-parameter state is "<name>.<parameter name>" and must fit that perturbed parameter (local shard);
            # a key without a dot is the piece's own (a counter), and the piece checks it.
            params = dict(zip(self.perturbation.names, self.perturbation.params))
            for namespace, piece_state in owned.items():
                if namespace in ("loss_term", "weight_ema"):  # they check their own state (not per perturbed tensor)
                    continue
                per_param = {k: v for k, v in piece_state.items() if "." in k}
                expected = {k: local(params[k.split(".", 1)[1]]) for k in per_param if k.split(".", 1)[1] in params}
                check_state_keys(per_param, expected, owner)
        for namespace, piece in pieces.items():
            piece.load_state_dict(owned[namespace])
