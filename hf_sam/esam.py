"""ESAM (Du et al. 2022, arXiv 2110.03141): stochastic weight perturbation and sharpness-sensitive data selection.

- SWP: each step, each perturbed tensor is kept with probability `esam_beta`; dropped tensors get
  `requires_grad=False` during the clean pass (no weight-gradient GEMM for them) and eps = (rho/beta)
  g_kept/||g_kept|| on the kept ones. Per tensor, as the official code. Draws come from (seed, step): identical
  on every rank.
- SDS: per-example losses at w (clean pass) and at w + eps (a no-grad forward with the same dropout masks);
  the descent pass runs only on the k = max(1, ceil(gamma |B|)) examples whose loss rose most.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from .loss_term import capture_outputs


def kept_tensors(count: int, beta: float, seed: int, step: int) -> list[bool]:
    """Which of `count` tensors SWP keeps at `step` (at least one, so the ascent is never empty)."""
    # Its own stream since ESAM was added (the salt 7919 keeps it apart from every other piece's seed).
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step + 7919)
    keep = (torch.rand(count, generator=generator) < beta).tolist()
    if count and not any(keep):
        keep[int(torch.randint(count, (1,), generator=generator))] = True
    return keep


def clean_pass_cost(beta: float | None) -> float:
    """The clean pass in passes of F + B (B = 2F): SWP keeping `beta` of the tensors skips the weight-gradient third
    of the backward for the other 1 - beta; `None` (no SWP) is a whole pass."""
    return 1.0 if beta is None else 1.0 - (1 - beta) / 3


def step_passes(beta: float | None, gamma: float | None) -> float:
    """Passes per micro-batch of a SAM step: the clean pass, then with SDS (`gamma`) a no-grad forward (1/3) and a
    descent on gamma of the batch, without it (`None`) a whole descent pass: 1.87 for the esam preset (SWP with
    beta 0.6), 1.7 with its data selection at gamma 0.5."""
    return clean_pass_cost(beta) + (1.0 if gamma is None else 1 / 3 + gamma)


@contextlib.contextmanager
def frozen_tensors(params: list[torch.nn.Parameter], keep: list[bool]) -> Iterator[None]:
    """`requires_grad=False` on the dropped tensors for the block: autograd skips their weight gradients."""
    dropped = [p for p, k in zip(params, keep) if not k and p.requires_grad]
    for p in dropped:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in dropped:
            p.requires_grad_(True)


def _reentrant(checkpoint: Callable) -> bool:
    """Whether a layer's checkpointing function is torch's reentrant variant: transformers binds `use_reentrant` (from
    `gradient_checkpointing_kwargs`) with `functools.partial`, and torch takes a missing one as True."""
    if isinstance(checkpoint, functools.partial):
        return checkpoint.keywords.get("use_reentrant", True) is not False
    return True  # a function of the user's: it may be reentrant


def _inputs_requiring_grad(checkpoint: Callable) -> Callable:
    """`checkpoint` with the floating-point inputs of a call none of whose inputs requires grad made to (as detached
    views, the caller's tensors untouched)."""

    @functools.wraps(checkpoint)
    def wrapped(function, *args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if torch.is_grad_enabled() and not any(t.requires_grad for t in tensors):
            args = tuple(
                a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args
            )
        return checkpoint(function, *args, **kwargs)

    return wrapped


@contextlib.contextmanager
def checkpointed_layers_keep_gradient(model: torch.nn.Module) -> Iterator[None]:
    """Under reentrant activation checkpointing, the inputs of every checkpointed layer require grad for the block.

    A reentrant checkpoint whose inputs none require grad returns an output without gradient: no weight inside the
    layer or before it gets one, and no later layer's input requires grad either. transformers makes only the input
    embeddings' output require grad, so on a model that reads no `input_ids` (Whisper's audio features, a ViT's
    pixels) the tensors SWP drops can be all that made the first layer's input require grad: with Whisper's encoder
    convolutions dropped, the kept encoder layers would get no clean gradient and no eps. transformers' layers look up
    `_gradient_checkpointing_func` on themselves at each call, so it is wrapped there.
    """
    patched = []
    for module in model.modules():
        checkpoint = module.__dict__.get("_gradient_checkpointing_func")
        if getattr(module, "gradient_checkpointing", False) and checkpoint is not None and _reentrant(checkpoint):
            module._gradient_checkpointing_func = _inputs_requiring_grad(checkpoint)
            patched.append((module, checkpoint))
    try:
        yield
    finally:
        for module, checkpoint in patched:
            module._gradient_checkpointing_func = checkpoint


def selected_count(batch: int, gamma: float) -> int:
    """k = max(1, ceil(gamma |B|)) (the official code is off by one)."""
    return max(1, math.ceil(gamma * batch))


def top_rise_per_class(rise: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """SDS within each class: of the n_c examples of class c, the ceil(gamma n_c) whose loss rose most.

    Ranking the whole batch at once drops whole classes: a step along the batch gradient raises the loss of some
    classes' examples together and hardly touches others (docs/methods.md#esam). Ranked within each class, every
    class in the batch keeps its share of the descent.
    """
    by_rise = torch.argsort(rise, descending=True)
    order = by_rise[torch.argsort(labels[by_rise], stable=True)]  # grouped by class, by rise within each
    grouped = labels[order].long()  # sorted: each class's examples form one run
    # Each example's class: where it starts in `order` and its size, found in the sorted run. torch.unique and
    # torch.bincount size their outputs from the labels, so on an accelerator each made the host wait for the device;
    # the selection's one host read is its own size, below (docs/methods.md#esam).
    first = torch.searchsorted(grouped, grouped)
    counts = torch.searchsorted(grouped, grouped, right=True) - first
    rank = torch.arange(len(order), device=rise.device) - first
    return order[rank < torch.ceil(counts * gamma).long()]


def take_examples(inputs: dict[str, Any], index: torch.Tensor, batch: int) -> dict[str, Any]:
    """The rows `index` of every batch-sized tensor in `inputs`; other entries are kept as they are."""
    out = dict(inputs)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            out[key] = value.index_select(0, index.to(value.device))
    return out


def _mean_per_sequence(token_loss: torch.Tensor, valid: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Mean of a padding-free row's `(1, positions)` token losses over the `valid` ones of each sequence (`bounds`:
    its token offsets, see `hf_sam.msam.sequence_bounds`); position t scores the label of token t + 1, which a valid
    position shares a sequence with (a sequence's first label is -100)."""
    positions = torch.arange(token_loss.shape[1], device=token_loss.device)
    sequence = torch.bucketize(positions, torch.tensor(bounds[1:-1], device=token_loss.device), right=True)
    count = len(bounds) - 1
    total = token_loss.new_zeros(count).index_add_(0, sequence, (token_loss * valid)[0])
    return total / valid.new_zeros(count).index_add_(0, sequence, valid[0]).clamp(min=1)


def per_example_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    shifts_labels: bool,
    bounds: list[int] | None = None,
    problem_type: str | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Loss of each example, in fp32: classification (CE, or BCE for multi-label targets), regression (MSE),
    token-level CE averaged over labels != -100 (per sequence of a padding-free batch whose token offsets are
    `bounds`).

    `problem_type` is the model config's: float labels of the logits' shape are multi-label targets (BCE with
    logits, averaged over the labels) unless it is `"regression"`, as transformers' classification heads decide.
    `label_smoothing` is Trainer's `label_smoothing_factor` where its `LabelSmoother` computes the loss: the CE of
    class and token labels is then smoothed as that loss is, (1 - e) NLL + e mean_c(-log p_c).

    Raises:
        `ValueError`: outputs this function does not know; override `SAMTrainer.per_example_loss`.
    """
    logits = logits.float()
    if logits.dim() == 2 and labels.dim() == 1:
        if logits.shape[-1] == 1 or labels.is_floating_point():
            return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="none")
        return F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    if logits.dim() == 2 and labels.shape == logits.shape and labels.is_floating_point():
        if problem_type == "regression":
            return F.mse_loss(logits, labels.float(), reduction="none").mean(-1)
        # transformers' heads train float targets of more than one output with BCEWithLogitsLoss (problem_type
        # "multi_label_classification", also what an unset problem_type becomes): scored by MSE on the raw logits,
        # an example whose logit moved further towards its 0/1 target counted as a loss *rise*.
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1)
    if logits.dim() == 3 and labels.dim() == 2:
        if shifts_labels:  # causal LM: token t predicts t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        token = F.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=-100, reduction="none", label_smoothing=label_smoothing
        )
        valid = (labels != -100).float()
        if bounds is not None:
            return _mean_per_sequence(token, valid, bounds)
        return (token * valid).sum(-1) / valid.sum(-1).clamp(min=1)
    raise ValueError(
        f"ESAM's data selection needs per-example losses, and logits of shape {tuple(logits.shape)} with labels of"
        f" shape {tuple(labels.shape)} are not a known case (sequence/token/image classification, causal or masked"
        " LM). Override `SAMTrainer.per_example_loss(outputs, inputs)` for this model, or set --esam_gamma 1."
    )


def per_example_nll(
    log_probs: torch.Tensor, label_mask: torch.Tensor, bounds: list[int] | None = None
) -> torch.Tensor:
    """Mean negative log-likelihood of each example's scored tokens, in fp32, from a fused LM head's per-token
    log-probabilities (`(batch, positions)`, zero where `label_mask` is False). The same value as `per_example_loss`
    on the logits: token-level CE averaged over the labels that are not -100 (per sequence of a padding-free batch
    whose token offsets are `bounds`)."""
    mask = label_mask.float()
    if bounds is not None:
        return _mean_per_sequence(-log_probs.float(), mask, bounds)
    return -(log_probs.float() * mask).sum(-1) / mask.sum(-1).clamp(min=1)


class ESAM:
    """ESAM's pieces for one run: SWP (`esam_swp`: which tensors this step's ascent keeps) and SDS (`esam_gamma` < 1:
    which examples the descent sees). Neither is on for the other methods; the axes combine with any of them.

    Args:
        args: the resolved `SAMTrainingArguments`.
        params (`list[torch.nn.Parameter]`): the perturbed parameters.
    """

    def __init__(self, args, params: list[torch.nn.Parameter]):
        self.args = args
        self.params = params
        self.swp = bool(args.esam_swp)
        self.sds = args.esam_gamma < 1
        self.keep: list[bool] | None = None

    def before_step(self, step: int) -> None:
        """SWP: one draw per optimizer step, shared by the window's micro-batches and identical on every rank."""
        if self.swp:
            self.keep = kept_tensors(len(self.params), self.args.esam_beta, self.args.seed, step)

    def ascent_rho(self, rho: float) -> float:
        """SWP's radius: eps = (rho / beta) g_kept / ||g_kept|| (dropped tensors have no gradient, so no eps)."""
        return rho / self.args.esam_beta if self.swp else rho

    def passes(self) -> float:
        """Forward+backward passes per micro-batch of a SAM step (see `step_passes`)."""
        return step_passes(self.args.esam_beta if self.swp else None, self.args.esam_gamma if self.sds else None)

    @contextlib.contextmanager
    def clean_pass(self, model: torch.nn.Module) -> Iterator[list]:
        """Around the clean pass: SWP freezes the dropped tensors (and keeps reentrant checkpoints' gradients flowing
        past them); SDS keeps the model's output (yielded list)."""
        with contextlib.ExitStack() as stack:
            if self.swp:
                stack.enter_context(frozen_tensors(self.params, self.keep))
                stack.enter_context(checkpointed_layers_keep_gradient(model))
            captured = stack.enter_context(capture_outputs(model)) if self.sds else []
            yield captured

    def select(self, rise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """SDS: the examples whose loss rose most at w + eps, a share gamma of them: within each class with
        `esam_selection='per_class'` when `labels` are class ids (one integer per example), else over the batch
        (k = max(1, ceil(gamma |B|)), the paper's rule)."""
        gamma = self.args.esam_gamma
        if self.args.esam_selection == "per_class" and is_class_ids(labels, rise.shape[0]):
            return top_rise_per_class(rise, labels, gamma)
        return torch.topk(rise, selected_count(rise.shape[0], gamma)).indices


def is_class_ids(labels: torch.Tensor | None, batch: int) -> bool:
    """One integer label per example (sequence or image classification), not tokens, scores or multi-labels."""
    return (
        isinstance(labels, torch.Tensor)
        and labels.dim() == 1
        and labels.shape[0] == batch
        and not labels.is_floating_point()
    )
