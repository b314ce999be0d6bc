"""Hand-written reference loops: the math of docs/methods.md in plain PyTorch, parameter by parameter, no Trainer.

Loss convention matches Trainer for classification: each micro-batch contributes CE-mean / (micro-batches in the
window), so a window's gradient is the mean over its examples when micro-batches are equal in size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def micro_loss(model, batch, parts: int) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits, batch["labels"]) / parts


def grads_at(model, batches, parts, eps=None) -> dict[str, torch.Tensor]:
    """Gradient of the summed batch losses at w + eps (eps: name -> tensor, or None); w is put back exactly."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in (eps or {})}
    with torch.no_grad():
        for n, e in (eps or {}).items():
            params[n].add_(e)
    model.zero_grad(set_to_none=True)
    for batch in batches:
        micro_loss(model, batch, parts).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for n, w in saved.items():
            params[n].copy_(w)
    model.zero_grad(set_to_none=True)
    return grads


def norm(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())).float()


def inner(a: dict, b: dict) -> torch.Tensor:
    return sum((a[n].double() * b[n].double()).sum() for n in a).float()


# ---------------------------------------------------------------- one function per piece
# Ascent rules: (reference, model, g, unit) -> eps, g in `.grad` units (g * unit is the true gradient).


def sam_eps(ref, model, g, unit):
    g_norm = norm(g)
    return {n: ref.rho * x / (g_norm + 1e-12) for n, x in g.items()}


def adaptive_eps(ref, model, g, unit):
    params = dict(model.named_parameters())

    def operator(n):  # T: |w| + eta, and 1 on biases unless they are scaled too
        unscaled = n.endswith("bias") and not ref.scale_biases
        return torch.ones_like(g[n]) if unscaled else params[n].detach().abs() + ref.eta

    t = {n: operator(n) for n in g}
    tg_norm = norm({n: t[n] * x for n, x in g.items()})
    return {n: ref.rho * t[n] * t[n] * x / (tg_norm + 1e-12) for n, x in g.items()}


def unnormalized_eps(ref, model, g, unit):
    return {n: ref.rho * unit * x for n, x in g.items()}


def fsam_eps(ref, model, g, unit):
    true_g = {n: x * unit for n, x in g.items()}
    if ref.ema is None:
        d, ref.ema = true_g, {n: x.clone() for n, x in true_g.items()}
    else:
        d = {n: true_g[n] - ref.fsam_sigma * ref.ema[n] for n in g}
        ref.ema = {n: ref.fsam_lambda * ref.ema[n] + (1 - ref.fsam_lambda) * true_g[n] for n in g}
    d_norm = norm(d)
    return {n: ref.rho * x / (d_norm + 1e-12) for n, x in d.items()}


ASCENTS = {"sam": sam_eps, "adaptive": adaptive_eps, "unnormalized": unnormalized_eps, "fsam": fsam_eps}


# Descent transforms of a SAM step: (reference, g, h) -> the final gradient (h: the gradient at w + eps); and of a
# plain step in between (LookSAM): (reference, g) -> the final gradient.


def gsam_descent(ref, g, h):
    coef = inner(g, h) / (norm(h) ** 2 + 1e-12)
    return {n: h[n] - ref.gsam_alpha * (g[n] - coef * h[n]) for n in h}


def looksam_descent(ref, g, h):
    coef = inner(h, g) / (norm(g) ** 2 + 1e-12)
    ref.g_v = {n: h[n] - coef * g[n] for n in h}
    return h


def looksam_plain(ref, g):
    if ref.g_v is None:
        return g
    scale = ref.looksam_alpha * norm(g) / (norm(ref.g_v) + 1e-12)
    return {n: x + scale * ref.g_v[n] for n, x in g.items()}


DESCENTS = {"none": lambda ref, g, h: h, "gsam": gsam_descent, "looksam": looksam_descent}
PLAIN_STEP = {"looksam": looksam_plain}


class Reference:
    """Computes one method. `ascent` and `descent` name functions above (ASCENTS, DESCENTS); `renormalize` is
    Stable SAM's rescale; `shards` is mSAM's m; `sam_step(t)` says whether step t runs SAM; `rho_warmup` is the
    share of the run over which the radius grows as rho (t + 1) / (rho_warmup T), written out here."""

    def __init__(self, rho, ascent="sam", eta=0.01, scale_biases=False, descent="none", renormalize=False, shards=1,
                 accumulation="window", sam_step=lambda t: True, fsam_sigma=1.0, fsam_lambda=0.9,
                 gsam_alpha=0.1, looksam_alpha=0.7, mask=None, esam_beta=None, esam_gamma=None,
                 esam_selection="per_class", direction="gradient", rho_warmup=0.0):  # fmt: skip
        self.__dict__.update({k: v for k, v in locals().items() if k not in ("self", "descent")})
        self.descent_rule = descent
        self.ema = None  # F-SAM's m
        self.g_v = None  # LookSAM's orthogonal component

    def epsilon(self, model, g: dict[str, torch.Tensor], unit: float) -> dict[str, torch.Tensor]:
        rho = self.rho
        if self.esam_beta is not None:
            self.rho = rho / self.esam_beta
        eps = ASCENTS[self.ascent](self, model, g, unit)
        self.rho = rho
        if self.mask is not None:  # Sparse SAM: normalized by the full norm, then masked
            eps = {n: e * self.mask[n] for n, e in eps.items()}
        return eps

    def momentum_eps(self, model) -> dict[str, torch.Tensor]:
        """Momentum-SAM: -rho m / ||m|| from the optimizer's first moment (nothing before its first step)."""
        moments = {}
        for n, p in model.named_parameters():
            state = self.optimizer.state.get(p, {})
            moment = state.get("exp_avg", state.get("momentum_buffer", state.get("m")))  # "m": AdaSAM
            if moment is not None:
                moments[n] = moment
        if not moments:
            return {}
        return {n: -self.rho * m / norm(moments) for n, m in moments.items()}

    def esam_keep(self, model, step):
        """SWP: the trainer's per-tensor draw for this step (statistics of the draw are tested on their own)."""
        from hf_sam.esam import kept_tensors

        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return dict(zip(names, kept_tensors(len(names), self.esam_beta, 0, step)))

    def clean_gradient(self, model, batches, parts, step):
        g = grads_at(model, batches, parts)
        if self.esam_beta is not None:  # dropped tensors get no gradient and no eps; eps scales by 1/beta
            keep = self.esam_keep(model, step)
            g = {n: x for n, x in g.items() if keep[n]}
        return g

    def descent(self, model, batches, parts, eps):
        """Gradient at w + eps; with SDS, each micro-batch's top-gamma examples by loss rise, their mean loss."""
        if self.esam_gamma is None:
            return grads_at(model, batches, parts, eps)
        chosen = []
        for batch in batches:
            with torch.no_grad():
                before = F.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"], reduction="none")
                params = dict(model.named_parameters())
                for n, e in eps.items():
                    params[n].add_(e)
                after = F.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"], reduction="none")
                for n, e in eps.items():
                    params[n].sub_(e)
            top = self.esam_select(after - before, batch["labels"])
            chosen.append({key: value[top] for key, value in batch.items()})
        return grads_at(model, chosen, parts, eps)

    def esam_select(self, rise, labels):
        """SDS: the top share by loss rise, within each class (per_class) or over the batch."""
        if self.esam_selection == "batch":
            return torch.topk(rise, max(1, math.ceil(self.esam_gamma * len(labels)))).indices
        chosen = []
        for c in labels.unique():
            members = (labels == c).nonzero().flatten()
            k = math.ceil(self.esam_gamma * len(members))
            chosen.append(members[torch.topk(rise[members], k).indices])
        return torch.cat(chosen)

    def sam_units(self, model, units, parts, unit):
        """Descent gradient summed over perturbation units (the window, micro-batches or shards)."""
        total = {}
        for unit_batches in units:
            g = self.clean_gradient(model, unit_batches, parts, self._step)
            h = self.descent(model, unit_batches, parts, self.epsilon(model, g, unit))
            for n, x in h.items():
                total[n] = total[n] + x if n in total else x
        return total

    def step_gradient(self, model, window, step: int) -> dict[str, torch.Tensor]:
        parts = len(window)
        self._step = step
        if self.rho_warmup > 0:
            self.rho = self.full_rho * min(1.0, (step + 1) / (self.rho_warmup * self.total_steps))
        if not self.sam_step(step):
            g = grads_at(model, window, parts)
            plain = PLAIN_STEP.get(self.descent_rule)
            return plain(self, g) if plain is not None else g
        if self.shards > 1 or (self.accumulation == "micro" and len(window) > 1):
            units = [[{k: v[i] for k, v in zip(b, [torch.tensor_split(t, self.shards) for t in b.values()])}]
                     for b in window for i in range(self.shards)]  # fmt: skip
            return self.sam_units(model, units, parts * self.shards, float(parts * self.shards))
        if self.direction == "momentum":
            return grads_at(model, window, parts, self.momentum_eps(model))
        g = self.clean_gradient(model, window, parts, step)
        h = self.descent(model, window, parts, self.epsilon(model, g, 1.0))
        h = DESCENTS[self.descent_rule](self, g, h)
        if self.renormalize:
            scale = norm(g) / (norm(h) + 1e-12)
            h = {n: scale * x for n, x in h.items()}
        return h

    def train(self, model, optimizer, windows):
        self.optimizer = optimizer  # Momentum-SAM reads its first moment
        self.full_rho, self.total_steps = self.rho, len(windows)
        model.train()
        for step, window in enumerate(windows):
            grads = self.step_gradient(model, window, step)
            for n, p in model.named_parameters():
                p.grad = grads.get(n)
            optimizer.step()
            model.zero_grad(set_to_none=True)
        return model


def reference_sam(model, optimizer, windows, rho, **kwargs):
    """Train `model` on `windows` (lists of micro-batches) with the method described by `kwargs`."""
    return Reference(rho, **kwargs).train(model, optimizer, windows)


class AMSGrad(torch.optim.Optimizer):
    """AdaSAM's base step written out for the reference: plain loops, no foreach; Adam's bias correction unless
    `bias_correction=False` (the paper's rule)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, bias_correction=True):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.bias_correction, self.t = bias_correction, 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                s = self.state[p]
                if not s:
                    s["m"], s["v"] = torch.zeros_like(p), torch.zeros_like(p)
                    s["v_hat"] = torch.full_like(p, group["eps"] ** 2)
                s["m"] = b1 * s["m"] + (1 - b1) * p.grad
                s["v"] = b2 * s["v"] + (1 - b2) * p.grad * p.grad
                s["v_hat"] = torch.maximum(s["v_hat"], s["v"])
                m, v_hat = s["m"], s["v_hat"]
                if self.bias_correction:
                    m, v_hat = m / (1 - b1**self.t), v_hat / (1 - b2**self.t)
                p -= group["lr"] * m / v_hat.sqrt()
