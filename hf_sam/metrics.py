"""On-device accumulation of the `sam/*` metrics; reduced to floats only when `Trainer.log` runs."""

from __future__ import annotations

from collections import defaultdict

import torch


class SAMMetrics:
    """Running sums of tensors (no `.item()` per step) and host-side counters, averaged at log time.

    `add(name, value)` adds one sample of `name` (`add(name, total, count)`: `count` samples adding up to `total`);
    `log_values()` returns each mean over the samples since the last call (a name with no finite sample is left out)
    and resets. Under several processes, `reduce` (a sum over ranks, e.g. `accelerator.reduce`) adds up the sums and
    sample counts of every rank first, on `device`.
    """

    def __init__(self):
        self._sums: dict[str, torch.Tensor | float] = {}
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, value: torch.Tensor | float, count: int | torch.Tensor = 1) -> None:
        """Add `value` as the sum of `count` samples of `name` (a device tensor count: no host sync)."""
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
        current = self._sums.get(name)
        self._sums[name] = value if current is None else current + value
        self._counts[name] += count

    def add_finite(self, name: str, value: torch.Tensor) -> None:
        """Add one sample of `name` only if it is finite, decided on the device: a NaN or inf sample (a dropped SAM
        step's loss at w + eps) is left out of the mean, as Trainer's `logging_nan_inf_filter` leaves such a step's
        loss out of `loss`, instead of turning the whole logging window's mean into NaN."""
        value = value.detach().float()
        finite = torch.isfinite(value)
        current = self._sums.get(name)
        kept = torch.where(finite, value, torch.zeros_like(value))
        self._sums[name] = kept if current is None else current + kept
        self._counts[name] = self._counts[name] + finite.float()

    def __bool__(self) -> bool:
        return bool(self._sums)

    def log_values(self, reduce=None, device: torch.device | str | None = None) -> dict[str, float]:
        """Each name's mean since the last call, then reset.

        Args:
            reduce (`Callable`, *optional*):
                A sum over ranks of a tensor (e.g. `accelerator.reduce(t, "sum")`); None for one process.
            device (`torch.device` or `str`, *optional*):
                Where the sums are stacked and reduced: the training device. Without it, where the first tensor
                sample lives (the CPU when every sample is a host float).

        Returns:
            `dict[str, float]`: each name's mean, to 7 significant digits.
        """
        if not self._sums:
            return {}
        names = sorted(self._sums)
        if device is None:
            device = next((v.device for v in self._sums.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        sums = torch.stack([torch.as_tensor(self._sums[n], dtype=torch.float32, device=device) for n in names])
        counts = torch.stack([torch.as_tensor(self._counts[n], dtype=torch.float32, device=device) for n in names])
        if reduce is not None:
            # Sums and sample counts over every rank: each mean is over all ranks' samples, and a rank without a
            # finite sample of a name (its only step's loss left out) does not turn the mean into NaN.
            sums, counts = reduce(torch.stack([sums, counts]))
        means = sums / counts
        self._sums.clear()
        self._counts.clear()
        # A name without a single finite sample (a window holding only a dropped step) is left out of this log:
        # 0 / 0 would log NaN, which reads as a diverged run. `sam/skipped_updates` reports the drop.
        return {name: _significant(v) for name, v, n in zip(names, means.tolist(), counts.tolist()) if n > 0}


def _significant(value: float) -> float:
    """A float32 mean to 7 significant digits (float32 holds about 7.2): 0.05 reads 0.05, not 0.0500000007.

    Not to a fixed number of decimals: rounded to 6, a radius of 3e-7 logged `sam/rho` and `sam/eps_norm` as 0.0,
    and MESA's KL of 8.7e-6 (a teacher still near the student) as 9e-6.
    """
    return float(f"{value:.7g}")
