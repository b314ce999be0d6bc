#!/usr/bin/env python
"""Supervised fine-tuning of a causal language model with TRL's `SFTTrainer` and SAM.

The shape of TRL's own `trl/scripts/sft.py` (script arguments, the trainer's config and TRL's `ModelConfig`, parsed
together), with `SAMSFTTrainer` and `SAMSFTConfig` in place of `SFTTrainer` and `SFTConfig`: every `SFTConfig` and
`ModelConfig` flag works (`--use_peft --lora_r 16` for LoRA), plus the `sam_*` flags (`--sam_method sam`,
`--sam_method none` for the plain `SFTTrainer`). Needs `pip install "hf-sam[trl]"`.

A model from the Hub and a dataset from the Hub:

    python examples/language-modeling/run_sft.py --model_name_or_path Qwen/Qwen2-0.5B \
        --dataset_name trl-lib/Capybara --learning_rate 2e-5 --num_train_epochs 1 \
        --per_device_train_batch_size 2 --gradient_accumulation_steps 8 --output_dir /tmp/qwen-sft-sam \
        --sam_method sam --sam_rho 0.05 --use_peft --lora_r 32 --lora_alpha 16

Local data (JSON lines or CSV with `prompt`/`completion`, `text` or `messages` columns, or `--prompt_column` and
`--completion_column`) and a small model built from a config, with a local tokenizer folder, fully offline:

    python examples/language-modeling/prepare_movie_dialog.py --output_dir /tmp/movie-dialog
    python examples/language-modeling/run_sft.py --model_type llama --tokenizer_name /tmp/movie-dialog/tokenizer \
        --config_overrides hidden_size=128,intermediate_size=384,num_hidden_layers=2,num_attention_heads=4 \
        --train_file /tmp/movie-dialog/train.jsonl --validation_file /tmp/movie-dialog/validation.jsonl \
        --max_length 64 --eval_strategy epoch --output_dir /tmp/movie-sft --use_cpu --sam_method sam

Several GPUs or FSDP2: `accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml run_sft.py ...`.

Results: `all_results.json` in `--output_dir` holds the trainer's `train_*`/`eval_*` metrics, `eval_perplexity`
(exp of the evaluation loss: mean negative log-likelihood per completion token) and the `sam/*` metrics averaged
over the logged steps. What each `--sam_method` does with a causal LM: docs/language-models.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import ModelConfig, get_peft_config


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from example_utils import (  # noqa: E402
    LogFinalStepCallback,
    detect_last_checkpoint,
    from_pretrained,
    load_hub_dataset,
    parse_args,
    setup_logging,
    shutdown_distributed,
    train_and_save,
)

from hf_sam import SAMSFTConfig, SAMSFTTrainer  # noqa: E402


logger = logging.getLogger(__name__)

LOCAL_DATA_FLAGS = "--train_file / --validation_file"


@dataclass
class ScriptArguments:
    """The data, and a model built from a config when there is no pretrained one (`ModelConfig` holds the rest)."""

    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub (or a local folder)."})
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "The split to train on."})
    dataset_test_split: str = field(default="validation", metadata={"help": "The split to evaluate on."})
    train_file: str | None = field(default=None, metadata={"help": "Local training data: .json/.jsonl or .csv."})
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation data, same format."})
    prompt_column: str | None = field(default=None, metadata={"help": "Column renamed to `prompt`."})
    completion_column: str | None = field(default=None, metadata={"help": "Column renamed to `completion`."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation examples."})
    model_type: str | None = field(
        default=None, metadata={"help": "Without --model_name_or_path: build this architecture (e.g. llama)."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "With --model_type: config fields, e.g. hidden_size=128,num_hidden_layers=2."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or id (default: --model_name_or_path)."}
    )


def data_format(path: str) -> str:
    extension = path.rsplit(".", 1)[-1].lower()
    if extension in ("json", "jsonl"):
        return "json"
    if extension == "csv":
        return "csv"
    raise ValueError(f"{path!r}: give data as .json/.jsonl or .csv, not .{extension}.")


def load_data(script_args: ScriptArguments):
    """The training and evaluation splits (None without one), prompt and completion columns renamed."""
    if script_args.dataset_name is not None:
        name, config = script_args.dataset_name, script_args.dataset_config
        raw = load_hub_dataset(name, config, "--dataset_name", LOCAL_DATA_FLAGS)
        train_split, eval_split = script_args.dataset_train_split, script_args.dataset_test_split
    else:
        files = {
            split: path
            for split, path in (("train", script_args.train_file), ("validation", script_args.validation_file))
            if path is not None
        }
        if "train" not in files:
            raise ValueError(f"Pass --dataset_name or local data ({LOCAL_DATA_FLAGS}).")
        formats = {data_format(path) for path in files.values()}
        if len(formats) > 1:
            raise ValueError(f"Give all data files in one format (JSON or CSV), not {sorted(formats)}.")
        raw = load_dataset(formats.pop(), data_files=files)
        train_split, eval_split = "train", "validation"
    renames = {script_args.prompt_column: "prompt", script_args.completion_column: "completion"}
    for old, new in renames.items():
        if old is not None and old != new:
            columns = raw[train_split].column_names
            if old not in columns:
                raise ValueError(f"No column {old!r} in the data (it has: {', '.join(columns)}).")
            raw = raw.rename_column(old, new)
    train = raw[train_split]
    evaluation = raw[eval_split] if eval_split in raw else None
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    if evaluation is not None and script_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(script_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def load_model(script_args: ScriptArguments, model_args: ModelConfig, seed: int):
    """The tokenizer, and the model: pretrained from --model_name_or_path, or built from --model_type (seeded)."""
    tokenizer_name = script_args.tokenizer_name or model_args.model_name_or_path
    if tokenizer_name is None:
        raise ValueError("Pass --model_name_or_path, or --model_type with --tokenizer_name.")
    tokenizer = from_pretrained(AutoTokenizer, tokenizer_name, "--tokenizer_name")
    if model_args.model_name_or_path is not None:
        kwargs = {"revision": model_args.model_revision, "attn_implementation": model_args.attn_implementation}
        if model_args.dtype not in (None, "auto"):
            kwargs["dtype"] = model_args.dtype
        model = from_pretrained(AutoModelForCausalLM, model_args.model_name_or_path, "--model_name_or_path", **kwargs)
        return model, tokenizer
    if script_args.model_type is None:
        raise ValueError("Pass --model_name_or_path (a pretrained model) or --model_type (one built from a config).")
    config = AutoConfig.for_model(script_args.model_type)
    if script_args.config_overrides:
        config.update_from_string(script_args.config_overrides)
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    set_seed(seed)
    return AutoModelForCausalLM.from_config(config), tokenizer


def main(argv: list[str] | None = None) -> dict:
    """Run the example; `argv` defaults to `sys.argv[1:]` (or one .json file with all arguments).

    Returns every metric written to `all_results.json`.
    """
    script_args, training_args, model_args = parse_args((ScriptArguments, SAMSFTConfig, ModelConfig), argv)
    setup_logging(training_args, logger)
    last_checkpoint = detect_last_checkpoint(training_args)
    set_seed(training_args.seed)

    train, evaluation = load_data(script_args)
    model, tokenizer = load_model(script_args, model_args, training_args.seed)
    do_eval = training_args.eval_strategy != "no" or training_args.do_eval
    if do_eval and evaluation is None:
        raise ValueError("Evaluation needs a validation split: pass --validation_file or --dataset_test_split.")

    trainer = SAMSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation if do_eval else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[LogFinalStepCallback()],
    )
    metrics = train_and_save(trainer, len(train), training_args.resume_from_checkpoint or last_checkpoint)
    if do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(evaluation)
        eval_metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if trainer.is_world_process_zero():
        logger.info(f"all results: {json.dumps(metrics, sort_keys=True)}")
    shutdown_distributed()
    return metrics


if __name__ == "__main__":
    main()
