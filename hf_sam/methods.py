"""The method registry: each name is a preset over the axes of `SAMArgumentsMixin`.

A preset only fills fields the user left unset (`None`); any flag given explicitly wins. Adding a method is
one entry here (plus, when it needs new math, one module that the axes select).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from .optim import AdaSAMOptimizer


@dataclass(frozen=True)
class Capabilities:
    """Where a method runs and what it asks of the run; `tests/test_trainer.py` checks each flag against behaviour.

    Args:
        ddp (`bool`): Runs under DDP (several processes, replicated weights).
        fsdp2 (`bool`): Runs under FSDP2 (sharded weights); False: refused there with a `ValueError`.
        deepspeed (`bool`): Runs under DeepSpeed ZeRO stage 1 and 2 (`tests/distributed/zero_check.py` compares it
            with DDP); False: refused there with a `ValueError`.
        stateful (`bool`): Its pieces keep state from step to step (a mask, an average, a reused gradient, a
            teacher); checkpoints carry it and resume restores it.
        needs_indices (`bool`): Reads each example's index; `SAMTrainer` adds the column to the training data.
    """

    ddp: bool = True
    fsdp2: bool = True
    deepspeed: bool = True
    stateful: bool = False
    needs_indices: bool = False


STATELESS = Capabilities()
STATEFUL = Capabilities(stateful=True)


@dataclass(frozen=True)
class MethodInfo:
    """What a method name stands for.

    Args:
        paper (`str`): Short citation shown in `--help` and the README.
        cost (`str`): Forward+backward passes per optimizer step relative to the base optimizer.
        preset (`dict[str, Any]`): Values for the `sam_*` fields that the user did not set (fields whose default is
            None, so an explicit flag always wins; a test checks this).
        optimizer (`type`, *optional*): The optimizer class the method brings (AdaSAM), built by Trainer with its
            usual parameter groups from `learning_rate`, `adam_beta1/2` and `adam_epsilon`; the user's own optimizer
            or `--optim` is then refused.
        capabilities (`Capabilities`): Where it runs and what it needs.
    """

    paper: str
    cost: str
    preset: dict[str, Any] = field(default_factory=dict)
    optimizer: type | None = None
    capabilities: Capabilities = STATELESS


# ASAM's preset. With the paper's T = 1 on biases and T = |w| + 0.01 elsewhere, the biases carry ~100% of ||eps||^2
# on the benchmark models (benchmarks/perturbation_size.py): on noisy digits it gained +0.8 where `sam` gained +4.7.
# With T = |b| + eta on the biases too, eps lands on the largest |w| and rho acts in relative units: 1, in the
# paper's range. At that radius from the first step it broke a one-epoch fine-tune (-13.7 points against `none`);
# on ss-sam's ramp the early steps run plain, and it stayed within 2 points of `sam` on every benchmark task at 1.5
# passes (docs/methods.md#asam).
ASAM_RHO = 1.0

# ESAM's radius: SWP scales eps on the kept tensors by 1/beta, so its norm is rho/beta; 0.03 with beta 0.6 gives
# SAM's 0.05. At the paper's 0.05 (norm 0.083) the preset lost 2.6 points to `sam` on MNIST (docs/methods.md#esam).
ESAM_RHO = 0.03

# Momentum-SAM's radius, from the grid 0.05 / 0.2 / 0.5 / 1 on the long noisy-label run with AdamW
# (benchmarks/README.md#regimes-long-runs-little-data-noisy-labels): 0.05 did nothing, 1 broke some seeds, 0.2
# gained most.
MOMENTUM_SAM_RHO = 0.2

# ssam-d's radius, 0.05 * sqrt(2). eps is normalized by the full gradient norm and then masked: under the first mask
# (a random half of the entries) ||eps|| is about rho/sqrt(2), under the refreshed ones 0.95-0.98 rho (noisy digits).
# At 0.05 it kept 50%, 81% and -8% of `sam`'s gain on the three benchmark tasks where `sam` gains beyond its
# spread; at 0.0707 98%, 130% and 97%, and it stayed within 2 points of `sam` on the short runs
# (docs/methods.md#ssam-d).
SSAM_D_RHO = 0.07071

# ss-sam's schedule: SAM with a probability rising linearly from 0 to 1 over training (mean 0.5).
SAM_RAMP = {"sam_schedule": "linear", "sam_probability": 0.0, "sam_probability_end": 1.0}

# ss-sam's radius. On the ramp the early steps run plain and most SAM steps come late; there 0.1 gained more than
# 0.05 on all four long benchmark runs where both ran (noisy digits +5.2 against +2.3, polarity
# +1.1 +- 0.1 against +0.3 +- 1.5) and kept 86-112% of `sam`'s gain at 1.5 passes, where 0.05 kept 26-83%; on the
# short runs the two were within noise (docs/methods.md#ss-sam).
SS_SAM_RHO = 0.1

# LookSAM's radius grows linearly over the whole run (sam_rho_warmup 1). On the 500-sentence MiniLM fine-tunes a
# constant 0.1 from the first step is near the radius that spoils the pretrained encoder: it left one clean seed of
# 13 at the class prior for 40% of the run and one noisy-label seed of 10 there at the end, and kept 19% of `sam`'s
# gain on the clean one (61% on the noisy one); a constant 0.07 kept none on the noisy one. Grown, no run stalled and
# it kept 71-90% on the other tasks where `sam` gains; it does not stop that noisy fine-tune from fitting its flipped
# labels (docs/methods.md#looksam).
LOOKSAM_RHO_WARMUP = 1.0

# late-sam's radius. SAM runs only for the last eighth of training; there 0.1 gained more than 0.05 on all three
# noisy-label runs (noisy digits +3.2 +- 1.5 against +1.6 +- 0.9), was even on the clean ones and within a point on
# the short runs (docs/methods.md#late-sam).
LATE_SAM_RHO = 0.1

# Literal registry: name -> preset. `tests/test_trainer.py` fails when a name here has no row in
# `tests/method_cases.py`.
METHODS: dict[str, MethodInfo] = {
    "none": MethodInfo("plain Trainer (no perturbation)", "1.0", {"sam_rho": 0.0}),
    "sam": MethodInfo("Foret et al. 2021, arXiv 2010.01412", "2.0", {"sam_rho": 0.05}),
    "asam": MethodInfo(
        "Kwon et al. 2021, arXiv 2102.11600",
        "1 + mean p (1.5)",
        {
            "sam_rho": ASAM_RHO,
            "sam_ascent": "adaptive",
            "sam_adaptive_eta": 0.01,
            "sam_adaptive_bias": True,
            **SAM_RAMP,
        },
    ),
    "ss-sam": MethodInfo(
        "Zhao et al. 2022, arXiv 2203.09962",
        "1 + mean p (1.5)",
        # p ramps from 0 to 1 (mean 0.5): at the cost of a constant 0.5 it gained more on 3 of 4 regime tasks and
        # the same on the fourth (docs/methods.md#ss-sam). `--sam_schedule constant --sam_probability p` is the
        # paper's fixed p.
        {"sam_rho": SS_SAM_RHO, **SAM_RAMP},
    ),
    "late-sam": MethodInfo(
        "Zhou et al. 2024, arXiv 2410.10373 (SAM in the late phase)",
        "1 + 0.125",
        {
            "sam_rho": LATE_SAM_RHO,
            "sam_schedule": "piecewise",
            "sam_probability": 0.0,
            "sam_probability_end": 1.0,
            "sam_schedule_boundary": 0.875,
        },
    ),
    "momentum-sam": MethodInfo(
        "Becker et al. 2024, arXiv 2401.12033",
        "1.0",
        {"sam_rho": MOMENTUM_SAM_RHO, "sam_direction": "momentum"},
        # ZeRO partitions the optimizer's moments into flat buffers, out of reach of a per-parameter perturbation.
        capabilities=Capabilities(deepspeed=False),
    ),
    "stable-sam": MethodInfo(
        "Tan et al. 2024, arXiv 2401.07250",
        "2.0",
        # SAM's normalized ascent (the repository's `SAM(stable=True)`); the paper's USAM ascent eps = rho g is
        # `--sam_ascent unnormalized`: its radius scales with ||g||, which lost 2.5-2.7 points to `sam` on the
        # from-scratch benchmark runs (docs/methods.md#stable-sam).
        {"sam_rho": 0.05, "sam_renormalize": True},
    ),
    "adasam": MethodInfo("Sun et al. 2023, arXiv 2303.00565", "2.0", {"sam_rho": 0.05}, AdaSAMOptimizer),
    "msam": MethodInfo(
        "Behdin et al. 2022, arXiv 2212.04343",
        "2.0",
        {"sam_rho": 0.05, "sam_micro_batches": 4, "sam_accumulation": "micro"},
    ),
    "looksam": MethodInfo(
        "Liu et al. 2022, arXiv 2203.02714",
        "1 + 1/k",
        {"sam_rho": 0.1, "sam_rho_warmup": LOOKSAM_RHO_WARMUP, "sam_descent": "looksam", "sam_schedule": "every_k"},
        capabilities=STATEFUL,  # g_v, when looksam_alpha > 0
    ),
    "gsam": MethodInfo("Zhuang et al. 2022, arXiv 2203.08065", "2.0", {"sam_rho": 0.05, "sam_descent": "gsam"}),
    "fsam": MethodInfo(
        "Li et al. 2024, arXiv 2403.12350", "2.0", {"sam_rho": 0.05, "sam_ascent": "fsam"}, capabilities=STATEFUL
    ),
    "esam": MethodInfo(
        "Du et al. 2022, arXiv 2110.03141",
        "2 - (1 - beta)/3 = 1.87; with data selection (--esam_gamma g) 1 + 1/3 + g - (1 - beta)/3",
        {"sam_rho": ESAM_RHO, "esam_swp": True},
        capabilities=Capabilities(fsdp2=False),  # SWP needs each rank's own ascent (docs/methods.md#esam)
    ),
    "ssam-f": MethodInfo(
        "Mi et al. 2022, arXiv 2210.05177 (Fisher mask)",
        "2.0 + mask work",
        {"sam_rho": 0.05, "sam_mask": "fisher"},
        capabilities=STATEFUL,
    ),
    "ssam-d": MethodInfo(
        "Mi et al. 2022, arXiv 2210.05177 (dynamic mask)",
        "2.0 + mask work",
        {"sam_rho": SSAM_D_RHO, "sam_mask": "dynamic"},
        capabilities=STATEFUL,
    ),
    # One-pass loss terms (hf_sam/saf.py, hf_sam/mesa.py): Trainer's own pass plus a KL term, no perturbation.
    "saf": MethodInfo(
        "Du et al. 2022, arXiv 2205.14083 (Sharpness-Aware training for Free)",
        "1.0",
        {"sam_rho": 0.0, "sam_loss_term": "saf"},
        capabilities=Capabilities(stateful=True, needs_indices=True),
    ),
    "mesa": MethodInfo(
        "Du et al. 2022, arXiv 2205.14083 (MESA, memory-efficient SAF)",
        "about 1.15-1.35 (one no-grad forward of the EMA teacher)",
        {"sam_rho": 0.0, "sam_loss_term": "mesa"},
        capabilities=STATEFUL,
    ),
}

# Values used when neither the user nor the preset sets an axis field.
AXIS_DEFAULTS: dict[str, Any] = {
    "sam_rho": 0.05,
    "sam_adaptive_eta": 0.01,
    "sam_adaptive_bias": False,
    "sam_rho_warmup": 0.0,
    "sam_ascent": "sam",
    "sam_direction": "gradient",
    "sam_descent": "none",
    "sam_renormalize": False,
    "sam_schedule": "always",
    "sam_probability": 0.5,
    "sam_micro_batches": 1,
    "sam_accumulation": "window",
    "sam_mask": "none",
    "sam_loss_term": "none",
    "esam_gamma": 1.0,
    "esam_swp": False,
    "sam_interval": 2,
    "sam_schedule_boundary": 0.5,
}


def _spelling(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def unknown_method_message(value: str) -> str:
    """The error for an unregistered `sam_method`: the valid names, and the closest one when there is one.

    Case and separators do not count ('SAM', 'ssam_d', 'SS SAM' point to sam, ssam-d, ss-sam); otherwise the
    closest spelling by `difflib` is suggested.
    """
    same = [name for name in METHODS if _spelling(name) == _spelling(value)]
    close = same or difflib.get_close_matches(str(value).lower(), list(METHODS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"sam_method={value!r} is not a known method.{hint} Choose one of: {', '.join(METHODS)}."
