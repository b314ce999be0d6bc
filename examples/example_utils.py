"""Helpers the example scripts share: arguments, logging, resuming, the Hugging Face Hub, metrics, SAM reporting.

`text-classification/run_glue.py` and `image-classification/run_image_classification.py` put this folder on
`sys.path` and import from here, so each script keeps the shape of transformers' own example scripts without
carrying its own copy of these helpers.

Offline use follows `huggingface_hub`'s offline mode (`HF_HUB_OFFLINE=1`; datasets also reads
`HF_DATASETS_OFFLINE`): nothing here probes the network. When a model or dataset needs the Hub and the Hub cannot
be used, the libraries' own error is re-raised with a message saying what to pass instead.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import numpy as np
import torch.distributed as dist
import transformers
from datasets import load_dataset
from huggingface_hub import constants as hub_constants
from huggingface_hub import is_offline_mode
from huggingface_hub.errors import LocalEntryNotFoundError
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error
from transformers import EvalPrediction, HfArgumentParser, TrainerCallback, TrainingArguments


try:
    from hf_sam import METHODS
    from hf_sam.checkpoint import last_complete_checkpoint
    from hf_sam.methods import unknown_method_message
except ImportError:  # run from a checkout without `pip install -e .`: the repository root is this folder's parent
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from hf_sam import METHODS
    from hf_sam.checkpoint import last_complete_checkpoint
    from hf_sam.methods import unknown_method_message


logger = logging.getLogger(__name__)

# Environment variables that turn offline mode on, in the order the libraries read them.
HUB_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
DATASETS_OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", *HUB_OFFLINE_VARIABLES)


# ----------------------------------------------------------------------------- arguments, logging, resuming


def check_sam_method(argv: Sequence[str]) -> None:
    """Fail on a misspelled `--sam_method` with a suggestion (argparse would only list the choices).

    Args:
        argv (`Sequence[str]`): The command-line arguments, without the program name.

    Raises:
        `SystemExit`: When `--sam_method` names no known method.
    """
    for i, arg in enumerate(argv):
        value = None
        if arg in ("--sam_method", "--sam-method") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(("--sam_method=", "--sam-method=")):
            value = arg.split("=", 1)[1]
        if value is not None and value not in METHODS:
            raise SystemExit(f"error: {unknown_method_message(value)}")


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse the command line (or one `.json` file holding every argument) into the given dataclasses.

    Args:
        dataclass_types (`Sequence[type]`): The argument dataclasses, e.g. `(ModelArguments, DataTrainingArguments,
            SAMTrainingArguments)`.
        argv (`Sequence[str]`, *optional*): The arguments without the program name; defaults to `sys.argv[1:]`.

    Returns:
        `tuple`: One instance per dataclass, in the order given.
    """
    parser = HfArgumentParser(tuple(dataclass_types))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        # A .json file is checked by SAMTrainingArguments itself, which names the bad value too.
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    check_sam_method(argv)
    return parser.parse_args_into_dataclasses(args=argv)


def setup_logging(training_args: TrainingArguments, script_logger: logging.Logger) -> None:
    """Log to stdout at the process's log level (only the main process logs at info) and say how this run is set up.

    Args:
        training_args (`TrainingArguments`): The parsed training arguments (a `SAMTrainingArguments`).
        script_logger (`logging.Logger`): The calling script's logger, set to the same level.
    """
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    for each in (script_logger, logger):
        each.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    script_logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, n_gpu: {training_args.n_gpu},"
        f" world size: {training_args.world_size}, sam_method: {training_args.sam_method}"
        f" (rho {training_args.sam_rho})"
    )


def detect_last_checkpoint(training_args: TrainingArguments) -> str | None:
    """The newest complete checkpoint in `output_dir` to resume training from, or None.

    A checkpoint whose save was interrupted is skipped (`hf_sam.checkpoint.last_complete_checkpoint`), so a run
    killed while saving resumes from the one before.

    Args:
        training_args (`TrainingArguments`): The parsed training arguments.

    Returns:
        `str` or `None`: The checkpoint folder, or None when not training or when there is none.
    """
    if not (training_args.do_train and os.path.isdir(training_args.output_dir)):
        return None
    checkpoint = last_complete_checkpoint(training_args.output_dir)
    if checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.info(f"Checkpoint found at {checkpoint}: resuming from it.")
    return checkpoint


# ----------------------------------------------------------------------------- the Hub, offline or not


def offline_setting(variables: Sequence[str]) -> str:
    """Name the environment variable that put the libraries offline, for error messages (`"HF_HUB_OFFLINE=1 is set"`).

    Args:
        variables (`Sequence[str]`): The variables the library in question reads, first one first.
    """
    for name in variables:
        value = os.environ.get(name, "")
        if value.strip().upper() in hub_constants.ENV_VARS_TRUE_VALUES:
            return f"{name}={value} is set"
    return "offline mode is on"


def error_chain(error: BaseException) -> list[BaseException]:
    """`error`, the error it was raised from, and so on down to the first one (e.g. `ConnectError`)."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 32:  # the bound guards against a cause cycle
        chain.append(chain[-1].__cause__)
    return chain


def unreachable_hub_reason(error: BaseException) -> str:
    """Say which Hub endpoint failed and the innermost error behind `error` (e.g. `Connection refused`)."""
    cause = error_chain(error)[-1]
    return f"{hub_constants.ENDPOINT} did not answer: {type(cause).__name__}: {cause}"


def from_pretrained(cls: type, name_or_path: str, flag: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(name_or_path, **kwargs)`, with a clear message when the Hub is needed but cannot be used.

    Offline (`HF_HUB_OFFLINE=1`) transformers reads only its cache and fails at once when the files are not there;
    otherwise the Hub client's own retries run first. Either way the error then says what to pass instead.

    Args:
        cls (`type`): An auto class such as `AutoConfig` or `AutoModelForSequenceClassification`.
        name_or_path (`str`): A folder written by `save_pretrained()`, or a model id on the Hub.
        flag (`str`): The command-line flag that gave `name_or_path`, named in the error.
        **kwargs: Passed on to `cls.from_pretrained`.

    Raises:
        `OSError`: When `name_or_path` is not a local folder, not in the cache, and the Hub cannot be used.
    """
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        if os.path.isdir(name_or_path):
            raise
        if is_offline_mode():
            reason, advice = offline_setting(HUB_OFFLINE_VARIABLES), ""
        elif any(isinstance(each, LocalEntryNotFoundError) for each in error_chain(err)):
            # What huggingface_hub raises when the Hub did not answer and the cache does not have the files.
            reason = unreachable_hub_reason(err)
            advice = " Without network, set HF_HUB_OFFLINE=1: the cache is then used without contacting the Hub."
        else:  # the Hub answered: a wrong or private model id, whose message transformers already makes clear
            raise
        raise OSError(
            f"{flag} {name_or_path!r} is not a local folder and is not in the Hugging Face cache, and the Hub cannot"
            f" be used ({reason}). Pass a folder written by save_pretrained(), or download it once with network"
            f" access (`hf download {name_or_path}`) and run again.{advice}"
        ) from err


def load_hub_dataset(
    name: str, config_name: str | None, flag: str, local_data_flags: str, given: str | None = None, **kwargs: Any
):
    """`load_dataset(name, config_name, **kwargs)`, with a clear message when the Hub is needed but cannot be used.

    Args:
        name (`str`): A dataset id on the Hub, or a local dataset folder.
        config_name (`str`, *optional*): The dataset's configuration (a GLUE task, ...).
        flag (`str`): The command-line flag that gave `name`, named in the error.
        local_data_flags (`str`): The flags that give local data instead, suggested in the error.
        given (`str`, *optional*): What the error shows as the flag's value, when the user gave something other
            than `name` (run_glue's `--task_name mrpc` loads GLUE's dataset). Defaults to `name`.
        **kwargs: Passed on to `load_dataset`.

    Returns:
        `datasets.DatasetDict`: The splits of the dataset.

    Raises:
        `ConnectionError`: When the dataset is not in the local cache and the Hub cannot be used.
    """
    try:
        return load_dataset(name, config_name, **kwargs)
    except ConnectionError as err:
        if os.path.exists(name):
            raise
        if datasets.config.HF_HUB_OFFLINE:
            reason, advice = offline_setting(DATASETS_OFFLINE_VARIABLES), "Download it once with network access"
        else:
            reason = unreachable_hub_reason(err)
            advice = "Without network, set HF_HUB_OFFLINE=1 (a cached copy is then used without contacting the Hub)"
        raise ConnectionError(
            f"{flag} {given or repr(name)} is not in the local datasets cache and the Hub cannot be used ({reason})."
            f" {advice}, or pass local data ({local_data_flags})."
        ) from err


# ----------------------------------------------------------------------------- metrics


def load_hub_metric(*names: str):
    """`evaluate.load(*names)`, or None offline or when it fails: the caller then computes the metric locally.

    Args:
        *names (`str`): What `evaluate.load` takes, e.g. `("glue", "mrpc")` or `("accuracy",)`.

    Returns:
        `evaluate.EvaluationModule` or `None`.
    """
    if is_offline_mode():
        reason = offline_setting(HUB_OFFLINE_VARIABLES)
    else:
        try:
            import evaluate  # here, not at the top: offline runs never need it, and it is slow to import

            return evaluate.load(*names)
        except Exception as err:  # a missing metric dependency, the Hub failing mid-way, ...
            reason = f"{type(err).__name__}: {err}"
    logger.info(f"evaluate.load{names} is not available ({reason}): computing the metrics with scikit-learn/scipy.")
    return None


def local_metrics(task_name: str | None, is_regression: bool, preds: np.ndarray, labels: np.ndarray) -> dict:
    """The numbers `evaluate`'s `glue` metric gives (`accuracy` or `mse` without a GLUE task), without the Hub.

    Computed with the scikit-learn and scipy functions that metric calls: accuracy for every classification task,
    plus F1 of class 1 for MRPC and QQP, Matthews correlation alone for CoLA, Pearson and Spearman for STS-B.

    Args:
        task_name (`str`, *optional*): The GLUE task, or None for other data.
        is_regression (`bool`): Whether `preds` and `labels` are real numbers rather than class ids.
        preds (`np.ndarray`): The predicted class ids (or values), shape `(N,)`.
        labels (`np.ndarray`): The reference class ids (or values), shape `(N,)`.

    Returns:
        `dict[str, float]`: The metrics by the names `evaluate` gives them.
    """
    if is_regression:
        if task_name == "stsb":
            return {
                "pearson": float(pearsonr(preds, labels).statistic),
                "spearmanr": float(spearmanr(preds, labels).statistic),
            }
        return {"mse": float(mean_squared_error(labels, preds))}
    if task_name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, preds))}
    result = {"accuracy": float(accuracy_score(labels, preds))}
    if task_name in ("mrpc", "qqp"):
        # zero_division=0.0: the value sklearn's default gives when nothing is predicted positive, without a warning.
        result["f1"] = float(f1_score(labels, preds, zero_division=0.0))
    return result


def build_compute_metrics(task_name: str | None, is_regression: bool) -> Callable[[EvalPrediction], dict]:
    """The Trainer's `compute_metrics`: `evaluate`'s metric when it loads, else the same numbers from `local_metrics`.

    Args:
        task_name (`str`, *optional*): The GLUE task (its `glue` metric), or None (`accuracy`, or `mse` for
            regression).
        is_regression (`bool`): Whether the model predicts one real number rather than class logits.

    Returns:
        `Callable[[EvalPrediction], dict]`: Metrics by name, with their mean as `combined_score` when there are
        several (as in transformers' run_glue.py).
    """
    if task_name is not None:
        metric = load_hub_metric("glue", task_name)
    else:
        metric = load_hub_metric("mse" if is_regression else "accuracy")

    def compute_metrics(p: EvalPrediction) -> dict:
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
        labels = np.asarray(p.label_ids)
        if metric is not None:
            result = dict(metric.compute(predictions=preds, references=labels))
        else:
            result = local_metrics(task_name, is_regression, preds, labels)
        if len(result) > 1:
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    return compute_metrics


# ----------------------------------------------------------------------------- SAM reporting, shutdown


class LogFinalStepCallback(TrainerCallback):
    """Log at the last step too, so the final (partial) logging window's loss and `sam/*` metrics are reported."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.logging_strategy != "no":
            control.should_log = True
        return control


def train_and_save(trainer, train_samples: int, checkpoint: str | None) -> dict[str, Any]:
    """Train (resuming from `checkpoint` when given), save the model and the trainer state, and log and save the
    train metrics with `train_samples` and the `sam_summary` of the run. Returns those metrics."""
    metrics = dict(trainer.train(resume_from_checkpoint=checkpoint).metrics)
    metrics["train_samples"] = train_samples
    metrics.update(sam_summary(trainer.state.log_history))
    trainer.save_model()
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


# Recorded once per training step (or micro-batch) whatever the step does; every other `sam/*` metric is recorded
# only on SAM steps (the ascent, the loss at w + eps), so a window with few SAM steps holds few of its samples.
PER_STEP_METRICS = ("sam/sam_step_fraction", "sam/passes_per_step")


def sam_summary(log_history: list[dict]) -> dict[str, float]:
    """Mean of every logged `sam/*` (and SAF's `saf/*`, MESA's `mesa/*`) metric over training (`none` logs none).

    Each logged value is the mean over one logging window, and windows differ in length (the last one is usually
    shorter) and in how many SAM steps they hold (`asam`'s ramp, `late-sam`, ...). So each window counts by its
    number of steps, and a metric recorded only on SAM steps by its number of SAM steps (steps times
    `sam/sam_step_fraction`): the result is the mean over the run's steps, or over its SAM steps, as if logged once.

    Args:
        log_history (`list[dict]`): `trainer.state.log_history`.

    Returns:
        `dict[str, float]`: Each metric's mean, rounded to 6 decimals, sorted by name.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    previous_step = 0
    for entry in log_history:
        if "loss" not in entry:  # evaluation and the final train summary: no window of training steps
            continue
        step = int(entry.get("step", previous_step))
        steps, previous_step = max(step - previous_step, 0), step
        sam_steps = steps * float(entry.get("sam/sam_step_fraction", 1.0))
        for key, value in entry.items():
            if key.startswith(("sam/", "saf/", "mesa/")):
                weight = steps if key in PER_STEP_METRICS or not key.startswith("sam/") else sam_steps
                sums[key] = sums.get(key, 0.0) + weight * float(value)
                weights[key] = weights.get(key, 0.0) + weight
    return {key: round(sums[key] / weights[key], 6) for key in sorted(sums) if weights[key] > 0}


def shutdown_distributed() -> None:
    """Free the DDP wrapper, then close the process group: left to interpreter exit, gloo can abort (SIGABRT)."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
