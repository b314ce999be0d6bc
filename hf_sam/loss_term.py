"""The one-pass loss terms (SAF, MESA): Trainer's own pass plus lambda tau^2 mean KL(softmax(z_hat / tau) ||
softmax(z / tau)), z the logits of this pass and z_hat a target the term keeps. No perturbation, no second pass.

`LossTerm` is what a term implements; `SAMMixin.compute_loss` calls `prepare` before the model's forward and `term`
after it, and `after_optimizer_step` runs after every optimizer step. The math: docs/methods.md#saf and #mesa.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from transformers.utils import logging


logger = logging.get_logger(__name__)


class LossTerm:
    """One loss term of a run, built from the prepared model at the first training pass of `train()`.

    Args:
        trainer: the `SAMMixin` trainer (read for its arguments, state, model and metrics).
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.args = trainer.args

    def prepare(self, inputs: dict[str, Any]) -> Any:
        """Runs before the student's forward on `inputs` (MESA's teacher); its result goes to `term`."""
        return None

    # MESA reads the backbone's last hidden state when the host computes its loss without logits (a fused LM head).
    needs_hidden_state = False

    def term(
        self, inputs: dict[str, Any], captured: PassOutputs, index, prepared, num_items_in_batch
    ) -> torch.Tensor | None:
        """The term to add to this pass's loss (None: nothing this pass). `captured` holds the pass's model outputs."""
        raise NotImplementedError

    # Whether the two-class warning was given in this run.
    two_classes_said = False

    def say_if_two_classes(self, logits: torch.Tensor) -> None:
        """Warn once per run (on the main process) when the term compares two-class logits: it can only reweight
        the examples there. A shape, known on the host: no sync."""
        if logits.shape[-1] == 2 and not self.two_classes_said:
            self.two_classes_said = True
            if self.trainer.is_world_process_zero():
                logger.warning(two_classes_message(self.args.sam_method))

    def after_optimizer_step(self) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def loss_taken_as_normalized(trainer, num_items_in_batch) -> bool:
    """Whether Trainer takes the model's loss as normalized over the whole window (it then skips its 1/GA): a model
    that accepts loss kwargs given `num_items_in_batch`, a `compute_loss_func`, or what the host says
    (`loss_is_scaled_for_ga`, mSAM's shards)."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            trainer.compute_loss_func is not None
        )
    return bool(scaled)


def token_average_factor(trainer, num_items_in_batch) -> int:
    """What Trainer multiplies such a loss by under `average_tokens_across_devices` (the processes), else 1."""
    args = trainer.args
    takes_kwargs = trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None
    if args.average_tokens_across_devices and takes_kwargs and num_items_in_batch is not None:
        return trainer.accelerator.num_processes // trainer.get_tp_size() if args.n_gpu <= 1 else args.n_gpu
    return 1


def term_scale(trainer, count, num_items_in_batch):
    """The factor that turns a sum of per-item KL values into the loss's own normalization.

    Trainer takes the model's loss to be a per-micro-batch mean (and divides it by the GA steps), or, when the model
    accepts loss kwargs and `num_items_in_batch` is known, already normalized over the whole window (times the
    processes under `average_tokens_across_devices`). The term follows the loss's actual scale: where such a model
    returns its own mean regardless (BERT's heads, or a `compute_loss_func` that ignores the count;
    `SAMRun.loss_ignores_item_count`), Trainer sums the micro-batch means undivided, and the term is a mean over the
    micro-batch too (normalized over the window it had 1/GA of its weight against that loss).
    """
    count = count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1)
    if not loss_taken_as_normalized(trainer, num_items_in_batch):
        return 1 / count
    if num_items_in_batch is None:
        return 1 / (count * trainer.current_gradient_accumulation_steps)
    if trainer._sam.loss_ignores_item_count:
        return token_average_factor(trainer, num_items_in_batch) / count
    return token_average_factor(trainer, num_items_in_batch) / num_items_in_batch


def logits_of(outputs, method: str) -> torch.Tensor:
    """The logits of a model output: a `ModelOutput`/dict with `logits`, or a tuple `(loss, logits, ...)` (with
    labels) or `(logits, ...)` (without)."""
    if isinstance(outputs, Mapping) or hasattr(outputs, "keys"):
        if "logits" in outputs.keys():
            return outputs["logits"]
    elif isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        if outputs[0].dim() > 0:
            return outputs[0]
        if len(outputs) >= 2 and isinstance(outputs[1], torch.Tensor):
            return outputs[1]
    raise ValueError(
        f"sam_method={method!r} needs the model to return logits (an output with `.logits`, or a tuple"
        f" (loss, logits, ...)); got {type(outputs).__name__}."
    )


def per_token_log_probs(outputs) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(log_probs, label_mask)` of a fused LM head's output (per-token log-probabilities of the next-token labels,
    without logits, as TRL's `SFTTrainer` computes its loss), or None for any other output."""
    log_probs = getattr(outputs, "log_probs", None)
    label_mask = getattr(outputs, "label_mask", None)
    if isinstance(log_probs, torch.Tensor) and isinstance(label_mask, torch.Tensor):
        return log_probs, label_mask
    return None


@contextlib.contextmanager
def capture_outputs(module: torch.nn.Module) -> Iterator[list]:
    """Collects what `module` returns in every forward of the block, in order (the yielded list)."""
    captured: list = []
    hook = module.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        yield captured
    finally:
        hook.remove()


def unwrapped_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's backbone, whose last hidden state its LM head turns into logits (None if it has none)."""
    model = unwrapped_model(model)
    backbone = getattr(model, "base_model", None)
    return backbone if isinstance(backbone, torch.nn.Module) and backbone is not model else None


def last_hidden_state(output) -> torch.Tensor:
    return output["last_hidden_state"] if hasattr(output, "keys") else output[0]


@dataclass
class PassOutputs:
    """What one training pass's forwards returned: the model's outputs and, when asked, the backbone's."""

    outputs: list = field(default_factory=list)
    backbone_outputs: list = field(default_factory=list)

    def _trained(self) -> int:
        """Index of the forward whose loss is trained: the first whose output carries gradient. A host may run
        no-grad forwards of the model before it (TRL's `KTOTrainer` estimates its KL term on mismatched completions
        first) or after it (`SFTTrainer`'s metrics under label smoothing, a PEFT reference with the adapters off).
        The first forward when none carries gradient."""
        if not self.outputs:
            raise ValueError(
                "The loss term (SAF, MESA) reads the model's outputs in its training pass, but the trainer's"
                " compute_loss ran no forward of `trainer.model`. Call the model the trainer holds in compute_loss."
            )
        return next((i for i, output in enumerate(self.outputs) if _carries_grad(output)), 0)

    @property
    def output(self):
        """The model output of the forward whose loss is trained."""
        return self.outputs[self._trained()]

    @property
    def hidden_state(self) -> torch.Tensor | None:
        """The backbone's last hidden state in that forward (each model forward runs its backbone once)."""
        if not self.backbone_outputs:
            return None
        index = self._trained()
        return last_hidden_state(self.backbone_outputs[index if index < len(self.backbone_outputs) else 0])


def _carries_grad(output) -> bool:
    """Whether a model output (a `ModelOutput`, dict, tuple or tensor) holds a tensor that requires grad."""
    if isinstance(output, torch.Tensor):
        return output.requires_grad
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


@contextlib.contextmanager
def capture_pass(model: torch.nn.Module, hidden_state: bool) -> Iterator[PassOutputs]:
    """The outputs of `model` (and of its backbone with `hidden_state`) in every forward of the block."""
    captured = PassOutputs()
    backbone = backbone_of(model) if hidden_state else None
    with contextlib.ExitStack() as stack:
        captured.outputs = stack.enter_context(capture_outputs(model))
        if backbone is not None:
            captured.backbone_outputs = stack.enter_context(capture_outputs(backbone))
        yield captured


def one_output_message(method: str) -> str:
    return (
        f"sam_method={method!r} adds a KL term between softmax distributions over the model's outputs, but this"
        " model has one output per example (a regression head, num_labels=1): a softmax over one value is always 1,"
        " so the term would be 0 and the method would do nothing (at its full cost). For regression use a method"
        " that perturbs the weights, e.g. --sam_method sam."
    )


def two_classes_message(method: str) -> str:
    return (
        f"sam_method={method!r} on a two-class head: with two classes softmax(z / tau) depends on the margin"
        " z_1 - z_0 alone, so the KL term only changes how much each example's cross-entropy gradient counts, never"
        " its direction. On the two-class fine-tunes measured (docs/methods.md#on-two-classes) SAF and MESA kept"
        " little or none of `sam`'s gain (noisy movie-review polarity: SAF +0.1, MESA -0.7 points against `none`,"
        " `sam` +3.1). On such a task --sam_method sam, ssam-f or esam (two passes or close) is the setting that"
        " paid."
    )


def kl_to_target(logits: torch.Tensor, target: torch.Tensor, tau: float, method: str = "saf") -> torch.Tensor:
    """KL(softmax(target / tau) || softmax(logits / tau)) over the last dimension, in fp32, gradient to `logits`."""
    if logits.shape[-1] < 2:
        raise ValueError(one_output_message(method))
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_q = F.log_softmax(logits.float() / tau, dim=-1)
        log_p = F.log_softmax(target.detach().float() / tau, dim=-1)
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def token_mask(logits: torch.Tensor, labels: torch.Tensor | None, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions that count for MESA: the logits to compare, and a bool mask of the same leading shape.

    `(batch, classes)` logits: every example whose label is not -100 (every example for multi-label targets).
    `(batch, ..., vocab)`: every position whose label is not -100; with `shift` (causal LM) the logits at t are
    scored against the label at t + 1. Without labels every position counts.
    """
    if shift and logits.dim() >= 3:
        logits = logits[:, :-1]
        labels = labels[:, 1:] if labels is not None else None
    if labels is None or (logits.dim() == 2 and labels.shape != logits.shape[:1]):
        return logits, torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"sam_method='mesa' compares logits per labelled position: logits {tuple(logits.shape)} do not match"
            f" labels {tuple(labels.shape)} (expected labels of shape logits.shape[:-1])."
        )
    return logits, labels.ne(-100)


def prompt_token_count(model: torch.nn.Module) -> int:
    """How many virtual tokens PEFT's prompt learning (prompt tuning, P-tuning) of `model`'s active adapter puts in
    front of each input; 0 for any other model (LoRA and the other adapters change no sequence length)."""
    configs = getattr(model, "peft_config", None)
    adapter = getattr(model, "active_adapter", None)
    config = configs.get(adapter) if isinstance(configs, dict) and isinstance(adapter, str) else None
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    return int(config.num_virtual_tokens or 0)


def labels_of_positions(
    labels: torch.Tensor | None, logits: torch.Tensor, model: torch.nn.Module
) -> torch.Tensor | None:
    """The labels of the logits' positions (ESAM's per-example losses, MESA's token mask).

    Under PEFT's prompt learning a causal LM's logits start with one position per virtual token, which PEFT's own
    forward scores against the labels with as many -100 in front (the last virtual token predicts the first input
    token); the batch's labels alone would not match them. Prefix tuning extends the attention cache, not the
    sequence, so its logits match the labels and are left as they are, as is every other model's.
    """
    count = prompt_token_count(model)
    if (
        count
        and isinstance(labels, torch.Tensor)
        and labels.dim() == 2
        and logits.dim() == 3
        and logits.shape[1] == labels.shape[1] + count
    ):
        return F.pad(labels, (count, 0), value=-100)
    return labels


class _TrainerHook(TrainerCallback):
    """Calls a trainer's bound method at one Trainer event; holds it weakly, so the callback does not keep its trainer
    alive."""

    def __init__(self, hook):
        self._hook = weakref.WeakMethod(hook)

    def _call(self) -> None:
        hook = self._hook()
        if hook is not None:
            hook()


class AfterOptimizerStep(_TrainerHook):
    """Calls `hook()` right after every `optimizer.step()` of the Trainer (MESA's EMA update)."""

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._call()


class BeforeOptimizerStep(_TrainerHook):
    """Calls `hook()` right before every `optimizer.step()` of the Trainer."""

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._call()


class AtEpochEnd(_TrainerHook):
    """Calls `hook()` at the end of every epoch, before the epoch's evaluation and checkpoint."""

    def on_epoch_end(self, args, state, control, **kwargs):
        self._call()


class AtTrainEnd(_TrainerHook):
    """Calls `hook()` when training ends, before the other callbacks' `on_train_end` (put first in the list)."""

    def on_train_end(self, args, state, control, **kwargs):
        self._call()


def loss_shifts_labels(trainer) -> bool:
    """Whether the model scores the logits at t against the label at t + 1 (causal LM), as Trainer decides.

    Used by ESAM's per-example losses and MESA's token mask.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return bool(getattr(trainer, "_loss_shifts_labels", False)) or (
        model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    )
