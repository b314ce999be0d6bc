"""Sparse SAM's masks (Mi et al. 2022, arXiv 2210.05177): perturb only a global top-k share of the entries.

eps = rho (g/||g||) * m with the norm of the full (unmasked) g, as the official code, so ||eps|| < rho.
`sam_sparsity` s is the share of entries NOT perturbed; masks are bool tensors, identical on every rank. Under
FSDP2 each rank holds the mask of its own shards, and the top-k is global over every rank's shards.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .replay import rng_untouched
from .schedules import is_sam_step
from .seeds import step_generator
from .sync import gradient_sync, is_ddp
from .tensors import local, shard_group, shard_rows


MASKS = ("none", "fisher", "dynamic")


def top_k_mask(scores: list[torch.Tensor], k: int, group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Bool masks marking the k largest entries over all `scores` together (exactly k).

    With `group`, `scores` are this rank's shards and the k are counted over every rank's shards (FSDP2).
    """
    flat = torch.cat([s.reshape(-1).float() for s in scores]) if scores else torch.zeros(0)
    if group is not None:
        chosen = _sharded_top_k(flat, k, group)
    else:
        chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        if k > 0:
            chosen[torch.topk(flat, k, sorted=False).indices] = True
    return [part.view_as(s) for part, s in zip(chosen.split([s.numel() for s in scores]), scores)]


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys in the order of the float32 `values` (a float's bits sort like a sign-magnitude integer)."""
    bits = values.float().contiguous().view(torch.int32)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)


def _sharded_top_k(flat: torch.Tensor, k: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The k largest entries over every rank's `flat`, without gathering them: the k-th largest value t is found
    by bisection on the order keys (33 rounds of one all-reduced count, all on the device), entries above t are
    taken, and the ties at t are shared out in rank order so the total is exactly k."""
    if k <= 0:  # k is the same on every rank: all of them return here, before any collective
        return torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keys = _order_keys(flat)
    device = keys.device
    empty = torch.tensor(-(2**32), dtype=torch.int64, device=device)  # below every key: ignored by the MAX
    lowest = -keys.min().to(torch.int64) if keys.numel() else empty
    highest = keys.max().to(torch.int64) if keys.numel() else empty
    bounds = torch.stack([lowest, highest])
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=group)
    low, high = -bounds[0], bounds[1] + 1  # count(keys >= low) >= k > count(keys >= high) while 0 < k <= N
    for _ in range(33):  # the key range spans less than 2**33
        middle = torch.div(low + high, 2, rounding_mode="floor")
        count = (keys >= middle).sum()
        dist.all_reduce(count, group=group)
        enough = count >= k
        low = torch.where(enough, middle, low)
        high = torch.where(enough, high, middle)
    above = keys > low
    ties = keys == low
    counts = torch.stack([above.sum(), ties.sum()])
    per_rank = [torch.zeros_like(counts) for _ in range(dist.get_world_size(group))]
    dist.all_gather(per_rank, counts, group=group)
    per_rank = torch.stack(per_rank)
    rank = dist.get_rank(group)
    need = k - per_rank[:, 0].sum()  # ties to take, over all ranks, the lower ranks first
    mine = (need - per_rank[:rank, 1].sum()).clamp(min=0).minimum(per_rank[rank, 1])
    taken_ties = ties & (torch.cumsum(ties, 0, dtype=torch.int64) <= mine)
    return above | taken_ties


def local_rand(param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """U(0, 1) draws for `param`, the same numbers a whole (unsharded) parameter gets: under FSDP2 the full
    tensor is drawn and this rank keeps the rows of its shard."""
    return shard_rows(torch.rand(param.shape, generator=generator), param)


class SparseMask:
    """Holds one bool mask per perturbed parameter and refreshes it (Fisher or drop-and-grow).

    Args:
        args: the resolved `SAMTrainingArguments`.
        names (`list[str]`), params (`list[torch.Tensor]`): the perturbed parameters.
    """

    def __init__(self, args, names: list[str], params: list[torch.Tensor]):
        self.args = args
        self.kind = args.sam_mask
        self.names = names
        self.group = shard_group(params)  # FSDP2: the ranks over which the parameters are sharded
        self.total = sum(p.numel() for p in params)  # a DTensor's numel is the whole tensor's
        self.live = int((1 - args.sam_sparsity) * self.total)
        self.masks: dict[str, torch.Tensor] = {}
        self.updated_at = -1  # the optimizer step of the last refresh
        self.fisher_indices: list[int] = []  # the training examples of the last Fisher estimate
        if self.kind == "dynamic":  # the random starting mask: (1 - s) N live entries
            generator = step_generator("ssam-d-start", args.seed, 0)
            scores = [local_rand(p, generator) for p in params]
            self._set(top_k_mask(scores, self.live, self.group), params)
        self.current_density = self.density() if self.masks else 1.0  # one host sync per refresh, not per step

    # ------------------------------------------------------------------ refresh inside the Trainer

    def due(self, trainer) -> bool:
        """Whether the mask is refreshed at this optimizer step: every `sam_mask_interval` steps (default one
        epoch's), the first step included, once per step; the dynamic mask at the first SAM step of each interval."""
        state = trainer.state
        if self.updated_at == state.global_step:
            return False
        interval = self.args.sam_mask_interval
        if interval is None:  # one epoch's optimizer steps, as Trainer counts them
            # Not max_steps over the epoch count, which Trainer rounds up: 18 steps of 8 per epoch made it 6, and an
            # iterable dataset (sys.maxsize epochs) 1, a refresh at every step.
            interval = getattr(getattr(trainer, "_sam", None), "epoch_steps", None)
            if interval is None:  # a loop that did not report it
                epochs = max(1.0, float(state.num_train_epochs or 1))
                interval = max(1, math.ceil(state.max_steps / epochs))
        if self.kind != "dynamic":
            return state.global_step % interval == 0
        # SSAM-D reads the clean gradient, which only a SAM step computes (it is asked on SAM steps only): a
        # schedule's plain step at the interval's start must not drop the refresh, so it is due at the interval's
        # first SAM step.
        start = state.global_step - state.global_step % interval
        if self.updated_at >= 0:
            return self.updated_at < start
        # Right after a resume the last refresh is not known; the schedule's draws are a function of (seed, step):
        # a SAM step earlier in this interval already refreshed the mask that the checkpoint holds.
        return not any(is_sam_step(self.args, t, state.max_steps) for t in range(start, state.global_step))

    def before_step(self, trainer, params: list[torch.Tensor]) -> float:
        """SSAM-F: before a due step (the first one included), rebuild the mask from the empirical Fisher.

        Returns:
            `float`: the floating-point operations of its forward+backward passes, by `trainer.floating_point_ops`
            (0 when no refresh is due), for Trainer's `total_flos`.
        """
        flops = 0.0
        if self.kind != "fisher" or not self.due(trainer):
            return flops
        fisher = [torch.zeros_like(local(p), dtype=torch.float32) for p in params]
        model = trainer.model  # unwrapped: these passes must not all-reduce; every rank sees the same examples
        was_training = model.training
        model.eval()  # no dropout (a documented change from the official train mode)
        # Under FSDP2 the model is its own wrapper, and each backward must reduce-scatter into the sharded `.grad` (the
        # mean of the ranks' identical gradients), also inside Trainer's deferral on a window's early micro-batches:
        # deferred, the gradients stay off `.grad` (a Fisher of zeros) and join the step's first synced backward.
        # Under DDP `model` is the unwrapped module, which has no sync to turn on, but DDP's gradient hooks sit on the
        # parameters and fire for any backward that fills `.grad`: it marks what the pass reached as used in the coming
        # iteration (a tensor the step's own passes then leave without a gradient failed DDP's reduction), and under
        # `ddp_static_graph` it was taken for the graph's first iteration (no gradient was all-reduced after it, and
        # the ranks drifted apart). `torch.autograd.grad` computes the gradients without running those hooks.
        outside_hooks = is_ddp(trainer.model_wrapped)
        # The examples' collation (a masked-LM collator draws its masks) must not move the training's random streams:
        # the next batches and dropout masks stay the plain Trainer's.
        with gradient_sync(model, True), rng_untouched(trainer.args.device, trainer.data_collator):
            try:  # an interrupt in these many passes leaves the model as it was, its mode included
                for example in self._fisher_examples(trainer):
                    model.zero_grad(set_to_none=True)
                    with trainer.compute_loss_context_manager():
                        loss = trainer.compute_loss(model, trainer._prepare_inputs(example))
                    flops += float(trainer.floating_point_ops(example))
                    if outside_hooks:
                        # Only tensors that still require grad (a callback may have frozen one since the first step).
                        wanted = [p for p in params if p.requires_grad]
                        found = dict(zip(map(id, wanted), torch.autograd.grad(loss, wanted, allow_unused=True)))
                        grads = [found.get(id(p)) for p in params]
                    else:
                        loss.backward()
                        grads = [p.grad for p in params]
                    with torch.no_grad():
                        for f, g in zip(fisher, grads):
                            if g is not None:
                                f.add_(local(g).float().square())
            finally:
                model.zero_grad(set_to_none=True)
                model.train(was_training)
        self.set_fisher(fisher, params)
        self.updated_at = trainer.state.global_step
        self.current_density = self.density()
        return flops

    def _fisher_examples(self, trainer):
        """`sam_fisher_samples` training examples, one per batch, drawn from (seed, global_step)."""
        dataset = trainer.train_dataset
        # Its own stream: SS-SAM's draws and SSAM-D's regrowth come from `step_generator` streams.
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + trainer.state.global_step)
        indices = torch.randperm(len(dataset), generator=generator)[: self.args.sam_fisher_samples].tolist()
        self.fisher_indices = indices
        try:
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:  # pragma: no cover
            is_hf_dataset = False
        if is_hf_dataset:
            subset = trainer._remove_unused_columns(dataset.select(indices), description="fisher")
            for i in range(len(subset)):
                yield trainer.data_collator([subset[i]])
        else:
            collator = trainer._get_collator_with_removed_columns(trainer.data_collator, description="fisher")
            for i in indices:
                yield collator([dataset[i]])

    def before_ascent(self, trainer, params: list[torch.Tensor]) -> None:
        """SSAM-D: at a due step, refresh the mask from |g| of the clean gradient now in `.grad`."""
        if self.kind != "dynamic" or not self.due(trainer):
            return
        step = trainer.state.global_step
        self.updated_at = step
        if step == 0:  # the random starting mask is the first mask
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self.drop_and_grow(grads, params, step, step / max(1, trainer.state.max_steps))
        self.current_density = self.density()

    # ------------------------------------------------------------------ the masks

    def _set(self, masks: list[torch.Tensor], params: list[torch.Tensor]) -> None:
        masks = [m.to(local(p).device) for m, p in zip(masks, params)]
        # Under FSDP2 the masks come from reduce-scattered gradients: each rank's shard mask is already right.
        if self.group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Local gradients (dynamic) may differ per rank: rank 0's mask wins, so every rank perturbs alike.
            flat = torch.cat([m.reshape(-1) for m in masks]).to(torch.uint8)
            dist.broadcast(flat, src=0)
            masks = [part.view_as(m).bool() for part, m in zip(flat.split([m.numel() for m in masks]), masks)]
        self.masks = dict(zip(self.names, masks))

    def set_fisher(self, fisher: list[torch.Tensor], params: list[torch.Tensor]) -> None:
        """Keep the global top-(1 - s) N entries of the empirical Fisher."""
        self._set(top_k_mask(fisher, self.live, self.group), params)

    def drop_and_grow(self, grads: list[torch.Tensor], params: list[torch.Tensor], step: int, progress: float):
        """SSAM-D update: keep the top live entries by |g|, revive as many dead ones at random (topped up from the
        just-dropped entries when too few are dead), so (1 - s)N entries stay live."""
        drop = self.args.sam_mask_drop_rate * (1 + math.cos(math.pi * min(1.0, progress))) / 2
        keep = math.floor(self.live * (1 - drop))
        revive = math.floor(self.live * drop)
        old = [self.masks[n] for n in self.names]
        # Dead entries score -1 so they are never kept; |g| >= 0 ranks the live ones.
        keep_scores = [torch.where(m, local(g).abs().float(), torch.full_like(m, -1.0, dtype=torch.float32))
                       for m, g in zip(old, grads)]  # fmt: skip
        kept = top_k_mask(keep_scores, keep, self.group)
        generator = step_generator("ssam-d-regrow", self.args.seed, step)
        # Revived at random among the entries that were dead (scores in [0, 1)); when fewer are dead than `revive`
        # (sam_sparsity below d / (1 + d)), the rest among the entries just dropped ([-1, 0)), never a kept one (-2),
        # so the live count stays keep + revive. With enough dead entries the pick is the dead ones' alone.
        grow_scores = []
        for m, k, p in zip(old, kept, params):
            draw = local_rand(p, generator).to(m.device)
            grow_scores.append(torch.where(k, -2.0, torch.where(m, draw - 1.0, draw)))
        grown = top_k_mask(grow_scores, revive, self.group)
        self._set([k | g for k, g in zip(kept, grown)], params)

    def apply_(self, names: list[str], eps: list[torch.Tensor]) -> None:
        """eps <- eps * m on each tensor (names that have no mask yet are left whole)."""
        for name, e in zip(names, eps):
            mask = self.masks.get(name)
            if mask is not None:
                local(e).mul_(mask)

    def density(self) -> float:
        """Share of entries perturbed, over the whole model (one host sync: called at mask updates only)."""
        live = sum((m.sum() for m in self.masks.values()), torch.zeros((), dtype=torch.int64))
        if self.group is not None:
            dist.all_reduce(live, group=self.group)
        return int(live) / max(1, self.total)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ssam_mask.{name}": m for name, m in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            masks = {key[len("ssam_mask.") :]: value.bool() for key, value in state.items()}
            # A mask always covers every perturbed tensor (`_set`): one left out would be perturbed whole, silently,
            # until the next refresh. (Unknown names and shapes are refused before this, by `SAMRun`.)
            missing = [name for name in self.names if name not in masks]
            if missing:
                raise ValueError(
                    f"The checkpoint's Sparse SAM masks lack {missing[:3]} ({len(missing)} of {len(self.names)}"
                    " perturbed tensors): the file was not written whole for this run. Resume from an earlier"
                    " checkpoint, or start a new run from the weights."
                )
            self.masks = masks
            self.current_density = self.density()
