"""When a run fits its flipped labels: per epoch, the held-out accuracy and the share of the flipped training labels
that the model predicts, for one run of a noisy-label text task of `generalization.py`.

    python benchmarks/label_fit.py --task polarity-500-noisy --method saf --seed 0

Prints one line per epoch and appends them to `--results` (JSON lines). A pull towards the run's own earlier
predictions (SAF, MESA) can keep what the trajectory had; this shows what that was: the epoch at which `none`
scored best held out, and how far it fell once it fit the flipped labels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import DataCollatorWithPadding, TrainerCallback


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import generalization as bench


def fit_shares(predicted: np.ndarray, noisy: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    """Shares of the flipped examples predicted as their wrong (noisy) label and as their true one, and the accuracy on
    the examples whose label was kept."""
    flipped = noisy != clean
    return {
        "flipped_fit": float((predicted[flipped] == noisy[flipped]).mean()),
        "flipped_true": float((predicted[flipped] == clean[flipped]).mean()),
        "kept_fit": float((predicted[~flipped] == clean[~flipped]).mean()),
    }


def predict(model, dataset, collator, batch_size: int = 256) -> np.ndarray:
    """Argmax predictions of `model` in eval mode, in the dataset's order; the model's mode is restored."""
    was_training = model.training
    model.eval()
    columns = [c for c in dataset.column_names if c in ("input_ids", "attention_mask", "token_type_ids")]
    out = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = range(start, min(len(dataset), start + batch_size))
            batch = collator([{c: dataset[i][c] for c in columns} for i in rows])
            out.append(model(**{k: v.to(model.device) for k, v in batch.items()}).logits.argmax(-1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


class EpochScores(TrainerCallback):
    """Scores the model on the training set (against noisy and true labels) and the held-out set after each epoch."""

    def __init__(self, train, clean_labels, test, collator):
        self.train, self.test, self.collator = train, test, collator
        self.noisy, self.clean = np.array(train["labels"]), np.array(clean_labels)
        self.rows: list[dict] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        shares = fit_shares(predict(model, self.train, self.collator), self.noisy, self.clean)
        held_out = float((predict(model, self.test, self.collator) == np.array(self.test["labels"])).mean())
        self.rows.append({"epoch": round(state.epoch, 2), "test_accuracy": held_out, **shares})
        print(self.rows[-1], flush=True)


def scored_run(task_name: str, method: str, seed: int, output_dir: str, threads: int = 1, overrides=None):
    """Run `generalization.run_one` with an `EpochScores` callback; returns (per-epoch rows, the run's result row)."""
    task = {**bench.TASKS[task_name], **(overrides or {})}
    train, test, tokenizer, *_ = bench.text_data(task)
    clean_train, *_ = bench.text_data({**task, "noise": 0.0})
    scores = EpochScores(train, clean_train["labels"], test, DataCollatorWithPadding(tokenizer))
    cfg = {"task": task_name, "length": "long", "method": method, "scale": 1.0, "seed": seed, "device": "cpu",
           "threads": threads, "output_dir": output_dir, "overrides": overrides or {}}  # fmt: skip
    return scores.rows, bench.run_one(cfg, callbacks=[scores])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    noisy_text = [name for name, task in bench.TASKS.items() if task["noise"] and task["data"] not in bench.IMAGE_DATA]
    parser.add_argument("--task", choices=noisy_text, required=True)
    parser.add_argument("--method", default="none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=bench.RESULTS / "label_fit.jsonl")
    cli = parser.parse_args()
    output_dir = f"/tmp/label_fit/{cli.task}-{cli.method}-{cli.seed}"
    rows, result = scored_run(cli.task, cli.method, cli.seed, output_dir, cli.threads)
    with open(cli.results, "a") as f:
        for row in rows:
            f.write(json.dumps({"task": cli.task, "method": cli.method, "seed": cli.seed, **row}) + "\n")
    print(f"held out at the end: {result['accuracy']:.3f}")


if __name__ == "__main__":
    main()
