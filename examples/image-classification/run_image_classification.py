#!/usr/bin/env python
"""Fine-tune (or train from a config) an image classifier such as ViT with SAM.

The shape of transformers' `examples/pytorch/image-classification/run_image_classification.py`, with `SAMTrainer`
and `SAMTrainingArguments`: every `TrainingArguments` flag works, plus the `sam_*` flags. Images go through the
model's image processor (resize, rescale, normalize; no torchvision needed), with an optional random horizontal
flip for training. `--remove_unused_columns` is set to False for you: the transform needs the image column.

A dataset on the Hub:

    python examples/image-classification/run_image_classification.py \
        --model_name_or_path google/vit-base-patch16-224-in21k --dataset_name uoft-cs/cifar10 \
        --image_column_name img --do_train --do_eval --per_device_train_batch_size 32 \
        --learning_rate 2e-5 --num_train_epochs 3 --output_dir /tmp/cifar10-sam --sam_method sam

A folder of images, one sub-folder per class (`train/cat/1.png`, ...):

    python examples/image-classification/run_image_classification.py --model_name_or_path ./my-vit \
        --train_dir ./images/train --validation_dir ./images/val --do_train --do_eval \
        --output_dir /tmp/out --sam_method asam

Local arrays (`.npz` with `images` of shape (N, H, W) or (N, H, W, C), uint8, and integer `labels`), and a
small ViT built from a config instead of a checkpoint:

    python examples/image-classification/run_image_classification.py --train_file digits.npz \
        --model_type vit --config_overrides "image_size=28,patch_size=7,hidden_size=64,num_hidden_layers=4,\
num_attention_heads=4,intermediate_size=128,num_channels=1" --do_train --do_eval --learning_rate 1e-3 \
        --num_train_epochs 20 --per_device_train_batch_size 64 --output_dir /tmp/digits --sam_method sam

Several GPUs / nodes / FSDP2 (configs in examples/accelerate_configs/), and two CPU processes:

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml \
        examples/image-classification/run_image_classification.py --model_name_or_path ... --output_dir ...
    torchrun --nproc_per_node 2 examples/image-classification/run_image_classification.py --use_cpu ...

Results: `all_results.json` in `--output_dir` holds the Trainer's metrics plus the `sam/*` metrics averaged over
the logged steps.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    default_data_collator,
    set_seed,
)
from transformers.utils import is_torchvision_available


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

IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label")
LOCAL_DATA_FLAGS = "--train_dir or --train_file"  # suggested when a dataset on the Hub cannot be loaded


@dataclass
class ModelArguments:
    """Which model and image processor to train: a checkpoint, or a model type plus config overrides."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local folder (save_pretrained) or model id on huggingface.co/models."}
    )
    model_type: str | None = field(
        default=None, metadata={"help": "Train from scratch: a model type such as 'vit' (no --model_name_or_path)."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "With --model_type: 'key=value,...' applied to the default config."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor name or path, if not the model's."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloads from the Hub are stored."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialize a classification head whose number of labels differs."}
    )

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.model_type is None):
            raise ValueError(
                "Pass exactly one of --model_name_or_path (a checkpoint) and --model_type (from scratch)."
            )


@dataclass
class DataTrainingArguments:
    """Which images to train and evaluate on."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Dataset on the Hub, a local dataset dir, or 'imagefolder' (with --train_dir)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder: one sub-folder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for evaluation."})
    train_file: str | None = field(default=None, metadata={"help": ".npz with arrays 'images' and 'labels'."})
    validation_file: str | None = field(default=None, metadata={"help": ".npz for evaluation."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (default: image or img)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (default: label(s))."})
    train_val_split: float = field(default=0.15, metadata={"help": "Held-out share when there is no validation."})
    random_horizontal_flip: bool = field(default=False, metadata={"help": "Flip training images at random."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation examples."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_dir is None and self.train_file is None:
            if self.validation_dir is None and self.validation_file is None:
                raise ValueError("Give data: --dataset_name, --train_dir/--validation_dir or --train_file (.npz).")
        for name in ("train_dir", "validation_dir"):
            path = getattr(self, name)
            if path is not None and not os.path.isdir(path):
                raise FileNotFoundError(f"--{name} {path!r} is not a folder.")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and not (os.path.isfile(path) and path.endswith(".npz")):
                raise FileNotFoundError(f"--{name} {path!r} must be an existing .npz file.")


# ----------------------------------------------------------------------------- data


def load_arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The `images` and `labels` arrays of an `.npz` file."""
    with np.load(path) as arrays:
        missing = [key for key in ("images", "labels") if key not in arrays]
        if missing:
            raise ValueError(f"{path!r} has no array(s) {missing}; it has {list(arrays)}. Save images= and labels=.")
        return arrays["images"], arrays["labels"]


def arrays_to_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]) -> Dataset:
    """`images` (N, H, W[, C]) and integer `labels` (N,) as a dataset of PIL images, with class names `names`."""
    if images.dtype != np.uint8:
        scale = 255.0 if images.max() <= 1.0 else 1.0
        images = np.clip(images * scale, 0, 255).astype(np.uint8)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    index = {name: i for i, name in enumerate(names)}
    return Dataset.from_dict(
        {"image": list(images), "label": [index[str(label)] for label in labels.tolist()]}, features=features
    )


def load_raw_data(data_args: DataTrainingArguments, cache_dir: str | None) -> DatasetDict:
    if data_args.train_file is not None or data_args.validation_file is not None:
        splits = {"train": data_args.train_file, "validation": data_args.validation_file}
        arrays = {split: load_arrays(path) for split, path in splits.items() if path is not None}
        # The class names of all files together: one id per class in every split (a validation file without some
        # class must not renumber the others).
        labels = set().union(*(split_labels.tolist() for _, split_labels in arrays.values()))
        names = [str(label) for label in sorted(labels)]
        return DatasetDict({split: arrays_to_dataset(*pair, names) for split, pair in arrays.items()})
    if data_args.dataset_name in (None, "imagefolder"):
        if data_args.train_dir is None and data_args.validation_dir is None:
            raise ValueError("--dataset_name imagefolder needs --train_dir (and optionally --validation_dir).")
        files = {}
        if data_args.train_dir is not None:
            files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir is not None:
            files["validation"] = os.path.join(data_args.validation_dir, "**")
        return load_dataset("imagefolder", data_files=files, cache_dir=cache_dir)
    return load_hub_dataset(
        data_args.dataset_name, data_args.dataset_config_name, "--dataset_name", LOCAL_DATA_FLAGS, cache_dir=cache_dir
    )


def pick_column(dataset: Dataset, given: str | None, candidates: tuple[str, ...], flag: str) -> str:
    columns = dataset.column_names
    if given is not None:
        if given not in columns:
            raise ValueError(f"{flag} {given!r} is not a column of the data; its columns are: {', '.join(columns)}.")
        return given
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"Found none of the columns {', '.join(candidates)} (columns: {', '.join(columns)}); set {flag}.")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    """Run the example; `argv` defaults to `sys.argv[1:]` (or one .json file with all arguments).

    Returns every metric written to `all_results.json`.
    """
    model_args, data_args, training_args = parse_args(
        (ModelArguments, DataTrainingArguments, SAMTrainingArguments), argv
    )
    setup_logging(training_args, logger)
    if training_args.remove_unused_columns:
        # The transform below turns the image column into `pixel_values` when a batch is read; Trainer would
        # otherwise drop the image column first because the model's forward() has no such argument.
        logger.info("Setting remove_unused_columns=False: the image transform needs the image column.")
        training_args.remove_unused_columns = False

    last_checkpoint = detect_last_checkpoint(training_args)
    set_seed(training_args.seed)

    # ------------------------------------------------------------------ data
    raw = load_raw_data(data_args, model_args.cache_dir)
    if training_args.do_eval and "validation" not in raw:
        if "test" in raw:
            raw["validation"] = raw.pop("test")
        elif "train" in raw and 0 < data_args.train_val_split < 1:
            split = raw["train"].train_test_split(data_args.train_val_split, seed=training_args.seed)
            raw["train"], raw["validation"] = split["train"], split["test"]
    needed = (["train"] if training_args.do_train else []) + (["validation"] if training_args.do_eval else [])
    if not needed:
        raise ValueError("Nothing to do: pass --do_train and/or --do_eval.")
    for split in needed:
        if split not in raw:
            raise ValueError(f"The data has no {split!r} split (it has: {', '.join(raw)}).")
    reference = raw[needed[0]]
    image_column = pick_column(reference, data_args.image_column_name, IMAGE_COLUMNS, "--image_column_name")
    label_column = pick_column(reference, data_args.label_column_name, LABEL_COLUMNS, "--label_column_name")
    for split in needed:
        for column, flag in ((image_column, "--image_column_name"), (label_column, "--label_column_name")):
            pick_column(raw[split], column, (), flag)

    label_feature = reference.features[label_column]
    if isinstance(label_feature, ClassLabel):
        label_list, label_to_id = list(label_feature.names), None
    else:
        label_list = sorted({label for split in needed for label in raw[split][label_column]}, key=str)
        label_to_id = {label: i for i, label in enumerate(label_list)}
    if len(label_list) < 2:
        raise ValueError(f"Column {label_column!r} has {len(label_list)} distinct label(s); need at least 2.")
    label2id = {str(label): i for i, label in enumerate(label_list)}
    id2label = {i: str(label) for i, label in enumerate(label_list)}

    # ------------------------------------------------------------------ model and image processor
    common = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.model_name_or_path is not None:
        config = from_pretrained(
            AutoConfig,
            model_args.config_name or model_args.model_name_or_path,
            "--config_name" if model_args.config_name else "--model_name_or_path",
            num_labels=len(label_list),
            label2id=label2id,
            id2label=id2label,
            finetuning_task="image-classification",
            **common,
        )
        model = from_pretrained(
            AutoModelForImageClassification,
            model_args.model_name_or_path,
            "--model_name_or_path",
            config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **common,
        )
    else:
        config = AutoConfig.for_model(model_args.model_type)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        config.num_labels, config.label2id, config.id2label = len(label_list), label2id, id2label
        model = AutoModelForImageClassification.from_config(config)
    processor_name = model_args.image_processor_name or model_args.model_name_or_path
    if processor_name is not None:
        flag = "--image_processor_name" if model_args.image_processor_name else "--model_name_or_path"
        image_processor = from_pretrained(AutoImageProcessor, processor_name, flag, **common)
    else:
        size = int(getattr(config, "image_size", 224))
        if is_torchvision_available():
            from transformers import ViTImageProcessor as processor_class
        else:
            from transformers import ViTImageProcessorPil as processor_class
        channels = int(getattr(config, "num_channels", 3))
        image_processor = processor_class(
            size={"height": size, "width": size}, image_mean=[0.5] * channels, image_std=[0.5] * channels
        )
    mode = "L" if getattr(config, "num_channels", 3) == 1 else "RGB"

    def transform(train: bool):
        def apply(batch):
            images = [image.convert(mode) for image in batch[image_column]]
            pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
            if train and data_args.random_horizontal_flip:
                flip = torch.rand(len(images)) < 0.5
                pixel_values[flip] = pixel_values[flip].flip(-1)
            labels = batch[label_column]
            if label_to_id is not None:
                labels = [label_to_id[label] for label in labels]
            out = {"pixel_values": pixel_values, "labels": labels}
            if "idx" in batch:  # the example index SAMTrainer adds for --sam_method saf
                out["idx"] = batch["idx"]
            return out

        return apply

    def prepare(split: str, max_samples: int | None, train: bool):
        dataset = raw[split]
        if max_samples is not None:
            dataset = dataset.shuffle(seed=training_args.seed).select(range(min(max_samples, len(dataset))))
        dataset.set_transform(transform(train))
        return dataset

    train_dataset = prepare("train", data_args.max_train_samples, True) if training_args.do_train else None
    eval_dataset = prepare("validation", data_args.max_eval_samples, False) if training_args.do_eval else None

    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=image_processor,
        data_collator=default_data_collator,
        compute_metrics=build_compute_metrics(task_name=None, is_regression=False),  # accuracy
        callbacks=[LogFinalStepCallback()],
    )

    # ------------------------------------------------------------------ train / evaluate
    results: dict = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        results.update(train_and_save(trainer, len(train_dataset), checkpoint))

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)

    if trainer.is_world_process_zero():
        logger.info("all_results.json:\n" + json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
    shutdown_distributed()
