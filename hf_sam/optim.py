"""AdaSAM's base optimizer (Sun et al. 2023, arXiv 2303.00565): AMSGrad, with Adam's bias correction by default.
docs/methods.md#adasam."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class AdaSAMOptimizer(torch.optim.Optimizer):
    """m = b1 m + (1-b1) s, v = b2 v + (1-b2) s^2, v_hat = max(v_hat, v) (v_hat starts at eps^2),
    w <- w - lr_t m / sqrt(v_hat), with AdamW-style decoupled weight decay w <- w (1 - lr wd).

    lr_t = lr sqrt(1 - b2^t) / (1 - b1^t) at step t with `bias_correction` (Adam's correction of m and v), else lr
    (the paper's rule). Without the correction m / sqrt(v_hat) starts near (1 - b1) / sqrt(1 - b2) = 3.2 and is
    still about 2 after 300 steps: the steps are several times what `lr` says until t is well past 1 / (1 - b2).

    `s` is whatever sits in `.grad` at `step()`: inside `SAMTrainer` that is the SAM gradient.

    Args:
        params (`Iterable`): Parameters or parameter groups.
        lr (`float`, defaults to 1e-3): Learning rate.
        betas (`tuple[float, float]`, defaults to (0.9, 0.999)): EMA decays of the first and second moments.
        eps (`float`, defaults to 1e-8): v_hat starts at eps^2, so the first steps are bounded by lr m / eps.
        weight_decay (`float`, defaults to 0.0): Decoupled weight decay.
        bias_correction (`bool`, defaults to True): Adam's bias correction; False is the paper's AMSGrad.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
    ):
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Invalid AdaSAM hyperparameters: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, {**defaults, "bias_correction": bias_correction, "step": 0})

    @staticmethod
    def kwargs_from(args) -> dict:
        """Its keyword arguments from `SAMTrainingArguments` (Trainer adds the parameter groups and weight decay)."""
        return {
            "lr": args.learning_rate,
            "betas": (args.adam_beta1, args.adam_beta2),
            "eps": args.adam_epsilon,
            "bias_correction": args.adasam_bias_correction,
        }

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            group["step"] += 1  # per group: saved with the param groups in optimizer.pt
            step_size = group["lr"]
            if group["bias_correction"]:
                step_size *= (1 - beta2 ** group["step"]) ** 0.5 / (1 - beta1 ** group["step"])
            for p in params:
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                    state["v_hat"] = torch.full_like(p, group["eps"] ** 2)
            grads = [p.grad for p in params]
            m = [self.state[p]["m"] for p in params]
            v = [self.state[p]["v"] for p in params]
            v_hat = [self.state[p]["v_hat"] for p in params]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            torch._foreach_maximum_(v_hat, v)
            denom = torch._foreach_sqrt(v_hat)
            torch._foreach_addcdiv_(params, m, denom, value=-step_size)
        return loss
