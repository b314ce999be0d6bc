#!/usr/bin/env python
"""How large each preset's perturbation is on the benchmark models, and where it lands (docs/methods.md).

Takes one batch of each benchmark task (the MNIST ViT at its initialization, the pretrained MiniLM with its new
head on TREC; dropout off, so the numbers repeat), computes the clean gradient g, and turns it into eps with
hf_sam's own ascent rule of each preset at its defaults (or with fields given by `--set METHOD.FIELD=VALUE`).
Reports ||g||, ||eps|| and the shares of ||eps||^2 that fall on biases and on LayerNorm gains.

    python benchmarks/perturbation_size.py
    python benchmarks/perturbation_size.py --methods sam asam stable-sam --set asam.sam_rho=0.5 \
        stable-sam.sam_ascent=unnormalized
"""

# ruff: noqa: E402  (benchmarks/generalization.py's loaders are imported after the path is set)
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import generalization as bench
from benchmarks.overhead import parse_overrides
from hf_sam import SAMTrainingArguments
from hf_sam.components import ASCENT_RULES
from hf_sam.tensors import global_norm


METHODS = ("sam", "asam", "stable-sam", "fsam")


def perturbation(model: torch.nn.Module, batch: dict, method: str, overrides: dict | None = None) -> dict:
    """||g||, ||eps|| and the biases' share of ||eps||^2 for `method`'s ascent on one batch (the model unchanged)."""
    overrides = overrides or {}
    args = SAMTrainingArguments(
        output_dir="/tmp/unused", use_cpu=True, report_to="none", sam_method=method, **overrides
    )
    model.zero_grad()
    model(**batch).loss.backward()
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    names, params = [n for n, _ in named], [p for _, p in named]
    eps = [p.grad.detach().clone() for p in params]
    grad_norm = global_norm(eps)
    with torch.no_grad():  # as in training: eps is arithmetic on tensors, not part of the graph
        ASCENT_RULES[args.sam_ascent](args)(names, params, eps, torch.tensor(args.sam_rho), 1.0, grad_norm)
    total = float(sum(e.square().sum() for e in eps))
    on_biases = float(sum(e.square().sum() for n, e in zip(names, eps) if n.endswith("bias")))
    on_norm_gains = float(sum(e.square().sum() for n, e in zip(names, eps) if is_norm_gain(n)))
    return {"method": method, "rho": args.sam_rho, "grad_norm": float(grad_norm), "eps_norm": total**0.5,
            "bias_share": on_biases / total if total else 0.0,
            "norm_gain_share": on_norm_gains / total if total else 0.0}  # fmt: skip


def is_norm_gain(name: str) -> bool:
    """A LayerNorm's gain (`...layernorm.weight`, `...LayerNorm.weight`): |w| ~ 1 where other weights are ~0.05."""
    return "norm" in name.lower() and name.endswith("weight")


def benchmark_batches(seed: int = 0) -> dict[str, tuple[torch.nn.Module, dict]]:
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    train, _ = bench.mnist_data(bench.TASKS["mnist"])
    images = {"pixel_values": torch.stack([train[i]["pixel_values"] for i in range(128)]),
              "labels": torch.tensor([train[i]["labels"] for i in range(128)])}  # fmt: skip
    text, _, tokenizer, path, classes = bench.text_data(bench.TASKS["trec"])
    hf_logging.set_verbosity_error()
    bert = AutoModelForSequenceClassification.from_pretrained(path, num_labels=classes)
    questions = dict(DataCollatorWithPadding(tokenizer)([text[i] for i in range(32)]))
    return {
        "mnist (ViT from scratch)": (bench.tiny_vit(seed).eval(), images),
        "trec (MiniLM)": (bert.eval(), questions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--set", nargs="*", default=[], help="METHOD.FIELD=VALUE: a field other than the preset's")
    cli = parser.parse_args()
    fields: dict[str, dict] = {}
    for name, value in parse_overrides(cli.set).items():
        method, _, field = name.partition(".")
        fields.setdefault(method, {})[field] = value
    torch.set_num_threads(1)
    print("| model | method | rho | ‖g‖ | ‖ε‖ | share of ‖ε‖² on biases | on LayerNorm gains |")
    print("|---|---|---|---|---|---|---|")
    for name, (model, batch) in benchmark_batches().items():
        for method in cli.methods:
            r = perturbation(model, batch, method, fields.get(method))
            print(f"| {name} | {method} | {r['rho']:g} | {r['grad_norm']:.3f} | {r['eps_norm']:.4f} |"
                  f" {r['bias_share']:.2f} | {r['norm_gain_share']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
