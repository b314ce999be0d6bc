"""Method state in checkpoints: tensors only (safetensors), so resuming never unpickles arbitrary objects.

The file carries, besides the tensors, the method that wrote it, the perturbed parameter set it was written for
and a SHA-256 digest of every tensor's bytes, so a resume into another setting, a truncated file or a flipped
byte is refused with an error that names the file, instead of training on wrong state.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .methods import METHODS
from .momentum_sam import base_optimizer
from .perturbation import optimizer_held, select_perturbed


logger = logging.get_logger(__name__)

STATE_FILE = "sam_state{suffix}.safetensors"
FORMAT_VERSION = "2"
# A stored gradient-sized value above this has a square that overflows float32, so any norm taken over it is inf:
# no state hf_sam writes comes near it, and a flipped exponent bit lands far above it.
MAX_STATE_MAGNITUDE = 1e18


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_sam_state(
    output_dir: str,
    method: str,
    tensors: dict[str, torch.Tensor],
    suffix: str = "",
    settings: dict[str, str] | None = None,
) -> None:
    """Write `tensors` (the method state) to `output_dir/sam_state{suffix}.safetensors`.

    Args:
        output_dir (`str`): The checkpoint folder.
        method (`str`): The running `sam_method`, checked on resume.
        tensors (`dict[str, torch.Tensor]`): The state.
        suffix (`str`): `-rank{i}` under several processes, so per-rank state (local ascent) comes back to its rank.
        settings (`dict[str, str]`, *optional*): What the state was written for (the perturbed set), checked on
            resume by `load_sam_state`.
    """
    payload = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    # safetensors cannot store an empty file's worth of nothing meaningfully; keep a format marker tensor.
    payload["__format__"] = torch.tensor([int(FORMAT_VERSION)])
    metadata = {
        "sam_method": method,
        "format": FORMAT_VERSION,
        "digest": state_digest(payload),
        "settings": json.dumps(settings or {}, sort_keys=True),
    }
    # Under DDP the other ranks can get here before rank 0 has created the checkpoint folder.
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, STATE_FILE.format(suffix=suffix))
    save_file(payload, path, metadata=metadata)


def load_sam_state(
    checkpoint: str, method: str, suffix: str = "", settings: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Read the method state of `checkpoint`, after checking it is intact and was written by this setting.

    Args:
        checkpoint (`str`): The checkpoint folder.
        method (`str`): The running `sam_method`.
        suffix (`str`): `-rank{i}` under several processes.
        settings (`dict[str, str]`, *optional*): This run's settings (as passed to `save_sam_state`); each one
            the file also records must match.

    Raises:
        `ValueError`: the file is missing, unreadable, altered since it was written (digest), holds non-finite or
        overflowing values, or was written by another method or setting. The pieces that take the state check its
        keys and shapes.
    """
    name = STATE_FILE.format(suffix=suffix)
    path = os.path.join(checkpoint, name)
    if not os.path.isfile(path):
        raise ValueError(
            f"Cannot resume sam_method={method!r} from {checkpoint}: it has no {name}, {_why_no_state(checkpoint)}"
        )
    corrupt = (
        f"The file is truncated or corrupt (a save cut off, a disk or copy error): resume from an earlier"
        f" checkpoint, or start a new run from the weights of {checkpoint}."
    )
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(path)
        # A string inside the header: a flipped byte there can leave the header whole and the settings unreadable.
        saved_settings = json.loads(metadata.get("settings") or "{}")
    except Exception as err:  # safetensors raises its own error type, or OSError, for a damaged file
        raise ValueError(f"Cannot read {path}, the method state of checkpoint {checkpoint}: {err}. {corrupt}") from err
    saved_method = metadata.get("sam_method")
    if saved_method != method:
        raise ValueError(
            f"{path} was written by sam_method={saved_method!r} but this run uses sam_method={method!r}."
            " Resume with the same --sam_method, or start a new run from the weights."
        )
    if metadata.get("digest") is not None and metadata["digest"] != state_digest(tensors):
        raise ValueError(f"{path}: its tensors no longer match the digest written with them. {corrupt}")
    _check_values(tensors, path, corrupt)
    _check_settings(saved_settings, settings or {}, path)
    tensors.pop("__format__", None)
    return tensors


def _why_no_state(checkpoint: str) -> str:
    """Why `checkpoint` has no state file for this rank, and what to do, read from the files it holds."""
    files = os.listdir(checkpoint) if os.path.isdir(checkpoint) else []
    others = sorted(f for f in files if re.fullmatch(r"sam_state(-rank\d+)?\.safetensors", f))
    if others:
        return (
            f"so it was written by another number of processes (it holds {', '.join(others[:2])}"
            f"{', ...' if len(others) > 2 else ''}): resume with as many processes as wrote it."
        )
    restart = (
        "To start SAM from those weights instead, load the model from the checkpoint folder and train without"
        " resume_from_checkpoint."
    )
    # Trainer writes its RNG state with the optimizer's, under every backend, unless save_only_model is set.
    if not any(re.fullmatch(r"rng_state(_\d+)?\.pth", f) for f in files):
        return f"as it was written with save_only_model=True (no optimizer or method state). {restart}"
    return (
        "so it was written by the plain Trainer or by SAMTrainer with sam_method='none', which keep no method state."
        f" {restart}"
    )


def _state_file_header(checkpoint: str, suffix: str = "") -> tuple[dict[str, str], list[str]] | None:
    """The metadata and tensor names of `checkpoint`'s state file (its header only), or None when it has none or it
    cannot be read (then `load_sam_state` says why, where a run needs the file)."""
    path = os.path.join(checkpoint, STATE_FILE.format(suffix=suffix))
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}, list(handle.keys())
    except Exception:  # a damaged file: `load_sam_state` refuses it with the full explanation
        return None


def saved_method(checkpoint: str, suffix: str = "") -> str | None:
    """The `sam_method` recorded in `checkpoint`'s state file, or None when it has none or it cannot be read."""
    header = _state_file_header(checkpoint, suffix)
    return header[0].get("sam_method") if header is not None else None


def check_saved_average(trainer, checkpoint: str) -> None:
    """Refuse, for a run without a weight average (`weight_ema_decay=0`), a checkpoint whose state file holds one: the
    average would be dropped and the model left after training be the trained weights, without a word under `none`
    (which reads no state file then) and under another method with a message that named no field."""
    if trainer.args.weight_ema_decay > 0:
        return
    suffix = _rank_suffix(trainer)
    header = _state_file_header(checkpoint, suffix)
    if header is not None and any(key.startswith("weight_ema.") for key in header[1]):
        path = os.path.join(checkpoint, STATE_FILE.format(suffix=suffix))
        raise ValueError(
            f"{path} holds a moving average of the weights (written with weight_ema_decay > 0), but this run has"
            " weight_ema_decay=0: the average would be dropped, and the model left after training would be the"
            " trained weights instead of it. Resume with --weight_ema_decay set as in the original run, or start a"
            f" new run from the weights of {checkpoint}."
        )


def _check_values(tensors: dict[str, torch.Tensor], path: str, corrupt: str) -> None:
    for key, value in tensors.items():
        if not value.is_floating_point() or value.numel() == 0:
            continue
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{path}: state {key!r} holds NaN or inf values. {corrupt}")
        if float(value.abs().max()) > MAX_STATE_MAGNITUDE:
            raise ValueError(
                f"{path}: state {key!r} holds values up to {float(value.abs().max()):.3g}, whose norm overflows"
                f" float32. {corrupt}"
            )


def _check_settings(saved: dict[str, str], current: dict[str, str], path: str) -> None:
    """Refuse state written for another perturbed set, Sparse SAM masks written for another `sam_sparsity`, or state
    written under FSDP with another number of processes (an older file without settings, or without the FSDP or
    sparsity entry, is taken as it is).

    This run's set may be the one the state belongs to (`perturbed`: the script restarted as it was), or the one the
    trainable parameters gave when the file was written (`trainable`: parameters a callback unfroze or froze since the
    first step, then kept so for the resume).
    """
    if not saved or not current:
        return
    processes = saved.get("fsdp_processes")
    if processes is not None and processes != current.get("fsdp_processes"):
        now = current.get("fsdp_processes")
        raise ValueError(
            f"{path} was written under FSDP with {processes} processes, each holding the method state of its own"
            f" shards of the weights; this run has {f'FSDP with {now} processes' if now else 'no FSDP'}. Resume with"
            f" {processes} processes under FSDP, or start a new run from the weights of the checkpoint."
        )
    sparsity, now_sparsity = saved.get("sam_sparsity"), current.get("sam_sparsity")
    if sparsity is not None and now_sparsity is not None and sparsity != now_sparsity:
        raise ValueError(
            f"{path} holds Sparse SAM masks written for sam_sparsity={sparsity}; this run has"
            f" sam_sparsity={now_sparsity}. The masks would keep perturbing the old share of the entries until their"
            f" next refresh: resume with --sam_sparsity {sparsity}, or start a new run from the weights."
        )
    if current.get("perturbed") in (saved.get("perturbed"), saved.get("trainable")):
        return
    then = ", ".join(f"{key}={value}" for key, value in sorted(saved.items()))
    now = ", ".join(f"{key}={value}" for key, value in sorted(current.items()))
    raise ValueError(
        f"{path} was written for {then}; this run has {now}. The method state (masks, averages, reused gradients)"
        " belongs to the perturbed tensors it was written for: resume with the model and sam_include / sam_exclude"
        " of the original run, or start a new run from the weights."
    )


def check_state_keys(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], owner: str) -> None:
    """Raise a `ValueError` when a loaded state does not fit the parameters it belongs to."""
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ValueError(
            f"{owner}: the checkpoint holds state for {unknown[:3]} which this model does not perturb. Resume with"
            " the model and sam_include / sam_exclude of the original run."
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{owner}: state {key!r} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}."
            )


def perturbed_set_settings(names: list[str], include: str | None, exclude: str | None) -> dict[str, str]:
    """What per-parameter method state belongs to, recorded in the state file and checked on resume."""
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    return {
        "perturbed": f"{len(names)} tensors ({digest})",
        "sam_include": repr(include),
        "sam_exclude": repr(exclude),
    }


def last_complete_checkpoint(folder: str) -> str | None:
    """The newest `checkpoint-N` in `folder` that was written to the end, or None.

    `Trainer` writes `trainer_state.json` last, so a folder without a readable one was cut off while saving (a
    killed job); it is skipped with a warning, where `transformers.trainer_utils.get_last_checkpoint` returns it.
    """
    if not os.path.isdir(folder):
        return None
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = sorted(
        ((int(m.group(1)), entry) for entry in os.listdir(folder) if (m := pattern.match(entry))), reverse=True
    )
    for _, entry in found:
        path = os.path.join(folder, entry)
        if not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, TRAINER_STATE_NAME)) as handle:
                json.load(handle)
        except (OSError, ValueError):
            logger.warning(f"Skipping {path}: it has no readable {TRAINER_STATE_NAME} (cut off while saving).")
            continue
        return path
    return None


def _rank_suffix(trainer) -> str:
    # Every rank writes its own file: with local ascent some state (F-SAM's EMA) differs per rank.
    return "" if trainer.accelerator.num_processes == 1 else f"-rank{trainer.accelerator.process_index}"


def _run_settings(trainer) -> dict[str, str] | None:
    """What the method state belongs to, recorded in the state file and checked on resume: the perturbed set, Sparse
    SAM's sparsity, and under FSDP the number of processes."""
    args = trainer.args
    settings = {}
    if args.sam_enabled:
        held = optimizer_held(trainer)
        trainable = [name for name, _ in select_perturbed(trainer.model, args.sam_include, args.sam_exclude, held)]
        perturbation = trainer._sam.perturbation
        # The set chosen at the run's first step, which the state covers: a callback may have unfrozen or frozen
        # parameters since, and the trainable set of now would refuse the same script restarted from this checkpoint.
        names = perturbation.names if perturbation is not None else trainable
        settings.update(perturbed_set_settings(names, args.sam_include, args.sam_exclude))
        if trainable != names:
            settings["trainable"] = perturbed_set_settings(trainable, args.sam_include, args.sam_exclude)["perturbed"]
        if args.sam_mask in ("fisher", "dynamic"):
            # The masks keep (1 - sam_sparsity) of the entries: taken back under another sparsity, they would keep the
            # old share until the next refresh (an epoch away for SSAM-F).
            settings["sam_sparsity"] = str(float(args.sam_sparsity))  # 0 and 0.0 are one setting
    if getattr(trainer, "is_fsdp_enabled", False):
        # Each rank's file holds the state of its own shards (MESA's teacher too): only the same number of processes
        # can take it back (with another, the shards have other shapes, or some ranks find no file).
        settings["fsdp_processes"] = str(trainer.accelerator.num_processes)
    return settings or None


def save_run_state(trainer, output_dir: str) -> None:
    """Write `trainer.sam_state_dict()` into the checkpoint folder, one file per rank."""
    args = trainer.args
    save_sam_state(
        output_dir, args.sam_method, trainer.sam_state_dict(), _rank_suffix(trainer), _run_settings(trainer)
    )


def check_saved_optimizer(trainer, checkpoint: str) -> None:
    """Before the optimizer state is read: refuse the state of an optimizer that a method brings (AdaSAM's) for a run
    whose optimizer is another one. torch would fail on it with a bare `KeyError` (AdamW reading AMSGrad's state),
    before the state file's own method check could say what is wrong.

    Trainer reads `optimizer.pt` in `_load_optimizer_and_scheduler`, with the optimizer built. Under DeepSpeed the
    engine reads its checkpoint's optimizer state as soon as it has built the optimizer, so this runs before, on
    `trainer.optimizer` when one was passed and otherwise on the class the run will build (the method's own, or
    Trainer's from `optim`).
    """
    method = saved_method(checkpoint, _rank_suffix(trainer))
    if method is None or method == trainer.args.sam_method or method not in METHODS:
        return
    brought = METHODS[method].optimizer
    if brought is None:
        return
    if trainer.optimizer is not None:
        optimizer = base_optimizer(trainer.optimizer)  # inside accelerate's (and DeepSpeed's) wrappers
        if isinstance(optimizer, brought):
            return
        used = type(optimizer).__name__
    else:
        own = METHODS[trainer.args.sam_method].optimizer if trainer.args.sam_enabled else None
        if own is not None and issubclass(own, brought):
            return
        optim = getattr(trainer.args.optim, "value", trainer.args.optim)
        used = own.__name__ if own is not None else f"optim={optim!r}"
    raise ValueError(
        f"{checkpoint} was written by sam_method={method!r}, whose optimizer state is {brought.__name__}'s, but this"
        f" run uses sam_method={trainer.args.sam_method!r} with {used}. Resume with --sam_method {method}, or start a"
        " new run from the weights."
    )


def load_run_state(trainer, checkpoint: str) -> dict[str, torch.Tensor]:
    """Read back what `save_run_state` wrote for this rank, checked against the run's settings."""
    return load_sam_state(checkpoint, trainer.args.sam_method, _rank_suffix(trainer), _run_settings(trainer))
