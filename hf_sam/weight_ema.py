"""An exponential moving average of the trained weights, used for evaluation and for the model left after training.

Averaging the iterates is what Kaddour et al. (2022, "When Do Flat Minima Optimizers Work?") found to be the other
route to flat minima, and it composes with SAM: the average of a trajectory that bounces across a valley sits near
its floor. It costs one multiply-add over the trainable weights per optimizer step and one copy of them
(float32 for bf16 / fp16 weights).

The decay warms up, d_t = min(decay, (1 + t) / (10 + t)) after t updates (as TensorFlow's
`ExponentialMovingAverage(num_updates=...)`), so a short run averages over its recent steps rather than over its
random start, and a long run over about 1 / (1 - decay) steps. The first update (t = 0) takes the weights as they
are: the average starts at the first iterate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .checkpoint import check_state_keys
from .tensors import average_dtype, local


def warmed_up_decay(decay: float, updates: int) -> float:
    """The decay of an update that follows `updates` earlier ones: min(decay, (1 + t) / (10 + t)).

    Early on the average follows the recent weights instead of staying near the start; after about
    10 / (1 - decay) updates it is the plain `decay`. Shared by `WeightEMA` and MESA's warmed-up teacher.
    """
    return min(decay, (1 + updates) / (10 + updates))


@torch.no_grad()
def lerp_float32_(averages: list[torch.Tensor], weights: list[torch.Tensor], weight: float) -> None:
    """averages <- averages + weight (weights - averages), for averages kept in `average_dtype` of their weights.

    Weights of the averages' dtype go through one foreach lerp, without a copy. A bf16 / fp16 weight is upcast one
    tensor at a time: a list of upcasts would hold a float32 copy of all the weights at once, every step, as large as
    the average itself.
    """
    same = [(a, w) for a, w in zip(averages, weights) if a.dtype == w.dtype]
    if same:
        torch._foreach_lerp_([a for a, _ in same], [w for _, w in same], weight)
    for average, w in zip(averages, weights):
        if average.dtype != w.dtype:
            average.lerp_(w.to(average.dtype), weight)


class WeightEMA:
    """Moving average of `params` (their local shards under FSDP2), in float32 for bf16 / fp16 weights and in the
    weights' own dtype otherwise (`average_dtype`: a float32 average of complex weights dropped their imaginary part).

    Args:
        named_params (`list[tuple[str, nn.Parameter]]`): The trainable parameters, by name.
        decay (`float`): The decay once warmed up, in (0, 1).
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float):
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.average: list[torch.Tensor] = []
        self.ids: set[int] = set()  # of the averaged parameters, for the check before every optimizer step
        self.decay = decay
        self.updates = 0
        self.admit(named_params)

    @torch.no_grad()
    def admit(self, named_params: list[tuple[str, nn.Parameter]]) -> None:
        """Average `named_params` too, from their weights now; those averaged already are left as they are.

        A parameter that a callback unfreezes during training (gradual unfreezing) is admitted before its first
        update: until then it held these weights at every step, and the moving average of an unchanged weight is that
        weight, so the average is the one a run averaging it from the start has.
        """
        for name, p in named_params:
            if id(p) not in self.ids:
                self.ids.add(id(p))
                self.names.append(name)
                self.params.append(p)
                self.average.append(local(p).detach().to(average_dtype(p), copy=True))

    def admit_trainable(self, model: nn.Module) -> None:
        """Admit the parameters of `model` that require a gradient and are not averaged yet (called before every
        optimizer step: one pass over the parameters when, as usual, there are none)."""
        if any(p.requires_grad and id(p) not in self.ids for p in model.parameters()):
            self.admit([(name, p) for name, p in model.named_parameters() if p.requires_grad])

    def current_decay(self) -> float:
        """The decay of the next update: 0 for the first, then warmed up by the number of updates so far.

        The first update takes the weights as they are, so the average starts at the first iterate. Built at the first
        step, the average holds the weights before training when that step changed none (fp16 loss scaling skips
        the first steps of a run whose initial scale overflows, the guard drops a first update at w + eps that was not
        finite), and a warmed-up decay of 0.1 kept a tenth of them.
        """
        return 0.0 if self.updates == 0 else warmed_up_decay(self.decay, self.updates)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in: average <- d average + (1 - d) w (called after every optimizer step that
        changed the weights)."""
        weight = 1.0 - self.current_decay()
        lerp_float32_(self.average, [local(p).detach() for p in self.params], weight)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Run the block with the averaged weights in the model; the trained weights come back bit for bit."""
        with torch.no_grad():
            backup = [local(p).detach().clone() for p in self.params]
            self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([local(p) for p in self.params], backup)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Put the averaged weights into the model (in the weights' own dtype)."""
        torch._foreach_copy_([local(p) for p in self.params], self.average)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"average.{name}": value for name, value in zip(self.names, self.average)}
        state["updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], owner: str = "weight_ema_decay") -> None:
        if "updates" not in state:
            raise ValueError(f"{owner}: the checkpoint's weight average has no update count. Resume with its own run.")
        averages = {k: v for k, v in state.items() if k != "updates"}
        expected = {f"average.{name}": average for name, average in zip(self.names, self.average)}
        check_state_keys(averages, expected, owner)
        missing = sorted(set(expected) - set(averages))
        if missing:
            raise ValueError(
                f"{owner}: the checkpoint's weight average lacks {missing[:3]}: it was written for other trainable"
                " parameters. Resume with the model (and adapters) of the original run."
            )
        with torch.no_grad():
            for key, average in expected.items():
                average.copy_(averages[key])
        self.updates = int(state["updates"])
