"""A loud report when a SAM run does not train: the training loss still at its first logged value.

A radius too large for the model does not always make the loss at w + eps non-finite (which `guard.py` catches).
On a pretrained model fine-tuned with little data it can instead spoil the features within the first steps: the
descent gradient at w + eps, several times larger than the clean one and pointing partly elsewhere, is applied at
full learning rate by an adaptive optimizer, after which the encoder's output carries no information and the model
settles at the class prior (loss ln C) for the rest of the run. Nothing is non-finite and nothing is skipped, so the
run ends at chance level without a word. This check reads the losses Trainer already logs (on the host): no sync.
"""

from __future__ import annotations

from transformers.utils import logging


logger = logging.get_logger(__name__)

# The check looks at runs whose first log comes in their first tenth (not a resume late in a converged run), once a
# quarter of training has gone by; a loss that has not fallen by 1% by then has not trained.
FIRST_LOG_BY = 0.1
CHECK_AFTER = 0.25
MIN_FALL = 0.01


class StallWatch:
    """Warns once per `train()` call when the logged training loss has not fallen after `CHECK_AFTER` of training."""

    def __init__(self):
        self.first_loss: float | None = None
        self.first_progress: float | None = None
        self.warned = False

    def observe(self, loss: float, sharpness: float | None, step: int, max_steps: int, rho: float) -> bool:
        """Look at one logged training loss; returns whether it warned."""
        if self.warned or max_steps <= 0 or rho <= 0:
            return False
        progress = step / max_steps
        if self.first_loss is None:
            self.first_loss, self.first_progress = loss, progress
            return False
        if self.first_progress > FIRST_LOG_BY or progress - self.first_progress < CHECK_AFTER:
            return False
        if loss < (1 - MIN_FALL) * self.first_loss:
            self.first_progress = float("inf")  # it trains: nothing more to check in this run
            return False
        rise = f", while the loss at w + eps runs {sharpness:.3g} above it" if sharpness is not None else ""
        logger.warning(
            f"SAM: after {100 * progress:.0f}% of training the training loss ({loss:.4g}) is no lower than at the"
            f" start ({self.first_loss:.4g}){rise}. sam_rho={rho:g} is likely too large for this model: on a"
            " pretrained model the first perturbed steps can spoil its features and leave it at the class prior for"
            f" the rest of the run. Lower --sam_rho (e.g. {rho / 3:.3g}), or compare with --sam_rho 0."
        )
        self.warned = True
        return True
