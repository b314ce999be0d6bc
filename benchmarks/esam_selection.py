#!/usr/bin/env python
"""Why ESAM's data selection ranked over the batch drops whole classes (docs/methods.md#esam).

Trains the MNIST benchmark's tiny ViT with AdamW for a few steps, then, on one batch: each example's loss rise at
w + eps (eps = rho g/||g||, no dropout, so the rise is exact), its first-order part rho <grad l_i, g/||g||> from
per-example gradients, and which classes the top half by rise keeps, over the batch and within each class.

    python benchmarks/esam_selection.py --steps 20 150
"""

# ruff: noqa: E402  (benchmarks/generalization.py's loaders are imported after the path is set)
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import generalization as bench
from hf_sam.esam import top_rise_per_class


def probe(checkpoints: list[int], batch: int = 128, rho: float = 0.05, seed: int = 0) -> list[dict]:
    """One report per entry of `checkpoints` (cumulative AdamW steps at lr 2e-3, batch 128)."""
    torch.manual_seed(seed)
    train, _ = bench.mnist_data(bench.TASKS["mnist"])
    images = torch.stack([train[i]["pixel_values"] for i in range(2048)])
    labels = torch.tensor([int(train[i]["labels"]) for i in range(2048)])
    model = bench.tiny_vit(seed).eval()  # no dropout: the rise is exactly l(w + eps) - l(w)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)

    def losses(x, y):
        return F.cross_entropy(model(pixel_values=x).logits, y, reduction="none")

    reports, done = [], 0
    for target in checkpoints:
        for _ in range(target - done):
            index = torch.randint(0, len(labels), (128,))
            optimizer.zero_grad()
            losses(images[index], labels[index]).mean().backward()
            optimizer.step()
        done = target
        x, y = images[:batch], labels[:batch]
        clean = losses(x, y)
        grads = torch.autograd.grad(clean.mean(), params)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        unit = [g / norm for g in grads]
        per_example = (torch.autograd.grad(losses(x[i : i + 1], y[i : i + 1]).sum(), params) for i in range(batch))
        first_order = torch.stack([rho * sum((a * b).sum() for a, b in zip(g_i, unit)) for g_i in per_example])
        with torch.no_grad():
            torch._foreach_add_(params, unit, alpha=rho)
            rise = losses(x, y) - clean.detach()
            torch._foreach_sub_(params, unit, alpha=rho)
        top = torch.topk(rise, batch // 2).indices
        per_class = top_rise_per_class(rise, y, 0.5)
        reports.append({
            "steps": target,
            "corr_rise_first_order": float(torch.corrcoef(torch.stack([rise, first_order.detach()]))[0, 1]),
            "batch_classes": dict(sorted(collections.Counter(y.tolist()).items())),
            "top_half_classes": dict(sorted(collections.Counter(y[top].tolist()).items())),
            "per_class_classes": dict(sorted(collections.Counter(y[per_class].tolist()).items())),
        })  # fmt: skip
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", nargs="+", type=int, default=[20, 150], help="AdamW steps before each report")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    for report in probe(sorted(cli.steps), seed=cli.seed):
        missing = sorted(set(report["batch_classes"]) - set(report["top_half_classes"]))
        print(f"after {report['steps']} steps: corr(rise, first order) = {report['corr_rise_first_order']:.2f}")
        print(f"  classes in the batch:        {report['batch_classes']}")
        print(f"  top half over the batch:     {report['top_half_classes']}  (missing: {missing})")
        print(f"  top half within each class:  {report['per_class_classes']}")


if __name__ == "__main__":
    main()
