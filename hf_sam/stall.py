"""A loud report when a SAM run does not train: the training loss still at its first logged value.

A radius too large for the model does not always make the loss at w + eps non-finite (which `guard.py` catches).
On a pretrained model fine-tuned with little data it can instead spoil the features within the first steps: the
descent gradient at w + eps, several times larger than the clean one and pointing partly elsewhere, is applied at
full learning rate by an adaptive optimizer, after which the encoder's output carries no information and the model
settles at the class prior (loss ln C) for the rest of the run. Nothing is non-finite and nothing is skipped, so the
run ends at chance level without a word. The same can happen later: a run that has begun to learn falls back to the
class prior and stays there. This check reads the losses Trainer already logs (on the host): no sync.
"""

from __future__ import annotations

from transformers.utils import logging


logger = logging.get_logger(__name__)

# The check looks at runs whose first log comes in their first tenth (not a resume late in a converged run), once a
# quarter of training has gone by; a loss that has not fallen by 1% by then has not trained, and one that is back
# there later has fallen back to where it started.
FIRST_LOG_BY = 0.1
CHECK_AFTER = 0.25
MIN_FALL = 0.01
# Logged losses are compared as means over the logs of a span of at least this share of training: a log of a few
# steps (`logging_steps=1`) is the loss of a few batches, which scatters far more than training moves it in between.
# Logs that are this far apart (per epoch of a 10-epoch run) are compared one by one.
SPAN = 0.1
EPS = 1e-9  # step / max_steps is rounded: logs exactly SPAN apart stay apart


class StallWatch:
    """Warns once per `train()` call when, after `CHECK_AFTER` of training, a logged training loss is no lower than
    the first one: the run has not trained, or it trained and fell back."""

    def __init__(self):
        self.first_loss: float | None = None
        self.first_progress: float | None = None
        self.trained = False
        self.warned = False
        self._first_losses: list[float] = []  # the logs within SPAN of the first one, whose mean is `first_loss`
        self._recent: list[tuple[float, float]] = []  # (progress, loss) of the logs within the last SPAN

    def observe(self, loss: float, sharpness: float | None, step: int, max_steps: int, rho: float) -> bool:
        """Look at one logged training loss; returns whether it warned."""
        if self.warned or max_steps <= 0 or rho <= 0:
            return False
        progress = step / max_steps
        if self.first_progress is None:
            self.first_progress = progress
        if progress < self.first_progress + SPAN - EPS and not self._recent:
            self._first_losses.append(loss)
            self.first_loss = sum(self._first_losses) / len(self._first_losses)
            return False
        self._recent = [(p, v) for p, v in self._recent if p > progress - SPAN + EPS] + [(progress, loss)]
        loss = sum(v for _, v in self._recent) / len(self._recent)
        if self.first_progress > FIRST_LOG_BY or progress - self.first_progress < CHECK_AFTER:
            return False
        if loss < (1 - MIN_FALL) * self.first_loss:
            self.trained = True  # keep watching: a run can still fall back to its start
            return False
        what = "is back at its value at the start" if self.trained else "is no lower than at the start"
        rise = f", while the loss at w + eps runs {sharpness:.3g} above it" if sharpness is not None else ""
        logger.warning(
            f"SAM: after {100 * progress:.0f}% of training the training loss ({loss:.4g}) {what}"
            f" ({self.first_loss:.4g}){rise}. sam_rho={rho:g} is likely too large for this model: on a"
            " pretrained model the perturbed steps can spoil its features and leave it at the class prior for"
            f" the rest of the run. Lower --sam_rho (e.g. {rho / 3:.3g}), or compare with --sam_rho 0."
        )
        self.warned = True
        return True
