"""The guard against a non-finite loss at w + eps: the update of such a step is dropped, not applied."""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers.utils import logging


logger = logging.get_logger(__name__)

# SAM steps in a row whose loss at w + eps was not finite (their updates dropped) before training stops: one is a
# bad batch, a run of them means the radius throws every step out of the region where the loss is finite.
MAX_SKIPPED_UPDATES_IN_A_ROW = 5


class UpdateGuard:
    """Whether every descent pass of the current SAM step had a finite loss (a device flag, no host sync per pass),
    and how many SAM steps in a row had their update dropped. See docs/methods.md#non-finite-values."""

    def __init__(self):
        self.finite: torch.Tensor | None = None
        self.skipped_in_a_row = 0
        # Whether the step being taken had its update dropped: the weight average must not fold in its unchanged
        # weights as a new iterate. Read and cleared after the optimizer step (`take_dropped`).
        self.dropped = False

    def note(self, loss: torch.Tensor) -> None:
        """Record one descent pass's loss."""
        finite = torch.isfinite(loss.detach())
        self.finite = finite if self.finite is None else self.finite & finite

    def forget_step(self) -> None:
        self.finite = None

    def take_dropped(self) -> bool:
        """Whether the update of the optimizer step just taken was dropped; cleared for the next step (a plain step
        of a schedule never asks the guard)."""
        dropped, self.dropped = self.dropped, False
        return dropped

    def update_is_finite(self, trainer) -> bool:
        """At the end of a SAM step: True when its descent losses were finite; else its update is dropped.

        A loss finite at w but not at w + eps (a radius too large for the model, an overflow) leaves NaN or inf in the
        descent gradient, which the optimizer step would carry into the weights for good. The step's gradients are
        dropped instead, so `optimizer.step()` leaves w and the optimizer state untouched (under fp16 the loss scaler's
        own skip drops it); the drop is counted in `sam/skipped_updates`, and a run
        of `MAX_SKIPPED_UPDATES_IN_A_ROW` stops training with an error naming the radius. The check reads one flag on
        the host per SAM step, where Trainer's own NaN filter (`logging_nan_inf_filter`) reads the step's loss anyway.
        """
        finite, self.finite = self.finite, None
        if finite is None:
            return True
        scaler = getattr(trainer.accelerator, "scaler", None)
        zero = trainer._sam.zero
        # fp16 loss scaling (AMP's or DeepSpeed's) skips a step whose gradient overflowed itself, and lowers its scale.
        # A loss that is not finite before it is scaled is no scale's doing: the scaler would skip every such step,
        # halving its scale each time, without a word. The steps are counted and stop the run as without fp16.
        loss_scaled = (scaler is not None and scaler.is_enabled()) or (zero is not None and bool(zero.loss_scale()))
        finite = finite.to(torch.int32)
        if trainer.accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # the descent gradient is shared: so is the decision
        skipped = not bool(finite)
        trainer._sam_metrics.add("sam/skipped_updates", float(skipped))
        self.dropped = skipped
        if not skipped:
            self.skipped_in_a_row = 0
            return True
        if not loss_scaled:  # the loss scaler finds the NaN in the gradient and skips the step itself
            trainer._sam.drop_update()
        self.skipped_in_a_row += 1
        step, rho = trainer.state.global_step, trainer._sam_rho()
        if self.skipped_in_a_row >= MAX_SKIPPED_UPDATES_IN_A_ROW:
            raise RuntimeError(
                f"The loss at the perturbed weights w + eps was not finite in {self.skipped_in_a_row} SAM steps in a"
                f" row (at step {step}), so none of them updated the weights: sam_rho={rho} moves the weights out of"
                f" the region where this model's loss is finite. Lower --sam_rho (e.g. {rho / 10:g}); the weights are"
                " those before these steps."
            )
        if self.skipped_in_a_row == 1:
            logger.warning(
                f"Step {step}: the loss at w + eps was not finite (sam_rho={rho}), so this step's update was dropped"
                " (counted in sam/skipped_updates). If it repeats, lower --sam_rho."
            )
        return False
