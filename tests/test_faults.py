"""Faults, for every method in `tests/method_cases.py`: a new method is covered by adding its row there.

- NaN or inf in the clean pass only: the ascent is skipped (eps = 0, counted in `sam/skipped`), and neither the
  weights nor any stored state (F-SAM's average, LookSAM's reused component, GSAM's and Stable SAM's descent
  transforms) turns non-finite.
- NaN or inf in the perturbed (descent) pass only: the update of that step is dropped (w and the optimizer state
  stay bit for bit, counted in `sam/skipped_updates`), and training goes on.
- An exception between the two passes: w comes back bit for bit, no gradient is left.
- kill -9 after a checkpoint, then resume: the same weights as the uninterrupted run.
- A truncated, empty, garbage or byte-flipped state file: a `ValueError` naming the file, before any step.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.testing_utils import CaptureLogger

from hf_sam import SAMTrainer, stall
from hf_sam.checkpoint import STATE_FILE
from tests.helpers import SequentialSAMTrainer, assert_same_weights, sam_args, state, tiny_bert, tiny_dataset
from tests.method_cases import METHOD_CASES


ROOT = Path(__file__).resolve().parent.parent
# Methods with a clean and a perturbed pass (SAF and MESA run Trainer's one pass: the kill and file tests cover them).
SAM_STEP_METHODS = [n for n, c in METHOD_CASES.items() if c["reference"] is not None and c.get("kind") != "loss_term"]
# Momentum-SAM takes eps from the optimizer's moment: it has no clean pass to fault.
CLEAN_PASS_METHODS = [n for n in SAM_STEP_METHODS if METHOD_CASES[n]["reference"].get("direction") != "momentum"]
STATEFUL_METHODS = [n for n in METHOD_CASES if n != "none"]  # every method that writes a state file
# Enough steps for two SAM steps of every method (LookSAM's k is 3 in its row; SS-SAM's ramp draws steps 3, 5, 6).
STEPS = 7


class FaultInjector(SequentialSAMTrainer):
    """Multiplies the loss by `value` in the `phase` pass ("clean" or "perturbed") of the `at`-th SAM step (from 1),
    or raises `value` there when it is an exception. Only the first pass of that phase in that step is hit, and only
    a pass with gradient: ESAM's no-grad scoring forward also goes through `compute_loss`, but only its outputs count
    (a non-finite loss at w + eps shows in the descent pass that follows)."""

    def __init__(self, *args, phase: str, at: int = 2, value=math.nan, **kwargs):
        super().__init__(*args, **kwargs)
        self.phase, self.at, self.value = phase, at, value
        self.sam_steps, self.hit_step, self._in, self._last_step = 0, None, None, None

    def _count(self):
        if self._last_step != self.state.global_step:
            self._last_step = self.state.global_step
            self.sam_steps += 1

    def _sam_clean_pass(self, *args, **kwargs):
        self._count()
        self._in = "clean"
        try:
            return super()._sam_clean_pass(*args, **kwargs)
        finally:
            self._in = None

    def _sam_momentum_step(self, *args, **kwargs):  # Momentum-SAM's one pass runs at the perturbed weights
        self._count()
        self._in = "perturbed"
        try:
            return super()._sam_momentum_step(*args, **kwargs)
        finally:
            self._in = None

    def _sam_perturbed_pass(self, *args, **kwargs):
        self._in = "perturbed"
        try:
            return super()._sam_perturbed_pass(*args, **kwargs)
        finally:
            self._in = None

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if self._in == self.phase and self.sam_steps == self.at and self.hit_step is None and torch.is_grad_enabled():
            self.hit_step = self.state.global_step
            if isinstance(self.value, BaseException):
                assert self._sam.perturbation.active == (self.phase == "perturbed")
                raise self.value
            return loss * self.value
        return loss


class Snapshots(TrainerCallback):
    """The weights at the beginning and end of every optimizer step."""

    def __init__(self):
        self.begin, self.end = {}, {}

    def on_step_begin(self, args, state_, control, model=None, **kwargs):
        self.begin[state_.global_step] = state(model)

    def on_step_end(self, args, state_, control, model=None, **kwargs):
        self.end[state_.global_step - 1] = state(model)


def injector(tmp_path, method, phase, value=math.nan, **overrides):
    snapshots = Snapshots()
    trainer = FaultInjector(
        model=tiny_bert(dropout=0.1),
        args=sam_args(tmp_path, max_steps=STEPS, learning_rate=0.01, **{**METHOD_CASES[method]["args"], **overrides}),
        train_dataset=tiny_dataset(),
        callbacks=[snapshots],
        phase=phase,
        value=value,
    )
    return trainer, snapshots


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


def logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("method", CLEAN_PASS_METHODS)
def test_a_non_finite_clean_pass_skips_the_ascent_and_poisons_nothing(tmp_path, method, value):
    trainer, _ = injector(tmp_path, method, "clean", value)
    trainer.train()
    assert trainer.hit_step is not None and trainer.state.global_step == STEPS
    assert all_finite(trainer.model.parameters()), "the weights turned non-finite"
    assert all_finite(trainer.sam_state_dict().values()), "the method state stored a non-finite value"
    # Logged every step as the share of ascents skipped: one SAM step (one of mSAM's shards) skipped its ascent.
    skipped = [v for v in logged(trainer, "sam/skipped") if v > 0]
    assert len(skipped) == 1 and skipped[0] <= 1.0


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("method", SAM_STEP_METHODS)
def test_a_non_finite_perturbed_pass_drops_that_update_and_training_goes_on(tmp_path, method, value):
    trainer, snapshots = injector(tmp_path, method, "perturbed", value)
    trainer.train()
    step = trainer.hit_step
    assert step is not None and trainer.state.global_step == STEPS
    # No update at that step: w is bit for bit what it was (the optimizer saw no gradient) ...
    assert_same_weights(snapshots.begin[step], snapshots.end[step])
    # ... and the steps after it train again, from finite weights and state.
    assert any(not torch.equal(a, b) for a, b in zip(snapshots.end[step].values(), state(trainer.model).values()))
    assert all_finite(trainer.model.parameters()) and all_finite(trainer.sam_state_dict().values())
    assert sum(logged(trainer, "sam/skipped_updates")) == 1.0


@pytest.mark.parametrize("method", SAM_STEP_METHODS)
def test_an_exception_between_the_passes_restores_w_bit_for_bit(tmp_path, method):
    trainer, snapshots = injector(tmp_path, method, "perturbed", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not trainer._sam.perturbation.active
    assert_same_weights(snapshots.begin[trainer.hit_step], state(trainer.model))
    assert all(p.grad is None for p in trainer.model.parameters())


def test_a_run_of_non_finite_perturbed_losses_stops_with_an_error_naming_the_radius(tmp_path):
    model = tiny_bert()
    before = state(model)
    trainer = SAMTrainer(model=model, args=sam_args(tmp_path, sam_rho=1e30, max_steps=8), train_dataset=tiny_dataset())
    with pytest.raises(RuntimeError, match="sam_rho=1e[+]?30"):
        trainer.train()
    # Every step was dropped: the weights are those the run started from, and finite.
    assert trainer.state.global_step == 4 and trainer._sam.guard.skipped_in_a_row == 5
    assert_same_weights(before, state(trainer.model))


# ---------------------------------------------------------------- kill -9 and resume

KILLED_RUN = """
import os, signal, sys
import torch
torch.set_num_threads({threads})  # the parent's count: another count rounds CPU matmuls differently
sys.path.insert(0, {root!r})
from transformers import TrainerCallback
from transformers.testing_utils import CaptureLogger
from hf_sam import SAMTrainer, stall
from tests.helpers import sam_args, tiny_bert, tiny_dataset

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:  # checkpoint-2 is on disk, step 3 is done: no chance to clean up
            os.kill(os.getpid(), signal.SIGKILL)

args = sam_args({out!r}, save_strategy="steps", save_steps=2, **{common!r})
SAMTrainer(model=tiny_bert(dropout=0.1), args=args, train_dataset=tiny_dataset(24), callbacks=[Kill()]).train()
"""


@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, method):
    # 2 epochs of 3 windows (GA 2 x batch 4 of 24 examples): SAF's term is on in the second one.
    common = dict(max_steps=6, gradient_accumulation_steps=2, **METHOD_CASES[method]["args"])
    script = tmp_path / "killed.py"
    source = KILLED_RUN.format(root=str(ROOT), out=str(tmp_path / "b"), common=common, threads=torch.get_num_threads())
    script.write_text(textwrap.dedent(source))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]
    assert (tmp_path / "b" / "checkpoint-2").is_dir() and not (tmp_path / "b" / "checkpoint-4").exists()
    straight = SAMTrainer(model=tiny_bert(dropout=0.1), args=sam_args(tmp_path / "a", **common),
                          train_dataset=tiny_dataset(24))  # fmt: skip
    straight.train()
    resumed = SAMTrainer(model=tiny_bert(dropout=0.1), args=sam_args(tmp_path / "b", **common),
                         train_dataset=tiny_dataset(24))  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert_same_weights(state(straight.model), state(resumed.model))


# ---------------------------------------------------------------- damaged state files


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # tensor data sits at the end of a safetensors file
    path.write_bytes(bytes(data))


CORRUPTIONS = {"truncated": _truncate, "empty": _empty, "garbage": _garbage, "flipped_byte": _flip_last_byte}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One checkpoint per stateful method, written once for all the corruptions."""
    root = tmp_path_factory.mktemp("states")
    for method in STATEFUL_METHODS:
        case = METHOD_CASES[method]["args"]
        args = sam_args(root / method, max_steps=2, save_strategy="steps", save_steps=2, **case)
        SAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(16)).train()
    return root


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("method", STATEFUL_METHODS)
def test_a_damaged_state_file_is_refused_naming_it(tmp_path, checkpoints, method, corruption):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoints / method / "checkpoint-2", checkpoint)
    path = checkpoint / STATE_FILE.format(suffix="")
    CORRUPTIONS[corruption](path)
    args = sam_args(tmp_path, max_steps=4, **METHOD_CASES[method]["args"])
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(16))
    with pytest.raises(ValueError, match=str(path)) as raised:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert "earlier checkpoint" in str(raised.value)  # says what to do
    assert trainer.state.global_step == 2  # refused when the checkpoint is loaded, before any step


def test_a_flipped_byte_in_the_recorded_settings_is_refused_naming_the_file(tmp_path):
    # The header stays valid JSON, but the settings it records do not: a bare json error ("Expecting ',' delimiter:
    # line 1 column 88") named neither the file nor what to do.
    from hf_sam.checkpoint import load_sam_state, perturbed_set_settings, save_sam_state

    settings = perturbed_set_settings(["classifier.weight"], None, None)
    save_sam_state(str(tmp_path), "fsam", {"ascent.fsam_ema.classifier.weight": torch.ones(3, 4)}, "", settings)
    path = tmp_path / STATE_FILE.format(suffix="")
    data = path.read_bytes()
    at = data.index(b'"settings":"{') + len(b'"settings":"')  # the settings' JSON, a string in the header's JSON
    path.write_bytes(data[:at] + b"z" + data[at + 1 :])  # "{" ^ 0x01: the header still parses, the settings not
    with pytest.raises(ValueError, match=str(path)) as raised:
        load_sam_state(str(tmp_path), "fsam", "", settings)
    assert "earlier checkpoint" in str(raised.value)


# ---------------------------------------------------------------- state that does not fit, or cannot be true


@pytest.mark.parametrize("method", ["looksam", "ssam-d", "fsam"])
def test_resuming_state_written_for_another_perturbed_set_is_refused_naming_both(tmp_path, method):
    common = {**METHOD_CASES[method]["args"], "max_steps": 4}
    first = SAMTrainer(model=tiny_bert(), train_dataset=tiny_dataset(),
                       args=sam_args(tmp_path, save_strategy="steps", save_steps=2, sam_include="classifier",
                                     **common))  # fmt: skip
    first.train()
    resumed = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, **common), train_dataset=tiny_dataset())
    with pytest.raises(ValueError, match="sam_include='classifier'.*this run has.*sam_include=None"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


@pytest.mark.parametrize(
    "written_by, said",
    [
        ({"sam_method": "none"}, "by the plain Trainer or by SAMTrainer with sam_method='none'"),
        ({"sam_method": "sam", "save_only_model": True}, "with save_only_model=True"),
        ({"sam_method": "sam", "suffix": "-rank0"}, r"another number of processes \(it holds sam_state.safetensors"),
    ],
)
def test_a_checkpoint_without_this_runs_state_file_is_refused_saying_why(tmp_path, written_by, said):
    # It said "not written by SAMTrainer, with another number of processes, or with save_only_model=True" whatever
    # the checkpoint was: for one that SAMTrainer wrote with sam_method='none' (warm-up before SAM), none of the three.
    written_by = dict(written_by)
    suffix = written_by.pop("suffix", "")
    args = sam_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, **written_by)
    SAMTrainer(model=tiny_bert(), train_dataset=tiny_dataset(), args=args).train()
    from hf_sam.checkpoint import load_sam_state

    with pytest.raises(ValueError, match=f"Cannot resume sam_method='sam' from .*checkpoint-2: .*{said}"):
        load_sam_state(str(tmp_path / "checkpoint-2"), "sam", suffix)


@pytest.mark.parametrize("method", ["ssam-f", "ssam-d"])
def test_masks_resumed_under_another_sparsity_are_refused_naming_both(tmp_path, method):
    # The masks keep (1 - s) of the entries: taken back under another sam_sparsity they kept the old share until the
    # next refresh (an epoch away for SSAM-F), silently: sam/mask_density read 0.4999 where 0.9 asks for 0.0999.
    common = {**METHOD_CASES[method]["args"], "max_steps": 4}
    args = sam_args(tmp_path, save_strategy="steps", save_steps=2, sam_sparsity=0.5, **common)
    SAMTrainer(model=tiny_bert(), train_dataset=tiny_dataset(), args=args).train()
    resumed = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, sam_sparsity=0.9, **common),
                         train_dataset=tiny_dataset())  # fmt: skip
    with pytest.raises(ValueError, match="sam_sparsity=0.5.*this run has sam_sparsity=0.9.*--sam_sparsity 0.5"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 2  # refused when the checkpoint is loaded, before any step


def test_fsdp_state_resumed_with_another_number_of_processes_is_refused_naming_both(tmp_path):
    # Each rank's file holds the state of its own shards: resumed with another process count, ranks 0-1 said only
    # that a state had another shape, and the others that they found no file.
    from hf_sam.checkpoint import load_sam_state, save_sam_state

    written = {"perturbed": "3 tensors (abc)", "sam_include": "None", "sam_exclude": "None", "fsdp_processes": "4"}
    save_sam_state(str(tmp_path), "fsam", {"ascent.fsam_ema.w": torch.zeros(2)}, "-rank0", written)
    for now, said in (("2", "FSDP with 2 processes"), (None, "no FSDP")):
        current = {k: v for k, v in written.items() if k != "fsdp_processes"}
        if now:
            current["fsdp_processes"] = now
        with pytest.raises(ValueError, match=f"under FSDP with 4 processes.*this run has {said}. Resume with 4"):
            load_sam_state(str(tmp_path), "fsam", "-rank0", current)
    assert set(load_sam_state(str(tmp_path), "fsam", "-rank0", written)) == {"ascent.fsam_ema.w"}
    # A file written before the entry existed resumes as before.
    save_sam_state(str(tmp_path), "fsam", {"ascent.fsam_ema.w": torch.zeros(2)}, "-rank0", current)
    assert set(load_sam_state(str(tmp_path), "fsam", "-rank0", written)) == {"ascent.fsam_ema.w"}


def _rewrite_state(checkpoint: Path, method: str, change) -> None:
    """Rewrite a state file with `change` applied to its float tensors, with a valid digest (a buggy writer)."""
    from hf_sam.checkpoint import load_sam_state, save_sam_state

    state_ = load_sam_state(str(checkpoint), method)
    state_ = {k: change(v) if v.is_floating_point() else v for k, v in state_.items()}
    save_sam_state(str(checkpoint), method, state_)


@pytest.mark.parametrize("method", ["ssam-f", "ssam-d"])
def test_a_state_file_without_the_mask_of_a_perturbed_tensor_is_refused(tmp_path, method):
    # Sparse SAM's masks always cover every perturbed tensor; a file that lacks one (a buggy writer, an edited file)
    # would perturb that tensor whole, silently, until the next refresh.
    common = {**METHOD_CASES[method]["args"], "max_steps": 4}
    SAMTrainer(model=tiny_bert(), train_dataset=tiny_dataset(),
               args=sam_args(tmp_path, save_strategy="steps", save_steps=2, **common)).train()  # fmt: skip
    checkpoint = tmp_path / "checkpoint-2"
    from hf_sam.checkpoint import load_sam_state, save_sam_state

    state_ = load_sam_state(str(checkpoint), method)
    del state_["mask.ssam_mask.classifier.weight"]
    save_sam_state(str(checkpoint), method, state_)
    resumed = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, **common), train_dataset=tiny_dataset())
    with pytest.raises(ValueError, match="classifier.weight"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2  # refused when the checkpoint is loaded, before any step


@pytest.mark.parametrize("value, match", [(math.nan, "NaN or inf"), (1.7e38, "overflows float32")])
@pytest.mark.parametrize("method", ["fsam", "looksam", "mesa"])
def test_non_finite_or_overflowing_state_is_refused_on_load(tmp_path, method, value, match):
    common = {**METHOD_CASES[method]["args"], "max_steps": 4}
    SAMTrainer(model=tiny_bert(), train_dataset=tiny_dataset(),
               args=sam_args(tmp_path, save_strategy="steps", save_steps=2, **common)).train()  # fmt: skip
    checkpoint = tmp_path / "checkpoint-2"
    _rewrite_state(checkpoint, METHOD_CASES[method]["args"]["sam_method"], lambda t: torch.full_like(t, value))
    resumed = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, **common), train_dataset=tiny_dataset())
    with pytest.raises(ValueError, match=match):
        resumed.train(resume_from_checkpoint=str(checkpoint))


class HugeAverage(TrainerCallback):
    """Sets F-SAM's gradient average to 1.7e38 before step 2 (as a flipped exponent bit in memory would)."""

    def __init__(self):
        self.trainer = None

    def on_step_begin(self, args, state_, control, **kwargs):
        if state_.global_step == 2:
            for value in self.trainer._sam.perturbation.rule.ema.values():
                value.fill_(1.7e38)


def test_an_ascent_whose_own_normalizer_overflows_is_skipped_and_counted(tmp_path):
    callback = HugeAverage()
    trainer = SequentialSAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, sam_method="fsam", max_steps=3),
                                   train_dataset=tiny_dataset(), callbacks=[callback])  # fmt: skip
    callback.trainer = trainer
    trainer.train()
    assert logged(trainer, "sam/skipped") == [0.0, 0.0, 1.0]
    assert all_finite(trainer.model.parameters())


@pytest.mark.parametrize("offset", [10**6, 10**12])
def test_saf_takes_example_ids_of_any_size_with_one_bank_row_per_example(tmp_path, offset):
    from datasets import Dataset

    rows = tiny_dataset(8).to_dict()
    data = Dataset.from_dict({**rows, "idx": [offset + 3 * i for i in (5, 1, 7, 0, 2, 6, 4, 3)]})
    trainer = SAMTrainer(model=tiny_bert(), train_dataset=data,
                         args=sam_args(tmp_path, sam_method="saf", max_steps=-1, num_train_epochs=2))  # fmt: skip
    trainer.train()
    bank = trainer._sam.loss_term.bank
    assert bank.bank.shape[0] == 8 and bool((bank.written[:, 1] == 1).all())  # every example recorded in epoch 1
    assert logged(trainer, "saf/coverage") == [1.0, 1.0]  # epoch 1's lookups find every example of epoch 0


def test_the_examples_resume_from_the_newest_complete_checkpoint(tmp_path):
    from transformers.testing_utils import CaptureLogger

    from hf_sam import checkpoint as checkpoint_module
    from hf_sam.checkpoint import last_complete_checkpoint

    for step, state_text in ((2, "{}"), (4, None), (6, '{"global_st')):  # 4: no trainer_state.json, 6: cut off
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state_text is not None:
            (folder / "trainer_state.json").write_text(state_text)
    with CaptureLogger(checkpoint_module.logger) as captured:
        assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-6" in captured.out and "checkpoint-4" in captured.out
    assert last_complete_checkpoint(str(tmp_path / "missing")) is None
    # Both example scripts resume through their shared helper, which uses it.
    assert "last_complete_checkpoint(" in (ROOT / "examples" / "example_utils.py").read_text()
    for script in ("text-classification/run_glue.py", "image-classification/run_image_classification.py"):
        source = (ROOT / "examples" / script).read_text()
        assert "detect_last_checkpoint(" in source and "get_last_checkpoint" not in source


# lr 0.01 trains (logged loss 1.10 -> 0.18); lr 0.05 is no run that trains: its loss wanders (1.15, 1.28, 1.12, ...)
# and ends at the class prior (1.09, ln 3 = 1.10), which is reported.
@pytest.mark.parametrize("learning_rate, warns", [(0.0, True), (0.05, True), (0.01, False)])
def test_a_sam_run_whose_loss_does_not_fall_says_so(tmp_path, learning_rate, warns):
    """A radius that stalls training (no NaN, nothing skipped) is reported once; a run that trains is not."""
    from transformers.testing_utils import CaptureLogger

    from hf_sam import stall

    # Logged once per epoch (8 steps), so with lr 0 every logged loss is the same epoch mean.
    args = sam_args(tmp_path, max_steps=80, logging_steps=8, learning_rate=learning_rate, sam_rho=0.05)
    trainer = SequentialSAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    with CaptureLogger(stall.logger) as captured:
        trainer.train()
    assert captured.out.count("sam_rho=0.05 is likely too large") == (1 if warns else 0)


def test_a_sam_run_that_trains_and_falls_back_to_its_start_says_so():
    """A fine-tune that learns for a while and then collapses to the class prior is reported once, when it is back."""
    from transformers.testing_utils import CaptureLogger

    from hf_sam import stall

    watch = stall.StallWatch()
    with CaptureLogger(stall.logger) as captured:
        # Logged per epoch of a 10-epoch run: at the prior, learning, then back at the prior for good.
        for epoch, loss in enumerate([0.6937, 0.6924, 0.6883, 0.6454, 0.60, 0.6931, 0.6931], start=1):
            watch.observe(loss, 0.01, step=16 * epoch, max_steps=160, rho=0.1)
    assert captured.out.count("sam_rho=0.1 is likely too large") == 1
    assert "is back at its value at the start (0.6937)" in captured.out and "after 60% of training" in captured.out
    watch = stall.StallWatch()  # a run that keeps learning is not reported
    with CaptureLogger(stall.logger) as captured:
        for epoch, loss in enumerate([0.6937, 0.6924, 0.6883, 0.6454, 0.50, 0.30, 0.20], start=1):
            watch.observe(loss, 0.01, step=16 * epoch, max_steps=160, rho=0.1)
    assert captured.out == ""


# A callback that stops training or the epoch at the start of an optimizer step, with GA > 1 (window mode):
# Trainer leaves its loop after the window's first micro-batch; the weights must be w, not w + eps.
class StopAtStepBegin(TrainerCallback):
    def __init__(self, flag):
        self.flag, self.at_stop, self.at_eval, self.next_begin = flag, None, None, None

    def on_step_begin(self, args, st, control, model=None, **kwargs):
        if st.global_step == 2 and self.at_stop is None:
            self.at_stop = state(model)
            setattr(control, self.flag, True)
        elif self.at_stop is not None and self.next_begin is None:
            self.next_begin = state(model)

    def on_evaluate(self, args, st, control, model=None, **kwargs):
        if self.at_stop is not None and self.at_eval is None:
            self.at_eval = state(model)


@pytest.mark.parametrize("method", ["sam", "momentum-sam"])
def test_a_stop_inside_a_window_leaves_the_unperturbed_weights(tmp_path, method):
    stop = StopAtStepBegin("should_training_stop")
    trainer = SequentialSAMTrainer(
        model=tiny_bert(dropout=0.1),
        args=sam_args(
            tmp_path, sam_method=method, gradient_accumulation_steps=2, per_device_train_batch_size=2, max_steps=10
        ),
        train_dataset=tiny_dataset(),
        callbacks=[stop],
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert not trainer._sam.perturbation.active
    assert_same_weights(stop.at_stop, state(trainer.model))


class BatchNormAtEpochEnd(StopAtStepBegin):
    def on_epoch_end(self, args, st, control, model=None, **kwargs):
        if self.at_stop is not None and self.at_eval is None:
            self.at_eval = {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("flag", ["should_training_stop", "should_epoch_stop"])
def test_a_stop_inside_a_window_leaves_the_batch_norm_statistics_of_the_micro_batches_that_ran(tmp_path, flag):
    # Window mode runs every micro-batch's clean pass at the window's first one: a stop after that micro-batch must
    # not leave the running statistics (saved and evaluated with w) of the micro-batches Trainer never trained on.
    from tests.test_trainer import image_dataset, tiny_resnet

    runs = {}
    for method in ("none", "sam"):
        stop = BatchNormAtEpochEnd(flag)
        trainer = SequentialSAMTrainer(
            model=tiny_resnet(),
            args=sam_args(
                tmp_path / method,
                sam_method=method,
                **({"sam_rho": 0.0} if method == "sam" else {}),
                gradient_accumulation_steps=4,
                per_device_train_batch_size=2,
                max_steps=-1,
                num_train_epochs=2,
            ),
            train_dataset=image_dataset(16),  # 2 steps an epoch: the stop cuts the second epoch's first window
            callbacks=[stop],
        )
        trainer.train()
        runs[method] = stop.at_eval  # where the epoch's evaluation and checkpoint would read them
    plain, sam = runs["none"], runs["sam"]
    for name in plain:
        assert torch.equal(plain[name], sam[name]), f"{name}: {plain[name].flatten()[:3]} vs {sam[name].flatten()[:3]}"


def test_an_epoch_stop_inside_a_window_evaluates_and_continues_from_w(tmp_path):
    stop = StopAtStepBegin("should_epoch_stop")
    trainer = SequentialSAMTrainer(
        model=tiny_bert(dropout=0.1),
        args=sam_args(
            tmp_path,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
            max_steps=-1,
            num_train_epochs=2,
            eval_strategy="epoch",
        ),
        train_dataset=tiny_dataset(),
        eval_dataset=tiny_dataset(8, seed=1),
        callbacks=[stop],
    )
    trainer.train()
    assert_same_weights(stop.at_stop, stop.at_eval)  # the epoch-end evaluation scores w
    assert_same_weights(stop.at_stop, stop.next_begin)  # the next epoch starts from w


# Between two micro-batches of a window (window mode, Momentum-SAM) the model holds w + eps; a callback that evaluates
# or saves at on_substep_end must score and save w, and the window must go on from w + eps.
class EvaluateAtSubstepEnd(TrainerCallback):
    def __init__(self, save_dir):
        self.trainer, self.save_dir, self.rows = None, save_dir, []

    def on_step_begin(self, args, st, control, model=None, **kwargs):
        self.at_begin = state(model)

    def on_substep_end(self, args, st, control, model=None, **kwargs):
        held = state(model)
        evaluated = self.trainer.evaluate()["eval_loss"]
        predicted = self.trainer.predict(self.trainer.eval_dataset).metrics["test_loss"]
        self.trainer.save_model(self.save_dir)
        saved = {k: v for k, v in load_file(os.path.join(self.save_dir, "model.safetensors")).items()}
        assert_same_weights(held, state(model))  # the window goes on from the weights it held
        self.rows.append((self.at_begin, evaluated, predicted, saved))


@pytest.mark.parametrize("method", ["sam", "momentum-sam"])
def test_evaluating_or_saving_inside_a_window_sees_the_unperturbed_weights(tmp_path, method):
    args = sam_args(
        tmp_path, sam_method=method, gradient_accumulation_steps=2, per_device_train_batch_size=2, max_steps=3
    )
    trained = SequentialSAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    trained.train()
    callback = EvaluateAtSubstepEnd(str(tmp_path / "saved"))
    trainer = SequentialSAMTrainer(
        model=tiny_bert(),
        args=args,
        train_dataset=tiny_dataset(),
        eval_dataset=tiny_dataset(8, seed=1),
        callbacks=[callback],
    )
    callback.trainer = trainer
    trainer.train()
    assert_same_weights(state(trained.model), state(trainer.model))  # the evaluations changed nothing in training
    reference = SequentialSAMTrainer(model=tiny_bert(), args=args, eval_dataset=tiny_dataset(8, seed=1))
    assert len(callback.rows) == 3
    for at_begin, evaluated, predicted, saved in callback.rows:
        reference.model.load_state_dict(at_begin)
        expected = reference.evaluate()["eval_loss"]
        assert evaluated == expected  # sam, step 0: was 1.0939 (w + eps) against 1.0984 at w
        assert predicted == expected
        for name, value in at_begin.items():
            assert torch.equal(saved[name], value), name


# The stalled-run warning compares means over a tenth of training: logged every step or two, single batches' losses
# scatter more than training moves them, and a run that trains must not be reported.
def stall_warnings_of(tmp_path, learning_rate, logging_steps):
    args = sam_args(tmp_path, max_steps=80, logging_steps=logging_steps, learning_rate=learning_rate, sam_rho=0.05)
    trainer = SequentialSAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    with CaptureLogger(stall.logger) as captured:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return captured.out.count("sam_rho=0.05 is likely too large"), losses


def test_a_stalled_run_resumed_from_a_checkpoint_is_still_reported(tmp_path):
    # Stopped at 20% of training and resumed, the run's first log came at 30% (past the first tenth, the start the
    # check compares with): the uninterrupted run warned once, the resumed one never. The checkpoint's logged losses
    # are its start.
    common = dict(logging_steps=8, learning_rate=0.0, sam_rho=0.05)
    args = sam_args(tmp_path / "a", max_steps=16, save_strategy="steps", save_steps=16, **common)
    SequentialSAMTrainer(model=tiny_bert(), train_dataset=tiny_dataset(), args=args).train()
    warnings = []
    for resume in (None, str(tmp_path / "a" / "checkpoint-16")):
        trainer = SequentialSAMTrainer(model=tiny_bert(), args=sam_args(tmp_path / "b", max_steps=80, **common),
                                       train_dataset=tiny_dataset())  # fmt: skip
        with CaptureLogger(stall.logger) as captured:
            trainer.train(resume_from_checkpoint=resume)
        warnings.append(captured.out)
    straight, resumed = warnings
    assert straight.count("sam_rho=0.05 is likely too large") == 1
    assert resumed == straight  # the same step, the same losses compared


@pytest.mark.parametrize("logging_steps", [1, 2])
def test_a_run_that_trains_logged_every_step_is_not_reported(tmp_path, logging_steps):
    # lr 0.01 trains (logged per 8 steps: 1.10 -> 0.18, not reported); logged per step or two, single batches'
    # losses scatter around the falling mean, a few of them back above the first logged one.
    count, losses = stall_warnings_of(tmp_path, 0.01, logging_steps)
    assert losses[-1] < 0.5 * losses[0]  # it trains
    assert count == 0


@pytest.mark.parametrize("logging_steps", [1, 2])
def test_a_run_that_does_not_train_logged_every_step_is_still_reported(tmp_path, logging_steps):
    count, _ = stall_warnings_of(tmp_path, 0.0, logging_steps)
    assert count == 1


# A SAM step whose loss at w + eps is not finite (its update dropped) is left out of the logged sam/perturbed_loss and
# sam/sharpness, instead of turning the logging window's means into NaN.
class Recording(FaultInjector):
    """Also records the loss at w + eps and at w of every SAM step (summed over the window's micro-batches)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.perturbed, self.clean = defaultdict(float), defaultdict(float)

    def _sam_clean_pass(self, *args, **kwargs):
        loss, rng, examples = super()._sam_clean_pass(*args, **kwargs)
        self.clean[self.state.global_step] += float(loss)
        return loss, rng, examples

    def _sam_perturbed_pass(self, *args, **kwargs):
        loss = super()._sam_perturbed_pass(*args, **kwargs)
        self.perturbed[self.state.global_step] += float(loss)
        return loss


@pytest.mark.parametrize(
    "overrides",
    [{}, {"gradient_accumulation_steps": 2}, {"gradient_accumulation_steps": 2, "sam_accumulation": "micro"}],
)
def test_a_dropped_step_is_left_out_of_the_logged_losses(tmp_path, overrides):
    args = sam_args(tmp_path, max_steps=10, logging_steps=5, learning_rate=0.01, **overrides)
    trainer = Recording(
        model=tiny_bert(), args=args, train_dataset=tiny_dataset(), phase="perturbed", at=2, value=math.nan
    )
    trainer.train()
    first = next(h for h in trainer.state.log_history if h.get("step") == 5)
    assert first["sam/skipped_updates"] == 0.2  # one of the window's 5 SAM steps was dropped
    kept = [s for s in range(5) if math.isfinite(trainer.perturbed[s])]
    assert len(kept) == 4
    expected = sum(trainer.perturbed[s] for s in kept) / 4
    sharpness = sum(trainer.perturbed[s] - trainer.clean[s] for s in kept) / 4
    assert first["sam/perturbed_loss"] == pytest.approx(expected, abs=2e-6)
    assert first["sam/sharpness"] == pytest.approx(sharpness, abs=2e-6)


def test_a_step_whose_clean_gradient_is_not_finite_is_left_out_of_the_logged_gradient_norm(tmp_path):
    # An fp16 clean gradient that overflowed (common in the first steps, while the loss scale settles), or any
    # non-finite clean loss, turned the whole logging window's sam/grad_norm into inf or NaN.
    args = sam_args(tmp_path, max_steps=10, logging_steps=5, learning_rate=0.01)
    trainer = Recording(model=tiny_bert(), args=args, train_dataset=tiny_dataset(), phase="clean", at=2,
                        value=math.inf)  # fmt: skip
    norms = []
    ascend = trainer._sam_ascend

    def recording(*a, **kw):
        ascend(*a, **kw)
        norms.append(float(trainer._sam.raw_norm))

    trainer._sam_ascend = recording
    trainer.train()
    first = next(h for h in trainer.state.log_history if h.get("step") == 5)
    assert not math.isfinite(norms[1]) and all(math.isfinite(norms[i]) for i in (0, 2, 3, 4))
    assert first["sam/grad_norm"] == pytest.approx(sum(norms[i] for i in (0, 2, 3, 4)) / 4, rel=1e-5)


def test_without_the_nan_filter_the_window_mean_is_nan(tmp_path):
    args = sam_args(tmp_path, max_steps=10, logging_steps=5, learning_rate=0.01, logging_nan_inf_filter=False)
    trainer = Recording(
        model=tiny_bert(), args=args, train_dataset=tiny_dataset(), phase="perturbed", at=2, value=math.nan
    )
    trainer.train()
    first = next(h for h in trainer.state.log_history if h.get("step") == 5)
    assert math.isnan(first["sam/perturbed_loss"])


def test_a_window_holding_only_a_dropped_step_logs_no_perturbed_loss(tmp_path):
    # Logged every step, the dropped step's window has no finite loss at w + eps to average: its sam/perturbed_loss
    # and sam/sharpness are left out of that log (0 / 0 would log NaN, which reads as a diverged run), while
    # sam/skipped_updates reports the drop.
    args = sam_args(tmp_path, max_steps=5, logging_steps=1, learning_rate=0.01)
    trainer = Recording(
        model=tiny_bert(), args=args, train_dataset=tiny_dataset(), phase="perturbed", at=2, value=math.nan
    )
    trainer.train()
    logs = {h["step"]: h for h in trainer.state.log_history if "sam/skipped_updates" in h}
    assert logs[2]["sam/skipped_updates"] == 1.0  # the second step's update (at=2 counts from 1)
    assert "sam/perturbed_loss" not in logs[2] and "sam/sharpness" not in logs[2]
    for step in (1, 3, 4, 5):
        assert logs[step]["sam/skipped_updates"] == 0.0
        assert math.isfinite(logs[step]["sam/perturbed_loss"]) and math.isfinite(logs[step]["sam/sharpness"])


# What accelerate's `should_reduce_batch_size` takes for an out-of-memory error (the text of CUDA's).
OUT_OF_MEMORY = "CUDA out of memory. Tried to allocate 2.00 GiB"


class OutOfMemoryOnce(SequentialSAMTrainer):
    """Raises an out-of-memory error at the `at`-th training pass with gradient (from 1), once."""

    def __init__(self, *args, at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.passes = at, []  # a list: the perturbed pass puts the trainer's numbers back (off_the_record)

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training and torch.is_grad_enabled():
            self.passes.append(self.state.global_step)
            if len(self.passes) == self.at:
                raise RuntimeError(OUT_OF_MEMORY)
        return super().compute_loss(model, inputs, *args, **kwargs)


@pytest.mark.parametrize(
    ("method", "overrides", "at"),
    [
        ("sam", {}, 2),  # between the clean and the perturbed pass
        ("fsam", {}, 2),  # after the ascent took the gradient into F-SAM's average
        ("fsam", {"gradient_accumulation_steps": 2, "weight_ema_decay": 0.5}, 4),  # the window's second micro-batch
        ("looksam", {"gradient_accumulation_steps": 2}, 4),
        ("ssam-f", {}, 2),  # the Fisher mask, chosen again at the retry's first step
    ],
)
def test_auto_find_batch_size_retries_as_a_fresh_run_at_the_smaller_batch(tmp_path, method, overrides, at):
    # Trainer runs its inner loop again at 0.9 times the batch after an out-of-memory error. Raised before the first
    # update, the retry must be the run started at that batch: weights, method state and logged sam/* metrics (F-SAM's
    # average kept the larger batch's gradient, and that attempt's metrics went into the retry's first log).
    common = dict(max_steps=4, **METHOD_CASES[method]["args"], **overrides)
    retried = OutOfMemoryOnce(
        model=tiny_bert(),
        args=sam_args(tmp_path / "retried", per_device_train_batch_size=8, auto_find_batch_size=True, **common),
        train_dataset=tiny_dataset(),
        at=at,
    )
    retried.train()
    fresh = SequentialSAMTrainer(
        model=tiny_bert(), args=sam_args(tmp_path / "fresh", per_device_train_batch_size=7, **common),
        train_dataset=tiny_dataset(),
    )  # fmt: skip
    fresh.train()
    assert retried.passes[at - 1] == 0 and retried._train_batch_size == 7  # one retry, raised before any update
    assert_same_weights(state(fresh.model), state(retried.model))
    assert_same_weights(fresh.sam_state_dict(), retried.sam_state_dict())

    def metrics(trainer):
        return [{k: v for k, v in h.items() if k.startswith("sam/") or k == "loss"} for h in trainer.state.log_history]

    assert metrics(retried) == metrics(fresh)
