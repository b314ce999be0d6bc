"""Momentum-SAM (Becker et al. 2024, arXiv 2401.12033): the perturbation comes from the optimizer's momentum.

SAM spends a whole forward+backward on the ascent direction. Momentum-SAM takes it from what the optimizer already
keeps: the step's one pass runs at w - rho m / ||m||, where m is the first moment (Adam's `exp_avg`, SGD's
`momentum_buffer`), and the update is applied from w. Since m points where past gradients pointed, -m leads along
the coming update: the gradient is read ahead on the trajectory, the look-ahead of Nesterov momentum stretched to
a fixed radius, which the paper shows flattens the minimum like SAM's ascent at the cost of one pass.
"""

from __future__ import annotations

import torch


# torch's Adam/AdamW, SGD with momentum, transformers' Adafactor with beta1, and AdaSAMOptimizer ("m"; without it
# the direction found no moment there and silently ran plain AdaSAM steps).
MOMENTUM_KEYS = ("exp_avg", "momentum_buffer", "m")
MOMENTUM_UNDER_DEEPSPEED = (
    "sam_direction='momentum' (momentum-sam) reads the optimizer's first moment per parameter, and DeepSpeed ZeRO"
    " keeps it in flat partitions: run momentum-sam under DDP or FSDP2, or use --sam_method sam under DeepSpeed."
)


def base_optimizer(optimizer):
    """The optimizer that holds the state, under accelerate's (and any other) wrapper."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def keeps_momentum(optimizer) -> bool:
    """Whether every parameter group keeps a first moment: Adam-style betas, SGD's momentum > 0, or transformers'
    Adafactor with `beta1` set (its groups hold `beta1`, None when it keeps no `exp_avg`)."""
    groups = base_optimizer(optimizer).param_groups
    return all("betas" in group or group.get("momentum", 0) > 0 or group.get("beta1") is not None for group in groups)


def holds_moments(optimizer, params: list[torch.Tensor]) -> bool:
    """Whether the optimizer has stepped any of `params` (it builds its state, the first moment with it, at the first
    update of each parameter): before that there is nothing to perturb along, and the step is a plain one."""
    state = base_optimizer(optimizer).state
    return any(param in state for param in params)


def first_moments(optimizer, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Each parameter's first moment, or None where the optimizer has not stepped it yet.

    Raises:
        `ValueError`: the optimizer has stepped a parameter and keeps its moment under no known key (it would
            otherwise never be perturbed, and every step would silently be a plain one).
    """
    state = base_optimizer(optimizer).state
    moments = []
    for param in params:
        entry = state.get(param, {})
        moment = next((entry[key] for key in MOMENTUM_KEYS if key in entry), None)
        if moment is None and entry:
            name = type(base_optimizer(optimizer)).__name__
            raise ValueError(
                f"sam_direction='momentum' (momentum-sam) perturbs along the optimizer's first moment, which it"
                f" reads from the state keys {', '.join(MOMENTUM_KEYS)}; {name} keeps {', '.join(map(str, entry))}"
                " instead. Use --optim adamw_torch, SGD with momentum > 0, or a gradient-direction method such as"
                " --sam_method sam."
            )
        moments.append(moment)
    return moments


def no_momentum_message(optimizer) -> str:
    name = type(base_optimizer(optimizer)).__name__
    return (
        f"sam_direction='momentum' (momentum-sam) perturbs along the optimizer's first moment, and {name} keeps"
        " none (no Adam betas, no SGD momentum > 0, no Adafactor beta1). Use --optim adamw_torch, SGD with momentum"
        " > 0, Adafactor with beta1, or a gradient-direction method such as --sam_method sam."
    )
