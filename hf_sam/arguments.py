"""`SAMTrainingArguments`: the `sam_*` fields as a dataclass mixin over `transformers.TrainingArguments`."""

from __future__ import annotations

import math
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType
from typing import Any

from transformers import Seq2SeqTrainingArguments, TrainingArguments
from transformers.utils import logging

from .components import ASCENT_RULES, DESCENT_TRANSFORMS, LOSS_TERM_CHOICES
from .masks import MASKS
from .methods import AXIS_DEFAULTS, METHODS, unknown_method_message
from .momentum_sam import MOMENTUM_UNDER_DEEPSPEED
from .schedules import SCHEDULES, mean_sam_probability, probability_end
from .zero import (
    check_zero_config,
    check_zero_data_types,
    check_zero_optimizer,
    deepspeed_config_dict,
    without_shm_comm_build,
)


ACCUMULATION_MODES = ("window", "micro")
# Choices come from the registries of the pieces: a new piece is a new choice.
ASCENT_CHOICES = tuple(ASCENT_RULES)
DIRECTIONS = ("gradient", "momentum")
DESCENT_CHOICES = ("none", *DESCENT_TRANSFORMS)
ESAM_SELECTIONS = ("per_class", "batch")
# Optimizers whose `step` happens inside `backward`: the perturbed pass would update the weights at w+eps. Also the
# layer-wise GaLore / APOLLO ones (names ending in `_layerwise`), which Trainer steps from post-accumulate-grad hooks.
FUSED_BACKWARD_OPTIMS = ("lomo", "adalomo")
# Radii above these leave the range the papers use by far (SAM 0.01-0.5, ASAM 0.5-2); a step whose loss at w + eps is
# not finite is skipped at run time, and a run of them stops training.
USUAL_MAX_RHO = {"adaptive": 5.0}
USUAL_MAX_RHO_DEFAULT = 1.0

logger = logging.get_logger(__name__)


def _bool_field_kind(annotation: Any) -> str | None:
    """ "required" for a `bool` field, "optional" for `bool | None`, None otherwise. The annotation is a string until
    `HfArgumentParser` resolves it in place to the type, so both forms are read."""
    if isinstance(annotation, str):
        annotation = annotation.replace(" ", "")
        return {"bool": "required", "bool|None": "optional"}.get(annotation)
    if annotation is bool:
        return "required"
    return "optional" if annotation == (bool | None) else None


_PROBABILITY_SCHEDULES = ("constant", "piecewise", "linear", "cosine")
# Fields that act only under one setting: a value given for a method without that setting would be silently
# ignored, so it is warned about. (fields, the setting they need, whether the resolved arguments have it)
ONLY_UNDER = (
    (("sam_adaptive_eta", "sam_adaptive_bias"), "sam_ascent='adaptive' (asam)", lambda a: a.sam_ascent == "adaptive"),
    (("fsam_sigma", "fsam_lambda"), "sam_ascent='fsam' (fsam)", lambda a: a.sam_ascent == "fsam"),
    (("gsam_alpha",), "sam_descent='gsam' (gsam)", lambda a: a.sam_descent == "gsam"),
    (("looksam_k", "looksam_alpha"), "sam_descent='looksam' (looksam)", lambda a: a.sam_descent == "looksam"),
    (("adasam_bias_correction",), "sam_method='adasam'", lambda a: a.sam_method == "adasam"),
    (
        ("sam_sparsity", "sam_mask_interval"),
        "sam_mask='fisher' or 'dynamic' (ssam-f, ssam-d)",
        lambda a: a.sam_mask in ("fisher", "dynamic"),
    ),
    (("sam_fisher_samples",), "sam_mask='fisher' (ssam-f)", lambda a: a.sam_mask == "fisher"),
    (("sam_mask_drop_rate",), "sam_mask='dynamic' (ssam-d)", lambda a: a.sam_mask == "dynamic"),
    (("esam_beta",), "esam_swp=True (esam)", lambda a: a.esam_swp),
    (("esam_selection",), "esam_gamma < 1 (esam)", lambda a: a.esam_gamma < 1),
    (("sam_interval",), "sam_schedule='every_k'", lambda a: a.sam_schedule == "every_k"),
    (
        ("sam_probability",),
        "sam_schedule constant, piecewise, linear or cosine (ss-sam)",
        lambda a: a.sam_schedule in _PROBABILITY_SCHEDULES,
    ),
    (
        ("sam_probability_end",),
        "sam_schedule piecewise, linear or cosine",
        lambda a: a.sam_schedule in _PROBABILITY_SCHEDULES[1:],
    ),
    (("sam_schedule_boundary",), "sam_schedule='piecewise'", lambda a: a.sam_schedule == "piecewise"),
    (
        ("saf_lambda", "saf_tau", "saf_lag_epochs", "saf_start_epoch"),
        "sam_loss_term='saf' (saf)",
        lambda a: a.sam_loss_term == "saf",
    ),
    (
        ("mesa_lambda", "mesa_tau", "mesa_ema_decay", "mesa_ema_warmup", "mesa_start_epoch"),
        "sam_loss_term='mesa' (mesa)",
        lambda a: a.sam_loss_term == "mesa",
    ),
    (
        (
            "sam_include",
            "sam_exclude",
            "sam_rho_min",
            "sam_rho_warmup",
            "esam_gamma",
            "sam_same_dropout",
            "sam_freeze_bn_stats",
            "sam_ascent_sync",
            "sam_accumulation",
            "sam_ascent",
            "esam_swp",
            # The other SAM-step axes: saf and mesa refuse them, and `none` would otherwise drop them silently.
            "sam_direction",
            "sam_mask",
            "sam_schedule",
            "sam_descent",
            "sam_renormalize",
            "sam_micro_batches",
        ),
        "a method that perturbs the weights (not none, saf or mesa)",
        lambda a: a.sam_enabled,
    ),
)


def _method_help() -> str:
    rows = ", ".join(f"{name} ({info.paper}; cost {info.cost})" for name, info in METHODS.items())
    return f"SAM method preset. One of: {rows}. Any axis flag given explicitly overrides the preset."


LOCAL_ASCENT_UNDER_FSDP = (
    "sam_ascent_sync=False is not possible under FSDP: every rank only holds a shard of the ascent gradient. Drop"
    " --sam_ascent_sync (it defaults to True under FSDP)."
)


@dataclass
class SAMArgumentsMixin:
    """
    The `sam_*` fields of [`SAMTrainingArguments`]. Put this mixin in front of any `TrainingArguments` subclass.

    > Parameters that choose the method

    sam_method (`str`, *optional*, defaults to `"sam"`):
        A preset over the fields below (see `hf_sam.METHODS`). `"none"` gives exactly the plain `Trainer`.

    > Parameters that shape the ascent step (defaults come from the method preset)

    sam_rho (`float`, *optional*):
        Radius of the perturbation. `sam` 0.05, `asam` 1 (relative to |w|). `0` gives the plain `Trainer` trajectory.
    sam_ascent (`str`, *optional*, defaults to `"sam"`):
        The ascent rule: `sam` (eps = rho g / ||g||), `adaptive` (ASAM: `T = |w| + eta` on every tensor except
        biases unless `sam_adaptive_bias`, eps = rho T^2 g / ||T g||), `unnormalized` (USAM: eps = rho g) or
        `fsam` (Friendly SAM).
    sam_adaptive_eta (`float`, *optional*, defaults to 0.01):
        The `eta` of ASAM.
    sam_adaptive_bias (`bool`, *optional*):
        ASAM on biases: `True` (the `asam` preset) uses `T = |b| + eta` as on the weights, `False` keeps the
        paper's `T = 1` there.
    sam_rho_warmup (`float`, *optional*, defaults to 0, 1 for `looksam`):
        Share of the optimizer steps, in [0, 1], over which the radius grows linearly from 0 to `sam_rho`
        (step t of T at `sam_rho * min(1, (t + 1) / (sam_rho_warmup * T))`). `0` keeps it constant.
    sam_direction (`str`, *optional*, defaults to `"gradient"`):
        Where eps comes from: `gradient` (a clean forward+backward, then the ascent rule) or `momentum`
        (Momentum-SAM: eps = -rho m / ||m|| from the optimizer's first moment m, no extra pass).

    > Parameters that say how the step fits into training

    sam_accumulation (`str`, *optional*, defaults to `"window"`):
        `window`: one perturbation from the whole gradient accumulation window; `micro`: one per micro-batch.
    sam_ascent_sync (`bool`, *optional*, defaults to `False`):
        All-reduce the ascent gradient across ranks before perturbing (`False`: each rank perturbs with its own
        gradient, the original SAM's m-sharpness, and no extra communication). Always `True` under FSDP.
    sam_same_dropout (`bool`, *optional*, defaults to `True`):
        Replay the RNG so both passes draw the same dropout masks.
    sam_freeze_bn_stats (`bool`, *optional*, defaults to `True`):
        Discard the batch-norm running statistics of the perturbed pass.
    sam_include (`str`, *optional*):
        Regex on parameter names: only matching trainable parameters are perturbed.
    sam_exclude (`str`, *optional*):
        Regex on parameter names: matching parameters are not perturbed.

    > Parameters of the individual methods (unset ones come from the preset; docs/methods.md#field-reference)

    sam_schedule (`str`, *optional*, defaults to `"always"`):
        Which steps run SAM: `always`, `constant`, `piecewise`, `linear`, `cosine` or `every_k` (ss-sam, late-sam,
        looksam).
    sam_probability, sam_probability_end, sam_schedule_boundary, sam_interval (*optional*):
        The schedule's SAM-step probability (start; default 0.5), its end value (default: `sam_probability`), the
        piecewise switch point as a share of training (0.5) and the every_k period (2).
    sam_descent (`str`, *optional*, defaults to `"none"`):
        Descent transform: `none`, `gsam` or `looksam`.
    sam_renormalize (`bool`, *optional*, defaults to `False`):
        Stable SAM: rescale the descent gradient to the norm of the ascent gradient.
    sam_micro_batches (`int`, *optional*, defaults to 1):
        mSAM: shards per micro-batch, one perturbation each.
    sam_rho_min (`float`, *optional*):
        GSAM: the radius follows the learning rate from `sam_rho` down to this. Unset: a constant `sam_rho`.
    sam_mask, sam_sparsity, sam_mask_interval, sam_fisher_samples, sam_mask_drop_rate (*optional*):
        Sparse SAM: the mask (`none` by default, `fisher`, `dynamic`), the share of entries not perturbed (0.5), the
        optimizer steps between refreshes (one epoch), SSAM-F's examples per refresh (128) and SSAM-D's initial drop
        rate (0.5).
    esam_swp, esam_beta, esam_gamma, esam_selection (*optional*, defaults to `False`, 0.6, 1.0, `"per_class"`):
        ESAM: stochastic weight perturbation and its keep probability; the share of each batch the descent uses and
        how it is ranked (`per_class` or `batch`).
    gsam_alpha (`float`, *optional*, defaults to 0.1):
        GSAM's weight of the orthogonal component.
    looksam_k, looksam_alpha (*optional*, defaults to 2, 0.0):
        LookSAM's period of full SAM steps and the weight of the reused component between them.
    adasam_bias_correction (`bool`, *optional*, defaults to `True`):
        AdaSAM: Adam's bias correction of m and v (`False`: the paper's rule).
    fsam_sigma, fsam_lambda (*optional*, defaults to 1.0, 0.9):
        Friendly SAM: share of the gradient EMA removed, and the EMA's decay.

    > Parameters of the one-pass loss terms (`saf`, `mesa`): no perturbation, Trainer's one pass plus
    > lambda * tau^2 * mean KL(softmax(z_hat / tau) || softmax(z / tau))

    sam_loss_term (`str`, *optional*):
        `none`, `saf` (z_hat: the example's logits `saf_lag_epochs` earlier) or `mesa` (z_hat: an EMA copy's logits).
    saf_lambda, saf_tau, saf_lag_epochs, saf_start_epoch (*optional*, defaults to 2.4, 5, 1, 1.0):
        SAF's weight, temperature, epoch lag of the recorded logits, and first epoch with the term.
    mesa_lambda, mesa_tau, mesa_ema_decay, mesa_start_epoch (*optional*, defaults to 2.4, 5, 0.999, 0.0):
        MESA's weight, temperature, EMA decay of the teacher, and first epoch with the term.
    mesa_ema_warmup (`bool`, *optional*):
        Warm the teacher's decay up as min(mesa_ema_decay, (1 + t) / (10 + t)) after t optimizer steps, as
        `weight_ema_decay` does. Unset: on for causal language models, off for every other model.

    > Averaging the weights (with any method)

    weight_ema_decay (`float`, *optional*, defaults to 0.0):
        Decay of an exponential moving average of the trainable weights, warmed up as min(decay, (1 + t) / (10 + t))
        after t optimizer steps. Evaluation during training uses the average, and it is the model left after
        `train()`; checkpoints keep the trained weights and the average apart, so a resume continues exactly.
        0 turns it off.
    """

    sam_method: str = field(default="sam", metadata={"help": _method_help(), "choices": list(METHODS)})
    sam_rho: float | None = field(
        default=None,
        metadata={"help": "Perturbation radius rho. 0 = plain Trainer."},
    )
    sam_adaptive_eta: float | None = field(default=None, metadata={"help": "ASAM's eta added to |w| (default 0.01)."})
    sam_adaptive_bias: bool | None = field(
        default=None,
        metadata={
            "help": "ASAM: scale biases by T = |b| + eta like the weights (True) or leave them at T = 1 as the paper"
            " does (False). Default: True under asam (False elsewhere). Unscaled, eps sits on the biases and rho"
            " wants ~0.02 (docs/methods.md#asam)."
        },
    )
    sam_accumulation: str | None = field(
        default=None,
        metadata={
            "help": "Gradient accumulation: 'window' perturbs once from the whole window's gradient (batch 2 x GA 2"
            " equals batch 4 x GA 1); 'micro' perturbs once per micro-batch.",
            "choices": list(ACCUMULATION_MODES),
        },
    )
    sam_ascent_sync: bool | None = field(
        default=None,
        metadata={
            "help": "All-reduce the ascent gradient across ranks before perturbing. Default False: each rank"
            " perturbs with its own gradient (m-sharpness, no extra all-reduce), under DDP and DeepSpeed ZeRO-1/2."
            " Forced True under FSDP."
        },
    )
    sam_same_dropout: bool = field(
        default=True, metadata={"help": "Replay the RNG so the clean and perturbed passes see the same dropout."}
    )
    sam_freeze_bn_stats: bool = field(
        default=True, metadata={"help": "Discard batch-norm running statistics updated by the perturbed pass."}
    )
    sam_include: str | None = field(
        default=None, metadata={"help": "Regex: perturb only trainable parameters whose name matches."}
    )
    sam_exclude: str | None = field(
        default=None, metadata={"help": "Regex: do not perturb parameters whose name matches."}
    )
    sam_direction: str | None = field(
        default=None,
        metadata={
            "help": "Where eps comes from: gradient (a clean pass, then the ascent rule) or momentum (Momentum-SAM:"
            " eps = -rho m/||m|| from the optimizer's first moment, one pass per step). Default: from the preset.",
            "choices": list(DIRECTIONS),
        },
    )
    sam_ascent: str | None = field(
        default=None,
        metadata={
            "help": "Ascent rule: sam (eps = rho g/||g||), adaptive (ASAM: eps = rho T^2 g/||T g||, T = |w| + eta,"
            " T = 1 on biases unless sam_adaptive_bias), unnormalized (USAM: eps = rho g) or fsam (Friendly SAM)."
            " Default: from the method preset, else sam.",
            "choices": list(ASCENT_CHOICES),
        },
    )
    sam_descent: str | None = field(
        default=None,
        metadata={
            "help": "Descent transform of the method: none, gsam (surrogate-gap) or looksam (reuse of the"
            " orthogonal component). Default: from the method preset.",
            "choices": list(DESCENT_CHOICES),
        },
    )
    sam_renormalize: bool | None = field(
        default=None,
        metadata={
            "help": "Stable SAM: rescale the descent gradient to the norm of the ascent gradient. Default False."
        },
    )
    sam_schedule: str | None = field(
        default=None,
        metadata={
            "help": "When to run SAM (SS-SAM): always, constant (prob. p), piecewise (a until boundary, then b),"
            " linear (p0 to p1), cosine (p0 to p1), every_k (every sam_interval steps). Default always.",
            "choices": list(SCHEDULES),
        },
    )
    sam_probability: float | None = field(
        default=None,
        metadata={"help": "SAM-step probability: c (constant), a (piecewise), p0 (linear, cosine). Default 0.5."},
    )
    sam_probability_end: float | None = field(
        default=None,
        metadata={"help": "b (piecewise) and p1 (linear, cosine). Default: sam_probability."},
    )
    sam_schedule_boundary: float | None = field(
        default=None,
        metadata={"help": "Piecewise schedule: switch from a to b at this share of training. Default 0.5."},
    )
    sam_interval: int | None = field(
        default=None, metadata={"help": "every_k schedule: SAM when global_step mod k == 0. Default 2."}
    )
    sam_micro_batches: int | None = field(
        default=None,
        metadata={
            "help": "mSAM: split each micro-batch into this many shards, one perturbation per shard. Default 1."
        },
    )
    sam_rho_min: float | None = field(
        default=None,
        metadata={
            "help": "GSAM: rho moves linearly with the learning rate from sam_rho (peak lr) to this (lr 0). Default:"
            " unset, a constant sam_rho."
        },
    )
    sam_rho_warmup: float | None = field(
        default=None,
        metadata={
            "help": "Share of the optimizer steps over which rho grows linearly from 0 to sam_rho, in [0, 1]"
            " (1: the whole run). Default: 0 (off), or from the method."
        },
    )
    sam_mask: str | None = field(
        default=None,
        metadata={
            "help": "Sparse SAM mask: none, fisher (SSAM-F) or dynamic (SSAM-D). Default from the method.",
            "choices": list(MASKS),
        },
    )
    sam_sparsity: float = field(
        default=0.5, metadata={"help": "Sparse SAM: share of entries NOT perturbed, in [0, 1)."}
    )
    sam_mask_interval: int | None = field(
        default=None, metadata={"help": "Sparse SAM: optimizer steps between mask updates (default: one epoch)."}
    )
    sam_fisher_samples: int = field(
        default=128, metadata={"help": "SSAM-F: training examples (one per pass) for the Fisher estimate."}
    )
    sam_mask_drop_rate: float = field(
        default=0.5, metadata={"help": "SSAM-D: initial drop rate d0, cosine-decayed to 0 over training."}
    )
    esam_swp: bool | None = field(
        default=None,
        metadata={
            "help": "ESAM's stochastic weight perturbation: each step the ascent keeps each perturbed tensor with"
            " probability esam_beta and skips the weight gradients of the others. Default False (esam: True)."
        },
    )
    esam_beta: float = field(
        default=0.6,
        metadata={"help": "ESAM SWP (esam_swp): probability of keeping each tensor in the ascent."},
    )
    esam_gamma: float | None = field(
        default=None,
        metadata={
            "help": "ESAM SDS: share of each batch (those whose loss rises most at w + eps) used in the descent"
            " pass. 1 = all (default, also for the esam preset; the paper uses 0.5)."
        },
    )
    esam_selection: str = field(
        default="per_class",
        metadata={
            "help": "ESAM SDS: rank the loss rises within each class (per_class, default: every class keeps its"
            " share of the descent) or over the whole batch (batch: the paper's rule). Without class-id labels"
            " (tokens, regression) the ranking is over the batch.",
            "choices": list(ESAM_SELECTIONS),
        },
    )
    # 0.1, not the paper's ViT value 0.4: with AdamW, 0.4 lost 4.8 points to `sam` on the short MNIST benchmark and
    # 0.1 none (docs/methods.md#gsam).
    gsam_alpha: float = field(
        default=0.1, metadata={"help": "GSAM: weight of the orthogonal-component descent (default 0.1)."}
    )
    # 2, not the paper's 5: with nothing reused (alpha 0) the SAM steps are all LookSAM gives, and under AdamW one in
    # five kept 18% of `sam`'s gain on noisy digits, one in three 39%, one in two 87% (constant radius;
    # docs/methods.md#looksam).
    looksam_k: int = field(
        default=2, metadata={"help": "LookSAM: full SAM step every k optimizer steps (the paper's: 5)."}
    )
    looksam_alpha: float = field(
        default=0.0,
        metadata={
            "help": "LookSAM: weight of the reused component on the steps between SAM steps. 0 (default) reuses"
            " nothing: SAM every looksam_k steps. The paper's 0.7 broke training in every benchmark run"
            " (docs/methods.md#looksam)."
        },
    )
    adasam_bias_correction: bool = field(
        default=True,
        metadata={
            "help": "AdaSAM: Adam's bias correction of m and v (on by default: without it the first thousand steps"
            " are several times larger than the learning rate says; false gives the paper's exact rule)."
        },
    )
    fsam_sigma: float = field(default=1.0, metadata={"help": "Friendly SAM: share of the gradient EMA removed."})
    fsam_lambda: float = field(default=0.9, metadata={"help": "Friendly SAM: EMA decay of the gradient."})
    sam_loss_term: str | None = field(
        default=None,
        metadata={
            "help": "One-pass loss term instead of the SAM passes: none, saf (logits of each example saf_lag_epochs"
            " earlier) or mesa (logits of an EMA copy of the model). Default: from the method preset (saf, mesa).",
            "choices": list(LOSS_TERM_CHOICES),
        },
    )
    # 2.4, not the paper's ImageNet 0.3: on the benchmark's noisy-label runs the gain grew with lambda up to 4.8 (the
    # largest tried), and on the clean polarity fine-tune 2.4 did best of 0.3 / 2.4 / 4.8 (docs/methods.md#saf).
    saf_lambda: float = field(
        default=2.4, metadata={"help": "SAF: weight lambda of the KL term (the paper's ImageNet value: 0.3)."}
    )
    saf_tau: float = field(default=5.0, metadata={"help": "SAF: softmax temperature tau (the term is times tau^2)."})
    saf_lag_epochs: int = field(
        default=1, metadata={"help": "SAF: an example's target logits are those recorded this many epochs earlier."}
    )
    saf_start_epoch: float = field(
        default=1.0, metadata={"help": "SAF: add the term from this epoch on (fractional epochs allowed)."}
    )
    # 2.4, not the paper's 0.8: on the benchmark it gained more on every noisy-label task and on the short runs, and
    # lost under a point on the clean long ones (docs/methods.md#mesa).
    mesa_lambda: float = field(
        default=2.4, metadata={"help": "MESA: weight lambda of the KL term (the paper's value: 0.8)."}
    )
    mesa_tau: float = field(default=5.0, metadata={"help": "MESA: softmax temperature tau (the term is times tau^2)."})
    mesa_ema_decay: float = field(
        default=0.999, metadata={"help": "MESA: EMA decay beta of the teacher, v <- beta v + (1 - beta) w, in [0, 1)."}
    )
    # Unset means on for causal LMs only: there the teacher near the starting model raised the held-out loss of
    # the SFT example (docs/methods.md#mesa), while on the classification benchmark the plain 0.999 was measured.
    mesa_ema_warmup: bool | None = field(
        default=None,
        metadata={
            "help": "MESA: warm the teacher's decay up as min(beta, (1 + t) / (10 + t)) after t steps, so a short run"
            " distills from its recent weights rather than from the starting model. Unset: on for causal language"
            " models, off otherwise."
        },
    )
    mesa_start_epoch: float = field(
        default=0.0, metadata={"help": "MESA: add the term from this epoch on (the EMA is updated from the start)."}
    )
    weight_ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "Keep an exponential moving average of the trainable weights (decay warmed up as"
            " min(decay, (1 + t) / (10 + t))), evaluate with it during training and leave it in the model after"
            " training. 0 = off; 0.999 is a usual value. Works with every method, `none` included."
        },
    )

    def __post_init__(self):
        given = self._given_sam_fields()
        # What the user set, before the preset filled the rest: a hyperparameter-search trial resolves again from it.
        self._sam_given = {name: getattr(self, name) for name in given}
        self._resolve_and_check_sam_fields(given)
        if self.deepspeed and self.sam_enabled and self.sam_direction == "momentum":
            raise ValueError(MOMENTUM_UNDER_DEEPSPEED)
        config = deepspeed_config_dict(self.deepspeed) if self.deepspeed else None
        # Checked before TrainingArguments.__post_init__, which would start setting DeepSpeed up. A config not readable
        # here (None) is refused there, by transformers, which says what it takes.
        if config is not None and (self.sam_enabled or self.sam_loss_term != "none"):
            if isinstance(self.deepspeed, dict):
                where = "the deepspeed dict"
            elif os.path.isfile(self.deepspeed):
                where = f"deepspeed={os.fspath(self.deepspeed)!r}"
            else:
                where = "the deepspeed string"  # JSON, or base64-encoded JSON
            check_zero_config(config.get("zero_optimization") or {}, where, sam_step=self.sam_enabled)
            if self.sam_enabled:
                check_zero_data_types(config, where, bf16=bool(self.bf16))
                check_zero_optimizer(config, where, self.sam_method, METHODS[self.sam_method].optimizer)
        with without_shm_comm_build():
            super().__post_init__()  # may set up DeepSpeed's process group: without JIT-building its CPU op
        self._validate_sam_against_training_args()
        self._validate_weight_ema()

    def check_after_changes(self) -> None:
        """Check again what `__post_init__` checked, for fields written after construction.

        `SAMTrainer` calls this: TrainingArguments' `set_optimizer` / `set_training` helpers and plain attribute
        writes (a hyperparameter search trial) skip `__post_init__`, which would let e.g. `--optim` with AdaSAM (its
        own optimizer silently wins), a negative radius or a descent transform in micro mode under accumulation run.

        Raises:
            `ValueError`: When a field changed after construction is invalid, or `sam_method` changed (the fields its
                preset filled at construction belong to the method given then).
        """
        resolved = getattr(self, "_sam_resolved_method", self.sam_method)
        if self.sam_method != resolved:
            raise ValueError(
                f"sam_method was changed from {resolved!r} to {self.sam_method!r} after the arguments were built, so"
                f" the fields the {resolved!r} preset filled would still be its own. Build new arguments with"
                f" sam_method={self.sam_method!r} instead."
            )
        self._validate_sam_fields()
        if self.sam_descent == "looksam" and self.sam_interval != self.looksam_k:
            raise ValueError(
                f"LookSAM's period is looksam_k={self.looksam_k}, but sam_interval={self.sam_interval} (set from"
                " looksam_k when the arguments were built) would run SAM every sam_interval steps. Set looksam_k when"
                " building the arguments."
            )
        self._validate_loss_term_fields()
        self._validate_sam_against_training_args()
        self._validate_weight_ema()

    def _resolve_and_check_sam_fields(self, given: set[str]) -> None:
        self._resolve_sam_preset()
        self._validate_sam_fields()
        self._validate_loss_term_fields()
        self._refuse_a_schedule_without_sam_steps(given)
        self._warn_unused_fields(given)
        self._warn_half_given_schedule(given)
        self._warn_large_radius()

    def _sam_apply_trial(self, trial: dict[str, Any]) -> None:
        """Resolve the `sam_*` fields again with a hyperparameter-search trial's values (`SAMMixin._hp_search_setup`).

        Trainer sets a trial's values with `setattr`, after `__post_init__` filled the fields the user left out from
        the preset and from each other: a searched `sam_rho` left `sam_rho_min` at the old radius (GSAM's schedule
        then shrank the radius along the learning rate), a searched `sam_method` kept the old method's preset, and
        nothing was validated. The trial's values count as given, as on the command line.
        """
        given = {**getattr(self, "_sam_given", {}), **trial}
        for f in fields(SAMArgumentsMixin):
            setattr(self, f.name, given.get(f.name, f.default if f.default is not MISSING else None))
        self._sam_given = given
        self._resolve_and_check_sam_fields(set(given))
        self._validate_sam_against_training_args()
        self._validate_weight_ema()

    @property
    def _has_descent_transform(self) -> bool:
        return self.sam_descent != "none" or bool(self.sam_renormalize)

    @property
    def sam_enabled(self) -> bool:
        """Whether `SAMTrainer` runs the SAM passes (`False` for `none` and the one-pass loss terms saf, mesa)."""
        return self.sam_method != "none" and self.sam_loss_term == "none"

    def _given_sam_fields(self) -> set[str]:
        """The `sam_*` fields set to something other than their default, before the preset fills any."""
        given = set()
        for f in fields(SAMArgumentsMixin):
            default = f.default if f.default is not MISSING else None
            if getattr(self, f.name) != default:
                given.add(f.name)
        return given

    def _unset_value(self, name: str) -> Any:
        """What `name` holds when it is not given: the method's preset value, else the axis default, else the field's
        default."""
        preset = METHODS[self.sam_method].preset
        if name in preset:
            return preset[name]
        if name in AXIS_DEFAULTS:
            return AXIS_DEFAULTS[name]
        default = SAMArgumentsMixin.__dataclass_fields__[name].default
        return None if default is MISSING else default

    def _warn_unused_fields(self, given: set[str]) -> None:
        """One warning naming every field given that the chosen method ignores.

        A field given at the value it would hold anyway is not named: ignoring it changes nothing, and arguments
        rebuilt from `to_dict()` (an argument file written from a run) give every field the preset and the axis
        defaults filled.
        """
        unused = [
            f"{name} (acts only with {setting})"
            for names, setting, applies in ONLY_UNDER
            if not applies(self)
            for name in names
            if name in given and getattr(self, name) != self._unset_value(name)
        ]
        if unused:
            logger.warning(
                f"sam_method={self.sam_method!r} ignores {', '.join(unused)}. Drop these flags, or choose a method"
                " that uses them."
            )

    def _warn_half_given_schedule(self, given: set[str]) -> None:
        """Warn when a preset's moving schedule (ss-sam's ramp, late-sam's switch) gets only one end from the user.

        `--sam_method ss-sam --sam_probability 0.3` reads like "SAM on 30% of the steps", but the preset's linear
        schedule then runs from 0.3 to its own end of 1.0: say so, with the mean, and how to fix the probability.
        """
        ends_given = given & {"sam_probability", "sam_probability_end"}
        moving = self.sam_schedule in ("piecewise", "linear", "cosine")
        if "sam_schedule" in given or not moving or len(ends_given) != 1:
            return
        mean = mean_sam_probability(self)
        logger.warning(
            f"sam_method={self.sam_method!r} runs SAM on a {self.sam_schedule} schedule from sam_probability to"
            f" sam_probability_end; with only {ends_given.pop()} given it goes from"
            f" {self.sam_probability} to {probability_end(self)} (SAM on {mean:.0%} of the steps on average)."
            " For a fixed share p of the steps pass --sam_schedule constant --sam_probability p."
        )

    def _refuse_a_schedule_without_sam_steps(self, given: set[str]) -> None:
        """A SAM method whose schedule can never draw a SAM step, with a probability the user did not give.

        ss-sam, late-sam and asam set sam_probability 0 as the start of their own moving schedule; an explicit
        `--sam_schedule constant` (the paper's fixed p) would otherwise keep that 0 and train without one SAM step.
        An explicit probability wins, as every explicit flag does.
        """
        if not self.sam_enabled or given & {"sam_probability", "sam_probability_end"}:
            return
        if mean_sam_probability(self) > 0:
            return
        raise ValueError(
            f"sam_method={self.sam_method!r} with sam_schedule={self.sam_schedule!r} runs SAM with probability"
            f" sam_probability={self.sam_probability} (the preset's value for its own"
            f" {METHODS[self.sam_method].preset.get('sam_schedule', 'always')} schedule), so no step would run SAM."
            " Pass --sam_probability p (e.g. --sam_probability 0.5 for SAM on half of the steps), or drop"
            " --sam_schedule to keep the preset's schedule."
        )

    def _warn_large_radius(self) -> None:
        if not self.sam_enabled:
            return
        usual = USUAL_MAX_RHO.get(self.sam_ascent, USUAL_MAX_RHO_DEFAULT)
        if self.sam_rho > usual:
            logger.warning(
                f"sam_rho={self.sam_rho} is far above the radii SAM is used with (up to about {usual} for"
                f" sam_ascent={self.sam_ascent!r}; sam 0.05, asam 1 by default). At w + eps the loss may overflow:"
                " such steps are skipped (sam/skipped_updates) and a run of them stops training. Try --sam_rho 0.05."
            )

    def _resolve_sam_preset(self) -> None:
        if self.sam_method not in METHODS:
            raise ValueError(unknown_method_message(self.sam_method))
        interval_given = self.sam_interval is not None
        preset = METHODS[self.sam_method].preset
        # The method whose preset fills the unset fields: changed later, the fields would still be this one's.
        self._sam_resolved_method = self.sam_method
        # Explicit values (not None) win over the preset, which wins over the global default.
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.sam_descent == "looksam" and self.sam_schedule is None:
            self.sam_schedule = "every_k"  # LookSAM's full steps are its schedule, whichever method brings the descent
        for name, default in AXIS_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        # sam_rho_min and sam_probability_end stay None (= sam_rho, sam_probability; read through `gsam.rho_min` and
        # `schedules.probability_end`): filled here, a value changed afterwards (a hyperparameter search trial's
        # setattr, dataclasses.replace) left them at the one of construction (GSAM's lr-following schedule turned on,
        # a ramp back to the old probability).
        if self.sam_descent == "looksam":
            # LookSAM's full steps are the every_k schedule with k = looksam_k: check k before it becomes the interval.
            k = self.looksam_k
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ValueError(f"looksam_k={k!r} must be an integer >= 1 (LookSAM runs full SAM every k steps).")
            if interval_given and self.sam_interval != k:
                raise ValueError(
                    f"LookSAM's period is looksam_k={k}; sam_interval={self.sam_interval} contradicts it. Drop"
                    f" --sam_interval and set --looksam_k {self.sam_interval} instead."
                )
            self.sam_interval = k

    def _validate_sam_fields(self) -> None:
        # The parser checks choices on the command line; these checks hold for arguments built in Python too.
        for name, choices in (
            ("sam_ascent", ASCENT_CHOICES),
            ("sam_direction", DIRECTIONS),
            ("sam_descent", DESCENT_CHOICES),
            ("sam_schedule", SCHEDULES),
            ("sam_mask", MASKS),
            ("sam_accumulation", ACCUMULATION_MODES),
            ("sam_loss_term", LOSS_TERM_CHOICES),
            ("esam_selection", ESAM_SELECTIONS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is unknown; use one of {', '.join(choices)}.")
        for f in fields(SAMArgumentsMixin):
            # A string such as "false" given in Python would read as true; the parser converts its own strings.
            value = getattr(self, f.name)
            kind = _bool_field_kind(f.type)
            if kind is not None and not isinstance(value, bool) and not (kind == "optional" and value is None):
                raise ValueError(f"{f.name}={value!r} must be True or False (a bool, not {type(value).__name__}).")
        optim = str(getattr(self.optim, "value", self.optim))
        default_optim = TrainingArguments.__dataclass_fields__["optim"].default
        own = METHODS[self.sam_method].optimizer
        if own is not None and optim != str(getattr(default_optim, "value", default_optim)):
            raise ValueError(
                f"sam_method={self.sam_method!r} brings its own optimizer ({own.__name__}), so optim={optim!r} would"
                " be ignored. Drop --optim, or use --sam_method sam with that optimizer."
            )
        for name in ("sam_rho", "sam_adaptive_eta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a finite number >= 0; set e.g. --{name} 0.05.")
        for name in (
            "sam_probability",
            "sam_probability_end",
            "sam_schedule_boundary",
            "fsam_sigma",
            "gsam_alpha",
            "looksam_alpha",
            "sam_rho_min",
            "sam_rho_warmup",
        ):
            value = getattr(self, name)
            if name in ("sam_rho_min", "sam_probability_end") and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a finite number >= 0.")
        for name in ("sam_probability", "sam_probability_end", "sam_schedule_boundary", "sam_rho_warmup"):
            if getattr(self, name) is not None and getattr(self, name) > 1:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1].")
        if not (isinstance(self.sam_sparsity, (int, float)) and 0 <= self.sam_sparsity < 1):
            raise ValueError(f"sam_sparsity={self.sam_sparsity!r} must lie in [0, 1) (the share NOT perturbed).")
        if not (isinstance(self.sam_mask_drop_rate, (int, float)) and 0 <= self.sam_mask_drop_rate <= 1):
            raise ValueError(f"sam_mask_drop_rate={self.sam_mask_drop_rate!r} must lie in [0, 1].")
        if self.sam_mask_interval is not None and (
            not isinstance(self.sam_mask_interval, int) or self.sam_mask_interval < 1
        ):
            raise ValueError(f"sam_mask_interval={self.sam_mask_interval!r} must be an integer >= 1 (or unset).")
        for name in ("esam_beta", "esam_gamma"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
                raise ValueError(f"{name}={value!r} must lie in (0, 1]; the ESAM paper uses beta 0.6, gamma 0.5.")
        fsam_lambda = self.fsam_lambda
        if not isinstance(fsam_lambda, (int, float)) or isinstance(fsam_lambda, bool) or not 0 <= fsam_lambda < 1:
            raise ValueError(f"fsam_lambda={fsam_lambda!r} must lie in [0, 1); the paper's default is 0.9.")
        for name in ("sam_interval", "looksam_k", "sam_micro_batches", "sam_fisher_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        # After the type checks: it compares sam_micro_batches and the other axes with numbers.
        self._validate_momentum_direction()
        if self.sam_rho_min is not None and self.sam_rho_min > self.sam_rho:
            raise ValueError(f"sam_rho_min={self.sam_rho_min} exceeds sam_rho={self.sam_rho}; it is GSAM's lower end.")
        if self.sam_descent == "looksam" and self.sam_schedule != "every_k":
            raise ValueError(
                f"LookSAM runs full SAM every looksam_k steps; sam_schedule={self.sam_schedule!r} contradicts it."
                " Drop --sam_schedule, or use --sam_method looksam (its schedule is every_k)."
            )
        if self.sam_micro_batches > 1 and self.sam_accumulation == "window":
            raise ValueError(
                f"sam_micro_batches={self.sam_micro_batches} perturbs once per shard, which contradicts"
                " sam_accumulation='window' (one perturbation per window). Use --sam_accumulation micro."
            )
        if self.sam_micro_batches > 1 and self._has_descent_transform:
            raise ValueError(
                "sam_micro_batches > 1 cannot combine with a descent transform (sam_renormalize, gsam, looksam):"
                " they act on the whole window's gradient. Drop one of them."
            )
        if self.esam_swp and self._has_descent_transform:
            # SWP computes no clean gradient for the tensors it drops, and the transforms need the whole g: GSAM and
            # LookSAM would pair g's kept tensors with g~'s all (a shape error, or a silent broadcast), and Stable
            # SAM would rescale the whole descent to ||g_kept|| (about half of ||g|| on the test model).
            raise ValueError(
                "esam_swp=True computes the clean gradient of only the tensors it keeps, and a descent transform"
                " (sam_renormalize, gsam, looksam) needs the whole clean gradient. Drop --esam_swp (ESAM's data"
                " selection, --esam_gamma, combines with them), or drop the descent transform."
            )
        if self.sam_method == "none" and self.sam_rho not in (0, 0.0):
            raise ValueError(
                f"sam_method='none' with sam_rho={self.sam_rho} contradict each other: 'none' never perturbs."
                " Choose a method such as --sam_method sam, or drop --sam_rho."
            )
        for name in ("sam_include", "sam_exclude"):
            pattern = getattr(self, name)
            if pattern is not None and not isinstance(pattern, str):
                # e.g. a YAML list of patterns: `re` would raise a TypeError that names no field.
                raise ValueError(
                    f"{name}={pattern!r} must be one regular expression (a str); join patterns with |, e.g."
                    " 'bias|LayerNorm'."
                )
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"{name}={pattern!r} is not a valid regular expression: {err}.") from err

    def _validate_loss_term_fields(self) -> None:
        """SAF / MESA fields, and the SAM axes a one-pass loss term cannot combine with."""
        for name in ("saf_lambda", "saf_tau", "mesa_lambda", "mesa_tau"):
            value = getattr(self, name)
            finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not finite or value <= 0:
                raise ValueError(f"{name}={value!r} must be a finite number > 0 (lambda: SAF and MESA 2.4; tau 5).")
        for name in ("saf_start_epoch", "mesa_start_epoch"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a finite number of epochs >= 0.")
        lag = self.saf_lag_epochs
        if not isinstance(lag, int) or isinstance(lag, bool) or lag < 1:
            raise ValueError(f"saf_lag_epochs={lag!r} must be an integer >= 1 (epochs between record and use).")
        decay = self.mesa_ema_decay
        if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0 <= decay < 1:
            raise ValueError(f"mesa_ema_decay={decay!r} must lie in [0, 1); the default is 0.999.")
        if self.mesa_ema_warmup is not None and not isinstance(self.mesa_ema_warmup, bool):
            raise ValueError(
                f"mesa_ema_warmup={self.mesa_ema_warmup!r} must be True, False or unset (on for causal LMs only)."
            )
        if self.sam_loss_term == "none":
            return
        term = self.sam_loss_term
        if self.sam_method == "none":
            raise ValueError(
                f"sam_method='none' with sam_loss_term={term!r} contradict each other: 'none' is the plain Trainer."
                f" Use --sam_method {term}."
            )
        # A loss-term method runs Trainer's one pass per micro-batch: the SAM-step axes have nothing to act on.
        conflicts = {
            "sam_rho": self.sam_rho > 0,
            "sam_mask": self.sam_mask != "none",
            "esam_swp": bool(self.esam_swp),
            "sam_descent": self.sam_descent != "none",
            "sam_renormalize": bool(self.sam_renormalize),
            "sam_micro_batches": self.sam_micro_batches > 1,
            "sam_schedule": self.sam_schedule != "always",
        }
        self._refuse_conflicts(
            conflicts,
            f"sam_loss_term={term!r} runs one plain pass per step and never perturbs the weights",
            "choose a SAM method",
        )

    def _validate_momentum_direction(self) -> None:
        """Momentum-SAM has no clean gradient: the axes that act on it have nothing to act on."""
        if self.sam_direction != "momentum":
            return
        conflicts = {
            "sam_ascent": self.sam_ascent != "sam",
            "sam_mask": self.sam_mask != "none",
            "esam_swp": bool(self.esam_swp),
            "esam_gamma": self.esam_gamma < 1,
            "sam_descent": self.sam_descent != "none",
            "sam_renormalize": bool(self.sam_renormalize),
            "sam_micro_batches": self.sam_micro_batches > 1,
            "sam_accumulation": self.sam_accumulation == "micro",
            "sam_loss_term": self.sam_loss_term != "none",
        }
        self._refuse_conflicts(
            conflicts,
            "sam_direction='momentum' takes eps from the optimizer's momentum, once per step, without a clean"
            " gradient",
            "use --sam_direction gradient",
        )

    def _refuse_conflicts(self, conflicts: dict[str, bool], why: str, fix: str) -> None:
        """A `ValueError` naming the first field marked as conflicting: `why` it has nothing to act on, and `fix`."""
        for name, conflict in conflicts.items():
            if conflict:
                raise ValueError(
                    f"{why}, so {name}={getattr(self, name)!r} has nothing to act on. Drop --{name}, or {fix}."
                )

    def _validate_weight_ema(self) -> None:
        decay = self.weight_ema_decay
        if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0 <= decay < 1:
            raise ValueError(
                f"weight_ema_decay={decay!r} must lie in [0, 1): 0 turns the average off, 0.999 is usual."
            )
        if decay > 0 and self.load_best_model_at_end:
            raise ValueError(
                "weight_ema_decay evaluates the averaged weights while checkpoints keep the trained ones, so"
                " load_best_model_at_end would reload weights that were never scored. Drop --load_best_model_at_end"
                " (the model left after training is the average), or --weight_ema_decay."
            )
        if decay > 0 and str(getattr(self.save_strategy, "value", self.save_strategy)) == "best":
            # The checkpoint named best is chosen by the average's score but its model files hold the trained
            # weights, which score otherwise (measured: eval_loss 1.134 for the average, 1.339 for its model files).
            raise ValueError(
                "weight_ema_decay evaluates the averaged weights while checkpoints keep the trained ones, so"
                " save_strategy='best' would name best a checkpoint whose model files were never scored. Use"
                " --save_strategy steps or epoch (the model left after training is the average), or drop"
                " --weight_ema_decay."
            )

    def _validate_sam_against_training_args(self) -> None:
        if not self.sam_enabled:
            return
        if self._has_descent_transform and self.sam_accumulation == "micro" and self.gradient_accumulation_steps > 1:
            raise ValueError(
                "Descent transforms (sam_renormalize, gsam, looksam) act on the whole window's gradient: with"
                " gradient_accumulation_steps > 1 use --sam_accumulation window."
            )
        optim = str(getattr(self.optim, "value", self.optim))
        if optim in FUSED_BACKWARD_OPTIMS or optim.endswith("_layerwise"):
            raise ValueError(
                f"optim={optim!r} updates the weights inside backward(), which would step at the perturbed weights."
                " Choose another --optim (e.g. adamw_torch) or sam_method='none'."
            )
        fsdp_on = bool(self.fsdp)
        if fsdp_on:
            version = int((self.fsdp_config or {}).get("version", (self.fsdp_config or {}).get("fsdp_version", 1)))
            if version != 2:
                raise ValueError(
                    "hf_sam supports FSDP2 only (fully_shard, DTensor gradients): set fsdp_config={'version': 2}."
                )
            if self.sam_ascent_sync is False:
                raise ValueError(LOCAL_ASCENT_UNDER_FSDP)
            if self.esam_swp:
                raise ValueError(
                    "ESAM's stochastic weight perturbation (esam_swp) skips weight gradients in each rank's own"
                    " ascent, and FSDP always syncs the ascent: run ESAM under DDP, or keep its data selection alone"
                    " under FSDP with --esam_swp false."
                )
            self.sam_ascent_sync = True
        elif self.sam_ascent_sync is None:
            self.sam_ascent_sync = False


def _add_preset_values_to_help(cls: type) -> None:
    """Append to the `--help` of each field a preset sets the value every preset gives it: argparse shows `(default:
    None)` there, and a default a help text states holds only for the methods not listed. Read from `METHODS`, so a
    new or changed preset shows without touching the help texts."""
    for f in fields(cls):
        values = [f"{method} {info.preset[f.name]}" for method, info in METHODS.items() if f.name in info.preset]
        if values:
            help_text = f"{f.metadata['help']} Presets: {', '.join(values)}."
            f.metadata = MappingProxyType({**f.metadata, "help": help_text})


_add_preset_values_to_help(SAMArgumentsMixin)


@dataclass
class SAMTrainingArguments(SAMArgumentsMixin, TrainingArguments):
    __doc__ = "[`~transformers.TrainingArguments`] plus the `sam_*` fields of [`SAMArgumentsMixin`].\n\n" + (
        SAMArgumentsMixin.__doc__ or ""
    )


@dataclass
class SAMSeq2SeqTrainingArguments(SAMArgumentsMixin, Seq2SeqTrainingArguments):
    __doc__ = "[`~transformers.Seq2SeqTrainingArguments`] plus the `sam_*` fields of [`SAMArgumentsMixin`].\n\n" + (
        SAMArgumentsMixin.__doc__ or ""
    )
