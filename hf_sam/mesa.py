"""MESA (Du et al. 2022, arXiv 2205.14083, memory-efficient SAF): the KL to the logits of an exponential moving
average of the weights, an `EMATeacher` (eval mode, no grad). The math: docs/methods.md#mesa.
"""

from __future__ import annotations

import contextlib
import copy
import types
from typing import Any

import torch
from torch import nn

from .loss_term import (
    LossTerm,
    backbone_of,
    capture_outputs,
    kl_to_target,
    labels_of_positions,
    last_hidden_state,
    logits_of,
    per_token_log_probs,
    term_scale,
    token_mask,
    unwrapped_model,
)
from .tensors import DTensor, average_dtype, local, resharded_after
from .weight_ema import lerp_float32_, warmed_up_decay


def _float32_average(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The EMA's working copy: a float32 copy of each lower-precision tensor, the tensor itself otherwise."""
    return [t.detach().to(average_dtype(t), copy=True) if average_dtype(t) != t.dtype else t for t in tensors]


class EMATeacher:
    """MESA's teacher: a copy of the model whose trainable weights follow v <- decay v + (1 - decay) w.

    Frozen parameters and buffers are shared with the model, not copied (under LoRA only the adapters are
    averaged and stored). The copy stays in eval mode (no dropout) and runs without gradient.
    State: `mesa_ema.<parameter name>` per trainable parameter.
    """

    def __init__(self, model: nn.Module):
        shared = {id(p): p for p in model.parameters() if not p.requires_grad}
        shared.update({id(b): b for b in model.buffers()})
        self.module = copy.deepcopy(model, memo=shared)
        # accelerate patches `forward` on the instance (autocast, fp32 outputs), and TRL's SFTTrainer patches the
        # causal LM inside a PEFT wrapper (its fused LM head) with a function that closes over the *original*
        # model's forward: copied, it would run the student's weights. Every module of the copy uses its class's
        # own forward, and the caller enters the autocast context itself.
        for module in self.module.modules():
            if isinstance(module.__dict__.get("forward"), types.MethodType):
                module.__dict__.pop("forward")
            module.__dict__.pop("_original_forward", None)
        self.module.eval()
        self.names: list[str] = []
        self.student: list[torch.Tensor] = []
        self.ema: list[torch.Tensor] = []
        for (name, p), (copy_name, v) in zip(model.named_parameters(), self.module.named_parameters()):
            if name != copy_name:  # pragma: no cover - deepcopy keeps the module tree
                raise RuntimeError(f"EMA copy is out of order: {name} vs {copy_name}")
            if p.requires_grad:
                v.requires_grad_(False)
                v.grad = None
                self.names.append(name)
                self.student.append(p)
                self.ema.append(v)
        self.average = _float32_average(self.ema)

    def _sync(self) -> None:
        """Copy the float32 average into the teacher's own lower-precision weights (a no-op for fp32 weights)."""
        pairs = [(v, a) for v, a in zip(self.ema, self.average) if v is not a]
        if pairs:
            torch._foreach_copy_([v for v, _ in pairs], [a for _, a in pairs])

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """v <- decay v + (1 - decay) w (the caller picks the decay: MESATerm warms it up on request)."""
        # v + (1 - beta)(w - v) = beta v + (1 - beta) w, as one pass over the weights (this rank's shards), on the
        # float32 average: in bf16 (1 - beta)(w - v) is mostly below half a unit in the last place of v and rounds
        # away.
        lerp_float32_(self.average, [local(p).detach() for p in self.student], 1 - decay)
        self._sync()

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Any]):
        return self.module(**inputs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"mesa_ema.{name}": v for name, v in zip(self.names, self.average)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict()
        if set(state) != set(expected):
            missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(
                f"The checkpoint's MESA teacher does not fit this model (missing {missing[:3]}, unknown"
                f" {unknown[:3]}). Resume with the model and trainable parameters of the original run."
            )
        with torch.no_grad():
            for key, value in expected.items():
                if state[key].shape != value.shape:
                    raise ValueError(
                        f"MESA state {key!r} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}."
                    )
                value.copy_(state[key])
        self._sync()


class ShardedEMATeacher(EMATeacher):
    """MESA's teacher under FSDP2: the EMA of this rank's shards, and no second model.

    FSDP2 refuses a deep copy, and a whole copy would defeat sharding anyway. The teacher forward runs the sharded
    model itself, in eval mode and without gradient, with the EMA shards copied into its parameters (FSDP2
    all-gathers them like any weights); then every module is resharded, so no gathered EMA weight stays behind
    for the student's passes, and the student's shards are copied back. Extra memory: two shard-sized copies.
    """

    def __init__(self, model: nn.Module):
        self.module = model
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.student = [p for _, p in named]
        self.ema = [local(p).detach().to(average_dtype(p), copy=True) for p in self.student]
        self.average = self.ema  # its own tensors, kept in float32: nothing to sync
        self._held = [torch.empty_like(local(p)) for p in self.student]  # the student's shards during a forward

    @torch.no_grad()
    def __call__(self, inputs: dict[str, Any]):
        shards = [local(p) for p in self.student]
        torch._foreach_copy_(self._held, shards)
        torch._foreach_copy_(shards, self.ema)
        was_training = self.module.training
        self.module.eval()
        try:
            with resharded_after(self.module):
                return self.module(**inputs)
        finally:
            torch._foreach_copy_(shards, self._held)
            self.module.train(was_training)


class MESATerm(LossTerm):
    """MESA's term: KL to the EMA teacher's logits, per example or per labelled token; the EMA follows every step."""

    needs_hidden_state = True

    def __init__(self, trainer):
        super().__init__(trainer)
        model = trainer.model
        sharded = any(isinstance(p, DTensor) for p in model.parameters())
        self.teacher = ShardedEMATeacher(model) if sharded else EMATeacher(model)
        # Under a fused LM head the student's logits are recomputed from its last hidden state; the first such
        # pass checks on the teacher that the LM head alone gives the model's logits (no scaling or softcapping).
        self.head_checked = False
        self._teacher_hidden: torch.Tensor | None = None
        self._teacher_logits_for_check: torch.Tensor | None = None
        # Unset: warm up for causal LMs, where a teacher near the starting model (random, or the base model under
        # LoRA) pulls every token's prediction back towards it; the classification benchmark measured the plain decay.
        warmup = self.args.mesa_ema_warmup
        self.ema_warmup = trainer._sam_loss_shifts_labels() if warmup is None else warmup

    def prepare(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The teacher's logits for `inputs` (no gradient), or None before `mesa_start_epoch`. It runs before the
        student's forward: under FSDP2 it borrows the model's own shards (see `ShardedEMATeacher`)."""
        trainer = self.trainer
        if (trainer.state.epoch or 0.0) < self.args.mesa_start_epoch:
            return None
        teacher_inputs = dict(inputs)
        config = getattr(trainer.model, "config", None)
        if not getattr(config, "is_encoder_decoder", False) or "decoder_input_ids" in inputs:
            # Labels only feed the teacher's own loss (encoder-decoders build their decoder inputs from them).
            teacher_inputs.pop("labels", None)
            teacher_inputs.pop("shift_labels", None)
        backbone = backbone_of(self.teacher.module) if not self.head_checked else None
        with trainer.accelerator.autocast(), contextlib.ExitStack() as stack:
            hidden = stack.enter_context(capture_outputs(backbone)) if backbone is not None else []
            logits = logits_of(self.teacher(teacher_inputs), self.args.sam_method)
        self._teacher_hidden = last_hidden_state(hidden[0]) if hidden else None
        self._teacher_logits_for_check = logits if hidden else None
        return logits

    def term(self, inputs, captured, index, prepared, num_items_in_batch) -> torch.Tensor | None:
        args, trainer, teacher_logits = self.args, self.trainer, prepared
        if teacher_logits is None:
            trainer._sam_count_passes(1.0)
            return None
        fused = per_token_log_probs(captured.output)
        if fused is not None:
            logits, teacher_logits = self._scored_positions(captured.hidden_state, fused[1], teacher_logits)
            mask = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
        else:
            self.head_checked = True
            if "shift_labels" in inputs:
                labels, shift = inputs["shift_labels"], False
            else:
                labels, shift = inputs.get("labels"), trainer._sam_loss_shifts_labels()
            logits = logits_of(captured.output, args.sam_method)
            # Prompt tuning's virtual tokens: their positions lead the student's and the teacher's logits alike.
            labels = labels_of_positions(labels, logits, trainer.accelerator.unwrap_model(trainer.model))
            logits, mask = token_mask(logits, labels, shift)
            teacher_logits, _ = token_mask(teacher_logits, labels, shift)
        self.say_if_two_classes(logits)
        kl = torch.where(mask, kl_to_target(logits, teacher_logits, args.mesa_tau, args.sam_method), 0.0)
        count = mask.sum()
        term = args.mesa_lambda * args.mesa_tau**2 * kl.sum() * term_scale(trainer, count, num_items_in_batch)
        # A mean over the window's scored positions (tokens, or examples), not of per-micro-batch means: micro-batches
        # of a causal LM score different numbers of tokens.
        trainer._sam_metrics.add("mesa/kl", kl.detach().sum(), count=count)
        # A no-grad forward counted as a third of a pass (backward = 2 forwards), as ESAM's SDS forward.
        trainer._sam_count_passes(1.0 + 1 / 3)
        return term

    def _scored_positions(self, hidden: torch.Tensor | None, label_mask: torch.Tensor, teacher_logits: torch.Tensor):
        """Student and teacher logits `(scored tokens, vocab)` when the host's loss came from a fused LM head
        (per-token log-probabilities, no logits): the student's are its LM head applied to its last hidden state at
        the scored positions only, with gradient."""
        if hidden is None:
            raise ValueError(
                "sam_method='mesa' needs the student's logits, but the model returned per-token log-probabilities"
                " (a fused LM head) and has no backbone (`model.base_model`) whose last hidden state gives them."
                " Use a transformers causal LM, or a SAM method such as --sam_method sam."
            )
        # The fused head scores the label at t + 1 from position t (label_mask has one position less), or takes
        # pre-shifted labels position by position.
        if label_mask.shape[1] == hidden.shape[1] - 1:
            hidden, teacher_logits = hidden[:, :-1], teacher_logits[:, :-1]
        lm_head = unwrapped_model(self.trainer.model).get_output_embeddings()
        if not self.head_checked:
            self._check_head(label_mask)
        # Only the scored positions, as the fused head itself does: the full (batch, length, vocabulary) logits with
        # gradient are what it avoids. The boolean index costs one device-to-host sync, as in TRL's own head.
        return lm_head(hidden[label_mask]), teacher_logits[label_mask]

    def _check_head(self, label_mask: torch.Tensor) -> None:
        """Once per run: the LM head on the teacher's last hidden state must give the teacher's own logits; a model
        that scales or softcaps its logits after the head would make the recomputed student logits wrong."""
        teacher = unwrapped_model(self.teacher.module)
        hidden, logits = self._teacher_hidden, self._teacher_logits_for_check
        if hidden.shape[1] == label_mask.shape[1] + 1:
            hidden, logits = hidden[:, :-1], logits[:, :-1]
        with torch.no_grad(), self.trainer.accelerator.autocast():
            recomputed = teacher.get_output_embeddings()(hidden[label_mask]).float()
        if not torch.allclose(recomputed, logits[label_mask].float(), rtol=1e-3, atol=1e-3):
            raise ValueError(
                f"sam_method='mesa' under a fused LM head recomputes the student's logits as lm_head(hidden state),"
                f" but {type(teacher).__name__} transforms its logits after the LM head (a scale or softcapping), so"
                " they would be wrong. Use --sam_method sam (or another method that perturbs the weights) here."
            )
        self.head_checked = True
        self._teacher_hidden = self._teacher_logits_for_check = None

    def after_optimizer_step(self) -> None:
        """v <- beta v + (1 - beta) w right after each optimizer step.

        With `mesa_ema_warmup` (unset: for causal LMs), beta is min(beta, (1 + t) / (10 + t)) after t optimizer
        steps, so on a run shorter than about 1 / (1 - beta) steps the teacher averages the recent weights instead
        of staying near the starting model. t is Trainer's `global_step` (not yet counting this step), which a
        resume restores.
        """
        decay = self.args.mesa_ema_decay
        if self.ema_warmup:
            decay = warmed_up_decay(decay, self.trainer.state.global_step)
        self.teacher.update(decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.teacher.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.teacher.load_state_dict(state)
