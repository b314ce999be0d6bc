#!/usr/bin/env python
"""Fine-tune a sequence classifier on GLUE or on your own CSV/JSON files with SAM.

The shape of transformers' `examples/pytorch/text-classification/run_glue.py`, with `SAMTrainer` and
`SAMTrainingArguments` in place of `Trainer` and `TrainingArguments`: every `TrainingArguments` flag works, plus
the `sam_*` flags (`--sam_method sam --sam_rho 0.05`, `--sam_method none` for the plain Trainer).

One process (GPU if there is one, else CPU):

    python examples/text-classification/run_glue.py \
        --model_name_or_path google-bert/bert-base-cased --task_name mrpc \
        --do_train --do_eval --max_seq_length 128 --per_device_train_batch_size 32 \
        --learning_rate 2e-5 --num_train_epochs 3 --output_dir /tmp/mrpc-sam \
        --sam_method sam --sam_rho 0.05

Your own data (CSV or JSON lines; text in `sentence` or `sentence1`/`sentence2` or `--text_column_names`,
labels in `label` or `--label_column_name`):

    python examples/text-classification/run_glue.py --model_name_or_path ./my-model \
        --train_file train.csv --validation_file dev.csv --text_column_names question \
        --label_column_name label --do_train --do_eval --output_dir /tmp/out --sam_method asam

Several GPUs / nodes / FSDP2 through accelerate (configs in examples/accelerate_configs/):

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml \
        examples/text-classification/run_glue.py --model_name_or_path google-bert/bert-base-cased \
        --task_name mrpc --do_train --do_eval --output_dir /tmp/mrpc-sam --sam_method sam

Two CPU processes (real DDP over gloo; `accelerate launch --cpu` starts only one process):

    torchrun --nproc_per_node 2 examples/text-classification/run_glue.py --use_cpu ...

Results: `all_results.json` in `--output_dir` holds the Trainer's `train_*`/`eval_*` metrics plus `sam/*`, the
SAM metrics (sharpness, ascent gradient norm, passes per step, ...) averaged over the logged steps.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    default_data_collator,
    set_seed,
)


# The helpers both example scripts share live in examples/example_utils.py (which also finds hf_sam in a checkout).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from example_utils import (
    LogFinalStepCallback,
    build_compute_metrics,
    detect_last_checkpoint,
    from_pretrained,
    load_hub_dataset,
    parse_args,
    setup_logging,
    shutdown_distributed,
    train_and_save,
)

from hf_sam import SAMTrainer, SAMTrainingArguments


logger = logging.getLogger(__name__)

TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
GLUE_DATASET = "nyu-mll/glue"
LOCAL_DATA_FLAGS = "--train_file/--validation_file"  # suggested when a dataset on the Hub cannot be loaded


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to fine-tune."""

    model_name_or_path: str = field(
        metadata={"help": "Local folder (written by save_pretrained) or model id on huggingface.co/models."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloads from the Hub are stored."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialize a classification head whose number of labels differs."}
    )


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on."""

    task_name: str | None = field(default=None, metadata={"help": "GLUE task: " + ", ".join(TASK_TO_KEYS)})
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset on the Hub (or a local dataset dir)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "CSV or JSON(-lines) file with training data."})
    validation_file: str | None = field(default=None, metadata={"help": "CSV or JSON file with validation data."})
    test_file: str | None = field(default=None, metadata={"help": "CSV or JSON file to predict on."})
    text_column_names: str | None = field(
        default=None,
        metadata={
            "help": "One or two comma-separated text columns (default: the GLUE task's, else sentence1,sentence2,"
            " else the first one or two non-label columns)."
        },
    )
    label_column_name: str = field(default="label", metadata={"help": "Column holding the label."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every input to max_seq_length (default: pad each batch)."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo the tokenization instead of the cache."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep the first N test examples."})

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in TASK_TO_KEYS:
                raise ValueError(
                    f"--task_name {self.task_name!r} is not a GLUE task; choose one of {', '.join(TASK_TO_KEYS)}"
                    " or pass --train_file/--validation_file."
                )
        elif self.dataset_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError("Give data: --task_name, --dataset_name, or --train_file/--validation_file.")
        for name in ("train_file", "validation_file", "test_file"):
            path = getattr(self, name)
            if path is None:
                continue
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--{name} {path!r} does not exist.")
            if data_format(path) is None:
                raise ValueError(f"--{name} {path!r} must be a .csv, .json or .jsonl file.")


# ----------------------------------------------------------------------------- data


def data_format(path: str) -> str | None:
    """The `load_dataset` builder for a data file (`csv` or `json`), or None for another extension."""
    extension = path.rsplit(".", 1)[-1].lower()
    return {"csv": "csv", "json": "json", "jsonl": "json"}.get(extension)


def sorted_labels(labels: set) -> list:
    """The distinct labels in order: numbers by value (so integer labels 0..N-1 get ids 0..N-1, as in transformers'
    run_glue), anything else by its text."""
    if all(isinstance(label, (int, float)) and not isinstance(label, bool) for label in labels):
        return sorted(labels)
    return sorted(labels, key=str)


def model_label_order(config, label_list: list) -> list | None:
    """`label_list` in the order the model's config numbers these labels, or None when it names other classes.

    A fine-tuned checkpoint already has a class for each label: its head answers in that order, so evaluating or
    fine-tuning it with the data's own order would read every class as another one. Names match case-insensitively,
    as in transformers' run_glue (`ENTAILMENT` in a config, `entailment` in GLUE).

    Args:
        config (`PretrainedConfig`): The model's config, loaded with `num_labels=len(label_list)`.
        label_list (`list`): The data's distinct labels (or `ClassLabel` names).
    """
    names = {str(name).lower(): int(i) for name, i in config.label2id.items()}
    data = {str(label).lower(): label for label in label_list}
    if (
        config.label2id == {f"LABEL_{i}": i for i in range(len(label_list))}  # a config that names no classes
        or len(data) != len(label_list)
        or set(names) != set(data)
        or sorted(names.values()) != list(range(len(label_list)))
    ):
        return None
    order = [None] * len(label_list)
    for name, i in names.items():
        order[i] = data[name]
    return order


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    """Run the example; `argv` defaults to `sys.argv[1:]` (or one .json file with all arguments).

    Returns every metric written to `all_results.json`.
    """
    model_args, data_args, training_args = parse_args(
        (ModelArguments, DataTrainingArguments, SAMTrainingArguments), argv
    )
    setup_logging(training_args, logger)
    last_checkpoint = detect_last_checkpoint(training_args)
    set_seed(training_args.seed)

    # ------------------------------------------------------------------ data
    if data_args.task_name is not None:
        raw = load_hub_dataset(
            GLUE_DATASET,
            data_args.task_name,
            "--task_name",
            LOCAL_DATA_FLAGS,
            given=f"{data_args.task_name!r} (GLUE: {GLUE_DATASET})",  # the task the user named, not the dataset id
            cache_dir=model_args.cache_dir,
        )
    elif data_args.dataset_name is not None:
        raw = load_hub_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            "--dataset_name",
            LOCAL_DATA_FLAGS,
            cache_dir=model_args.cache_dir,
        )
    else:
        files = {
            split: path
            for split, path in (
                ("train", data_args.train_file),
                ("validation", data_args.validation_file),
                ("test", data_args.test_file),
            )
            if path is not None
        }
        formats = {data_format(path) for path in files.values()}
        if len(formats) > 1:
            raise ValueError(f"Give all data files in one format (CSV or JSON), not {sorted(formats)}.")
        raw = load_dataset(formats.pop(), data_files=files, cache_dir=model_args.cache_dir)

    eval_split = "validation_matched" if data_args.task_name == "mnli" else "validation"
    test_split = "test_matched" if data_args.task_name == "mnli" else "test"
    needed = []
    if training_args.do_train:
        needed.append("train")
    if training_args.do_eval:
        needed.append(eval_split)
    if training_args.do_predict:
        needed.append(test_split)
    for split in needed:
        if split not in raw:
            raise ValueError(f"The data has no {split!r} split (it has: {', '.join(raw)}).")
    if not needed:
        raise ValueError("Nothing to do: pass --do_train, --do_eval and/or --do_predict.")
    labelled = [s for s in ("train", eval_split) if s in raw]
    if not labelled:
        raise ValueError("Need a train or validation split with labels.")
    reference = raw[labelled[0]]

    label_column = data_args.label_column_name
    for split in labelled:
        if label_column not in raw[split].column_names:
            raise ValueError(
                f"--label_column_name {label_column!r} is not a column of the {split!r} data; its columns are:"
                f" {', '.join(raw[split].column_names)}."
            )

    if data_args.text_column_names is not None:
        keys = [name.strip() for name in data_args.text_column_names.split(",") if name.strip()]
        if not 1 <= len(keys) <= 2:
            raise ValueError(f"--text_column_names takes one or two comma-separated columns, got {keys}.")
    elif data_args.task_name is not None:
        keys = [k for k in TASK_TO_KEYS[data_args.task_name] if k is not None]
    else:
        others = [name for name in reference.column_names if name not in (label_column, "idx")]
        if "sentence1" in others and "sentence2" in others:
            keys = ["sentence1", "sentence2"]
        elif "sentence" in others:
            keys = ["sentence"]
        else:
            keys = others[:2]
    for split in needed:
        missing = [k for k in keys if k not in raw[split].column_names]
        if missing:
            raise ValueError(
                f"Text column(s) {', '.join(map(repr, missing))} not in the {split!r} data; its columns are:"
                f" {', '.join(raw[split].column_names)}. Choose them with --text_column_names."
            )

    label_feature = reference.features[label_column]
    if data_args.task_name is not None:
        is_regression = data_args.task_name == "stsb"
    else:
        is_regression = getattr(label_feature, "dtype", None) in ("float16", "float32", "float64")
    label_to_id = None
    if is_regression:
        num_labels, label_list = 1, None
    elif isinstance(label_feature, datasets.ClassLabel):
        label_list = list(label_feature.names)
        num_labels = len(label_list)
    else:
        labels = [label for split in labelled for label in raw[split][label_column]]
        several = next((label for label in labels if isinstance(label, (list, dict))), None)
        if several is not None:  # e.g. a JSON list of labels per example (a set of labels cannot hold them)
            raise ValueError(
                f"Column {label_column!r} holds lists or objects (e.g. {several!r}), not one label per example:"
                " multi-label classification is not supported by this script."
            )
        label_list = sorted_labels(set(labels))
        label_to_id = {label: i for i, label in enumerate(label_list)}
        num_labels = len(label_list)
        if num_labels < 2:
            raise ValueError(f"Column {label_column!r} has {num_labels} distinct label(s); need at least 2.")

    # ------------------------------------------------------------------ model
    config = from_pretrained(
        AutoConfig,
        model_args.config_name or model_args.model_name_or_path,
        "--config_name" if model_args.config_name else "--model_name_or_path",
        num_labels=num_labels,
        finetuning_task=data_args.task_name,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    if label_list is not None:
        model_order = model_label_order(config, label_list)
        if model_order is not None and model_order != label_list:
            logger.info(f"Keeping the model's class ids {config.label2id} for the labels {label_list}.")
            position = {label: i for i, label in enumerate(model_order)}
            if label_to_id is None:  # ClassLabel: the data holds indices into label_list; -1 is an unlabelled row
                label_to_id = {i: position[name] for i, name in enumerate(label_list)} | {-1: -1}
            else:
                label_to_id = {label: position[label] for label in label_list}
            label_list = model_order
        config.label2id = {str(label): i for i, label in enumerate(label_list)}
        config.id2label = {i: str(label) for i, label in enumerate(label_list)}
    tokenizer = from_pretrained(
        AutoTokenizer,
        model_args.tokenizer_name or model_args.model_name_or_path,
        "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path",
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    model = from_pretrained(
        AutoModelForSequenceClassification,
        model_args.model_name_or_path,
        "--model_name_or_path",
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )

    max_seq_length = data_args.max_seq_length
    if max_seq_length > tokenizer.model_max_length:
        logger.warning(f"--max_seq_length {max_seq_length} > the model's {tokenizer.model_max_length}: using that.")
        max_seq_length = tokenizer.model_max_length
    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess(examples):
        texts = [examples[key] for key in keys]
        result = tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)
        if label_column in examples:
            labels = examples[label_column]
            if label_to_id is not None:
                unknown = sorted({str(label) for label in labels if label not in label_to_id})
                if unknown:
                    raise ValueError(f"Labels {unknown} are not among the known labels {label_list}.")
                labels = [label_to_id[label] for label in labels]
            result["labels"] = labels
        return result

    def prepare(split: str, max_samples: int | None):
        dataset = raw[split]
        if max_samples is not None:
            dataset = dataset.select(range(min(max_samples, len(dataset))))
        with training_args.main_process_first(desc=f"tokenizing {split}"):
            return dataset.map(
                preprocess,
                batched=True,
                num_proc=data_args.preprocessing_num_workers,
                remove_columns=dataset.column_names,
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"Tokenizing {split}",
            )

    train_dataset = prepare("train", data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = prepare(eval_split, data_args.max_eval_samples) if training_args.do_eval else None
    predict_dataset = None
    if training_args.do_predict:
        predict_dataset = prepare(test_split, data_args.max_predict_samples)
        if "labels" in predict_dataset.column_names:
            predict_dataset = predict_dataset.remove_columns("labels")

    if data_args.pad_to_max_length:
        data_collator = default_data_collator
    else:
        data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)

    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=build_compute_metrics(data_args.task_name, is_regression),
        callbacks=[LogFinalStepCallback()],
    )

    # ------------------------------------------------------------------ train / evaluate / predict
    results: dict = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        results.update(train_and_save(trainer, len(train_dataset), checkpoint))

    if training_args.do_eval:
        tasks, eval_datasets = [data_args.task_name], [eval_dataset]
        if data_args.task_name == "mnli":
            tasks.append("mnli-mm")
            eval_datasets.append(prepare("validation_mismatched", data_args.max_eval_samples))
        for task, dataset in zip(tasks, eval_datasets):
            metrics = trainer.evaluate(eval_dataset=dataset)
            metrics["eval_samples"] = len(dataset)
            if task == "mnli-mm":
                metrics = {f"{key}_mm": value for key, value in metrics.items()}
            trainer.log_metrics("eval", metrics)
            trainer.save_metrics("eval", metrics, combined=True)
            results.update(metrics)

    if training_args.do_predict:
        predictions = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
        predictions = np.squeeze(predictions) if is_regression else np.argmax(predictions, axis=1)
        if trainer.is_world_process_zero():
            name = data_args.task_name or "test"
            path = os.path.join(training_args.output_dir, f"predict_results_{name}.txt")
            with open(path, "w") as writer:
                writer.write("index\tprediction\n")
                for index, item in enumerate(predictions):
                    value = f"{item:3.3f}" if is_regression else str(label_list[item])
                    writer.write(f"{index}\t{value}\n")

    if trainer.is_world_process_zero():
        logger.info("all_results.json:\n" + json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
    shutdown_distributed()
