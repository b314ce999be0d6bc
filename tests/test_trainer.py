"""SAMTrainer inside transformers.Trainer: invariants, hand-written references, and every Trainer feature."""

import math
import shutil
from collections import Counter

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.optimization import Adafactor

from hf_sam import METHODS, SAMTrainer
from hf_sam.gsam import rho_min
from hf_sam.optim import AdaSAMOptimizer
from tests.helpers import (
    LABELS,
    VOCAB,
    HostSyncs,
    SequentialSAMTrainer,
    SequentialTrainer,
    assert_same_weights,
    batches,
    copy_model,
    sam_args,
    state,
    tiny_bert,
    tiny_dataset,
)
from tests.method_cases import METHOD_CASES
from tests.reference import AMSGrad, reference_sam


SAM_CASES = [name for name, case in METHOD_CASES.items() if case["reference"] is not None]
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.01),
    # transformers' Adafactor keeps a first moment ("exp_avg", of its update) when beta1 is set; its eps[0] of 1e-30
    # would blow the rounding noise of a gradient that is 0 in exact arithmetic (BERT's key bias) up to full steps
    "adafactor": lambda params: Adafactor(
        params, lr=0.01, eps=(1e-3, 1e-3), beta1=0.9, relative_step=False, scale_parameter=False
    ),
}


ATOL = {"sgd": 1e-6, "adamw": 1e-5}


def optimizer_for(method: str, default: str | None) -> str | None:
    """The optimizer a test passes: none for methods that bring their own (AdaSAM)."""
    return None if METHOD_CASES[method].get("optimizer") == "own" else default


def loss_term(method: str) -> bool:
    """SAF / MESA: one plain pass plus a loss term, no perturbation (tests/test_loss_terms.py has their loops)."""
    return METHOD_CASES[method].get("kind") == "loss_term"


def supports(method: str, accumulation: str, ga: int) -> bool:
    return ga == 1 or accumulation in METHOD_CASES[method]["accumulation"]


def plain_args(tmp_path, **overrides):
    """The same arguments as `sam_args`, as a plain TrainingArguments."""
    values = {k: v for k, v in sam_args(tmp_path, **overrides).to_dict().items() if not k.startswith("sam_")}
    keep = set(TrainingArguments.__dataclass_fields__)
    return TrainingArguments(**{k: v for k, v in values.items() if k in keep and k in overrides or k in _BASE})


_BASE = {
    "output_dir",
    "report_to",
    "use_cpu",
    "per_device_train_batch_size",
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "max_grad_norm",
    "logging_steps",
    "save_strategy",
    "seed",
    "disable_tqdm",
    "dataloader_num_workers",
}


def train_sam(
    tmp_path, model, dataset, optimizer=None, trainer_cls=SequentialSAMTrainer, trainer_kwargs=None, **overrides
):
    optimizers = (OPTIMIZERS[optimizer](model.parameters()), None) if optimizer else (None, None)
    trainer = trainer_cls(
        model=model,
        args=sam_args(tmp_path, **overrides),
        train_dataset=dataset,
        optimizers=optimizers,
        **(trainer_kwargs or {}),
    )
    trainer.train()
    return trainer


def train_plain(tmp_path, model, dataset, optimizer=None, trainer_cls=SequentialTrainer, **overrides):
    optimizers = (OPTIMIZERS[optimizer](model.parameters()), None) if optimizer else (None, None)
    trainer = trainer_cls(
        model=model, args=plain_args(tmp_path, **overrides), train_dataset=dataset, optimizers=optimizers
    )
    trainer.train()
    return trainer


def test_registry_has_a_test_row_for_every_method():
    assert set(METHODS) == set(METHOD_CASES)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_entry_states_its_capabilities_truthfully(tmp_path, method):
    # The flags on a registry entry are what the docs and the derived test lists rely on: check them against what a
    # run does (state saved for resume, an index column added) and what the test table runs (FSDP2 or its refusal).
    from hf_sam.saf import INDEX_COLUMN

    flags, case = METHODS[method].capabilities, METHOD_CASES[method]
    trainer = train_sam(
        tmp_path, tiny_bert(), tiny_dataset(), optimizer_for(method, "sgd"), max_steps=4, **case["args"]
    )
    assert bool(trainer._sam.state_dict()) == flags.stateful
    assert (INDEX_COLUMN in trainer.train_dataset.column_names) == flags.needs_indices
    assert flags.ddp  # every method runs under DDP (tests/distributed/ddp_methods.py runs each row)
    fsdp_refusals = [match for overrides, match in case["errors"] if "fsdp" in overrides]
    assert flags.fsdp2 == (not fsdp_refusals), "an FSDP2 refusal belongs in the row's errors, and fsdp2=False"
    assert flags.fsdp2 == (isinstance(case["fsdp"], dict) or case["fsdp"].startswith("checked"))
    # Under DeepSpeed ZeRO-1/2 the check script runs every method that claims it and compares it with DDP; a method
    # without it must be refused there, with the refusal among its row's errors.
    from tests.distributed.zero_check import FAMILIES

    deepspeed_refusals = [match for overrides, match in case["errors"] if "deepspeed" in overrides]
    assert flags.deepspeed == (method in {"none", "sam", *FAMILIES}) == (not deepspeed_refusals)
    if flags.stateful:
        assert case.get("ddp_resume"), f"{method} keeps state: set ddp_resume on its row"


def test_every_piece_of_every_axis_has_a_hand_written_reference():
    # A new ascent rule or descent transform fails here until tests/reference.py computes it by hand; the loss terms'
    # hand loops live in tests/test_loss_terms.py, Sparse SAM's masks in tests/test_masks.py.
    from hf_sam.components import ASCENT_RULES, DESCENT_TRANSFORMS, LOSS_TERMS
    from tests import reference, test_loss_terms, test_masks

    assert set(ASCENT_RULES) == set(reference.ASCENTS)
    assert {"none", *DESCENT_TRANSFORMS} == set(reference.DESCENTS)
    hand_loops = {
        "saf": test_loss_terms.test_saf_matches_hand_written_loop_across_epochs,
        "mesa": test_loss_terms.test_mesa_matches_hand_written_ema_teacher_loop,
    }
    assert set(LOSS_TERMS) == set(hand_loops)
    # Masks and schedules: each choice has a test of what it computes (no mask: the reference loops above).
    from hf_sam.masks import MASKS
    from hf_sam.schedules import SCHEDULES
    from tests import test_core

    mask_tests = {
        "fisher": test_masks.test_fisher_mask_is_the_top_k_of_a_hand_computed_fisher,
        "dynamic": test_masks.test_dynamic_mask_keeps_the_live_count_through_updates,
    }
    assert set(MASKS) == {"none", *mask_tests}
    # Each probability schedule's share of SAM steps is tested; always and every_k draw nothing (test_schedule_shapes).
    share_test = test_core.test_sam_step_share_is_within_3_sigma_of_the_mean_probability
    drawn = {case[0] for mark in share_test.pytestmark if mark.name == "parametrize" for case in mark.args[1]}
    assert set(SCHEDULES) == drawn | {"always", "every_k"}


# ---------------------------------------------------------------- invariants: none and rho=0 are the Trainer


@pytest.mark.parametrize("ga", [1, 2])
def test_method_none_is_plain_trainer_bit_for_bit(tmp_path, ga):
    data = tiny_dataset()
    plain = train_plain(
        tmp_path / "p", tiny_bert(dropout=0.1), data, trainer_cls=Trainer, gradient_accumulation_steps=ga
    )
    sam = train_sam(
        tmp_path / "s",
        tiny_bert(dropout=0.1),
        data,
        trainer_cls=SAMTrainer,
        sam_method="none",
        gradient_accumulation_steps=ga,
    )
    assert_same_weights(state(plain.model), state(sam.model))
    # docs/methods.md#none: the step count and every logged loss too, not only the weights.
    assert sam.state.global_step == plain.state.global_step == 4
    for key in ("loss", "grad_norm", "learning_rate", "train_loss"):
        plain_logged = [h[key] for h in plain.state.log_history if key in h]
        assert plain_logged and plain_logged == [h[key] for h in sam.state.log_history if key in h], key


@pytest.mark.parametrize("accumulation", ["window", "micro"])
@pytest.mark.parametrize("method", SAM_CASES)
def test_rho_zero_is_plain_trainer_bit_for_bit(tmp_path, method, accumulation):
    if not supports(method, accumulation, 2):
        pytest.skip(f"{method} refuses {accumulation} accumulation with GA > 1")
    if not METHOD_CASES[method].get("rho_zero_plain", True):
        pytest.skip(f"{method} selects a subset of each batch for the descent, whatever rho")
    if loss_term(method):
        pytest.skip(f"{method} is a one-pass loss term: it has no rho")
    # Dropout on and the default (shuffling) sampler: the RNG replay must leave the RNG stream as Trainer's.
    # mSAM's shards sum the gradient in another order and draw dropout per shard: equal up to rounding, no dropout.
    shards = method == "msam"
    dropout = 0.0 if shards else 0.1
    data = tiny_dataset()
    optimizer = "adamw" if method == "adasam" else None
    plain_model = tiny_bert(dropout=dropout)
    eps = METHOD_CASES[method].get("optimizer_eps", 1e-8)
    own = method == "adasam"
    plain_opt = (AdaSAMOptimizer(plain_model.parameters(), lr=0.05, eps=eps), None) if own else (None, None)
    if shards:  # SGD: AdamW would amplify the shard-order rounding on near-zero gradient entries
        optimizer, plain_opt = "sgd", (OPTIMIZERS["sgd"](plain_model.parameters()), None)
    plain = Trainer(model=plain_model, args=plain_args(tmp_path / "p", gradient_accumulation_steps=2),
                    train_dataset=data, optimizers=plain_opt)  # fmt: skip
    plain.train()
    args = {**METHOD_CASES[method]["args"], "sam_rho": 0.0, "sam_accumulation": accumulation}
    args.pop("sam_rho_min", None)
    sam = train_sam(tmp_path / "s", tiny_bert(dropout=dropout), data, optimizer_for(method, optimizer),
                    trainer_cls=SAMTrainer, gradient_accumulation_steps=2, **args)  # fmt: skip
    assert_same_weights(state(plain.model), state(sam.model), exact=not shards)


def _cross_entropy_sum_over_window(outputs, labels, num_items_in_batch=None):
    """A `compute_loss_func` as users pass it: the window's summed CE over its item count."""
    loss = torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum")
    return loss / num_items_in_batch if num_items_in_batch is not None else loss / labels.numel()


# Trainer options that touch the loss, the forward, or what runs between steps: with rho 0 SAMTrainer must still be
# Trainer bit for bit (NEFTune's embedding noise is drawn from the RNG, so it must be replayed like dropout).
TRAINER_FEATURES = {
    "label_smoothing": ({"label_smoothing_factor": 0.1}, {}),
    "neftune": ({"neftune_noise_alpha": 5.0}, {}),
    "eval_every_step": ({"eval_strategy": "steps", "eval_steps": 1}, {"eval_dataset": tiny_dataset(8, seed=1)}),
    "tokens_seen": ({"include_num_input_tokens_seen": True}, {}),
    "compute_loss_func": ({}, {"compute_loss_func": _cross_entropy_sum_over_window}),
    "activation_checkpointing": ({"activation_checkpointing": True}, {}),  # its recompute sees the replayed masks
    "model_init": ({}, {"model_init": lambda: tiny_bert(dropout=0.1)}),  # the model is built inside train()
    # 8 batches an epoch in windows of 3, 3 and 2 (the last one short), over 2 epochs: 6 optimizer steps.
    "uneven_windows": ({"gradient_accumulation_steps": 3, "max_steps": -1, "num_train_epochs": 2}, {}),
    "uneven_windows_micro": (
        {"gradient_accumulation_steps": 3, "max_steps": -1, "num_train_epochs": 2, "sam_accumulation": "micro"},
        {},
    ),
}


@pytest.mark.parametrize("feature", TRAINER_FEATURES)
def test_rho_zero_is_plain_trainer_with_trainer_options(tmp_path, feature):
    options, trainer_kwargs = TRAINER_FEATURES[feature]
    data = tiny_dataset()
    model = (lambda: None) if "model_init" in trainer_kwargs else (lambda: tiny_bert(dropout=0.1))
    options = {"gradient_accumulation_steps": 2, **options}
    plain = Trainer(model=model(), args=plain_args(tmp_path / "p", **options), train_dataset=data, **trainer_kwargs)
    plain.train()
    sam = SAMTrainer(model=model(), args=sam_args(tmp_path / "s", sam_rho=0.0, **options), train_dataset=data,
                     **trainer_kwargs)  # fmt: skip
    sam.train()
    assert_same_weights(state(plain.model), state(sam.model))
    assert sam.state.global_step == plain.state.global_step == (6 if feature.startswith("uneven") else 4)
    assert sam.model.is_activation_checkpointing == (feature == "activation_checkpointing")
    for key in ("loss", "eval_loss", "num_input_tokens_seen"):
        plain_logged = [h[key] for h in plain.state.log_history if key in h]
        assert plain_logged == [h[key] for h in sam.state.log_history if key in h], key
        assert plain_logged or key != "eval_loss" or feature != "eval_every_step"


@pytest.mark.parametrize("accumulation", ["window", "micro"])
def test_rho_zero_is_plain_trainer_when_an_iterable_dataset_runs_out_inside_a_window(tmp_path, accumulation):
    # 5 batches a pass in windows of 2: the pass ends inside its third window, after which Trainer takes no optimizer
    # step (an iterable set has no length to count windows by) and adds that window's gradient and loss to the next
    # pass's first step. The SAM step's ascent took it for its own and its descent dropped it: at rho 0 the word
    # embeddings ended 0.14 away from Trainer's, and sam/perturbed_loss was half of that step's `loss`.
    data = tiny_dataset(20).to_iterable_dataset()
    options = {"gradient_accumulation_steps": 2, "max_steps": 4}
    plain = Trainer(model=tiny_bert(dropout=0.1), args=plain_args(tmp_path / "p", **options), train_dataset=data)
    plain.train()
    sam = SAMTrainer(model=tiny_bert(dropout=0.1), train_dataset=data,
                     args=sam_args(tmp_path / "s", sam_rho=0.0, sam_accumulation=accumulation, **options))  # fmt: skip
    sam.train()
    assert_same_weights(state(plain.model), state(sam.model))
    plain_logs = [h for h in plain.state.log_history if "loss" in h]
    sam_logs = [h for h in sam.state.log_history if "loss" in h]
    assert [h["loss"] for h in plain_logs] == [h["loss"] for h in sam_logs]
    assert [h["loss"] for h in sam_logs] == pytest.approx([h["sam/perturbed_loss"] for h in sam_logs], rel=1e-6)


class _StepInProgress(TrainerCallback):
    """The optimizer step in progress (None between steps, where Trainer prefetches, logs and saves), and the steps
    that ran SAM."""

    def __init__(self, trainer):
        self.trainer, self.step, self.sam_steps = trainer, None, set()

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.args.sam_enabled and self.trainer._sam.window_is_sam:
            self.sam_steps.add(self.step)
        self.step = None


# Draws from a CPU generator (SS-SAM's coin, ESAM's kept tensors): host tensors on any device, nothing to wait for.
HOST_DRAWS = {"schedules.py:is_sam_step", "esam.py:kept_tensors"}


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_a_step_waits_for_the_device_only_for_the_guards_flag(tmp_path, method, ga):
    # What a steady-state step of hf_sam reads on the host, where an accelerator makes it wait: the guard's flag once
    # per SAM step (docs/methods.md#non-finite-values) and ESAM's per-class selection its size once per micro-batch;
    # plain steps and the loss terms nothing. The metrics stay on the device until Trainer logs.
    case = METHOD_CASES[method]
    overrides = {"saf_start_epoch": 0.0} if method == "saf" else {}  # SAF's lookup runs from the first step
    if ga > 1 and method != "none" and "sam_accumulation" not in case["args"]:
        overrides["sam_accumulation"] = case["accumulation"][0]
    steps = 4  # LookSAM's row runs SAM at steps 0 and 3; step 0 builds the pieces and Sparse SAM's first mask
    args = sam_args(
        tmp_path, max_steps=steps, logging_steps=2, gradient_accumulation_steps=ga, **case["args"], **overrides
    )
    # One epoch, so no mask is refreshed after step 0 (a refresh reads the mask's density, once per interval).
    trainer = SequentialSAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(4 * ga * steps))
    now = _StepInProgress(trainer)
    trainer.add_callback(now)
    with HostSyncs(lambda: now.step) as syncs:
        trainer.train()
    selections = ga if case["args"].get("esam_gamma", 1) < 1 else 0
    assert now.sam_steps or loss_term(method) or method == "none"
    for step in range(1, steps):
        found = Counter({site: n for (at, site), n in syncs.counts.items() if at == step and site not in HOST_DRAWS})
        allowed = Counter()
        if step in now.sam_steps:
            allowed.update({"guard.py:update_is_finite": 1, "esam.py:top_rise_per_class": selections})
        assert not found - allowed, f"step {step}: {dict(found)}"


class _PassesANewDict:
    """A `training_step` override as users write one: it hands a new dict on (`{**inputs, ...}`; here a copy)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        return super().training_step(model, dict(inputs), num_items_in_batch)


@pytest.mark.parametrize("accumulation, ga", [("micro", 2), ("window", 1)])
def test_a_training_step_override_that_passes_a_new_dict_keeps_every_micro_batch(tmp_path, accumulation, ga):
    # Taken for a window of one, each micro-batch's clean pass mixed into the earlier descent gradients and the
    # ascent dropped them: the step kept the last micro-batch's gradient alone.
    data = tiny_dataset()
    plain = type("Plain", (_PassesANewDict, Trainer), {})(
        model=tiny_bert(dropout=0.1),
        args=plain_args(tmp_path / "p", gradient_accumulation_steps=ga),
        train_dataset=data,
    )
    plain.train()
    sam = type("Sam", (_PassesANewDict, SAMTrainer), {})(
        model=tiny_bert(dropout=0.1),
        args=sam_args(tmp_path / "s", sam_rho=0.0, sam_accumulation=accumulation, gradient_accumulation_steps=ga),
        train_dataset=data,
    )
    sam.train()
    assert_same_weights(state(plain.model), state(sam.model))


def test_window_accumulation_refuses_a_training_step_override_that_passes_a_new_dict(tmp_path):
    # Window mode runs the whole window's clean passes from the prefetched batches: the override's would be missed.
    model = tiny_bert()
    before = state(model)
    sam = type("Sam", (_PassesANewDict, SAMTrainer), {})(
        model=model, args=sam_args(tmp_path, gradient_accumulation_steps=2), train_dataset=tiny_dataset()
    )
    with pytest.raises(ValueError, match="sam_accumulation micro"):
        sam.train()
    assert_same_weights(before, state(sam.model))


class _OwnBatchSamples:
    """A `get_batch_samples` override that does not call super() (Trainer's own code, e.g. copied to count items
    differently), so SAMMixin's never sees the prefetched window."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        return Trainer.get_batch_samples(self, epoch_iterator, num_batches, device)


def test_a_get_batch_samples_override_that_bypasses_the_mixin_is_refused_before_any_update(tmp_path):
    # Each micro-batch was taken for a window of one: at rho 0 the step kept the last micro-batch's gradient alone
    # (weights 0.36 off the plain Trainer after 4 steps, with a logged sharpness of 0).
    model = tiny_bert()
    before = state(model)
    sam = type("Sam", (_OwnBatchSamples, SAMTrainer), {})(
        model=model, args=sam_args(tmp_path, sam_rho=0.0, gradient_accumulation_steps=2), train_dataset=tiny_dataset()
    )
    with pytest.raises(ValueError, match=r"does not call super\(\).get_batch_samples"):
        sam.train()
    assert_same_weights(before, state(sam.model))
    # Without accumulation a window is one micro-batch, which the step receives: it trains as the plain Trainer.
    plain = Trainer(model=tiny_bert(), args=plain_args(tmp_path / "p"), train_dataset=tiny_dataset())
    plain.train()
    sam = type("Sam", (_OwnBatchSamples, SAMTrainer), {})(
        model=tiny_bert(), args=sam_args(tmp_path / "s", sam_rho=0.0), train_dataset=tiny_dataset()
    )
    sam.train()
    assert_same_weights(state(plain.model), state(sam.model))


class _OwnTrainingStep:
    """A `training_step` override that does not call super() (Trainer's own step, e.g. copied to add a term), so
    SAMMixin's step never runs."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        return Trainer.training_step(self, model, inputs, num_items_in_batch)


def test_a_training_step_override_that_bypasses_the_mixin_is_refused_before_any_update(tmp_path):
    # It trained as the plain Trainer without a word: no perturbation, no sam/* metric.
    model = tiny_bert()
    before = state(model)
    sam = type("Sam", (_OwnTrainingStep, SAMTrainer), {})(
        model=model, args=sam_args(tmp_path, max_steps=2), train_dataset=tiny_dataset()
    )
    with pytest.raises(ValueError, match=r"Sam.training_step does not call super\(\).training_step"):
        sam.train()
    assert_same_weights(before, state(sam.model))


class _DrawsFromPythonAndNumPy:
    """A `compute_loss` override that draws from Python's and NumPy's global RNGs in each pass (a mixup coefficient,
    a random augmentation), as TRL's GKDTrainer draws `random.random()` in each `training_step`."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import random

        import numpy as np

        weight = 0.5 + float(np.random.beta(0.4, 0.4))
        if random.random() < 0.5:
            inputs = {**inputs, "input_ids": inputs["input_ids"].flip(1)}
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return loss * weight


@pytest.mark.parametrize("accumulation", ["window", "micro"])
def test_the_perturbed_pass_replays_python_and_numpy_draws_of_a_host(tmp_path, accumulation):
    # Only torch's RNG was replayed: the perturbed pass drew another coefficient and flip (at rho 0 a logged sharpness
    # of -0.50 to +0.42 and weights 0.36 off the plain Trainer), and both streams advanced twice per step.
    import random

    import numpy as np

    runs, draws = {}, {}
    for name, host, args in (
        ("plain", Trainer, plain_args(tmp_path / "p", gradient_accumulation_steps=2)),
        ("sam", SAMTrainer, sam_args(tmp_path / "s", sam_rho=0.0, sam_accumulation=accumulation,
                                     gradient_accumulation_steps=2)),
    ):  # fmt: skip
        random.seed(0)
        np.random.seed(0)
        runs[name] = type(name, (_DrawsFromPythonAndNumPy, host), {})(
            model=tiny_bert(dropout=0.1), args=args, train_dataset=tiny_dataset()
        )
        runs[name].train()
        draws[name] = (random.random(), float(np.random.rand()))
    assert_same_weights(state(runs["plain"].model), state(runs["sam"].model))
    assert [h["sam/sharpness"] for h in runs["sam"].state.log_history if "sam/sharpness" in h] == [0.0] * 4
    assert draws["sam"] == draws["plain"]  # the streams after training are the plain Trainer's


# ---------------------------------------------------------------- hand-written references


def train_with_reference(tmp_path, optimizer, ga, accumulation, args, reference_kwargs, steps=4, own_eps=1e-8):
    """Train SAMTrainer and the hand-written loop from the same initial weights on the same micro-batches."""
    data = tiny_dataset()
    model = tiny_bert()
    reference_model = copy_model(model)
    trainer = train_sam(
        tmp_path,
        model,
        data,
        optimizer,
        max_steps=steps,
        gradient_accumulation_steps=ga,
        per_device_train_batch_size=2,
        sam_accumulation=accumulation,
        **args,
    )
    micro = batches(data, 2)
    windows = [micro[i : i + ga] for i in range(0, steps * ga, ga)]
    if reference_kwargs.get("mask") == "from_trainer":  # no mask update within these steps (interval: an epoch)
        reference_kwargs = {**reference_kwargs, "mask": dict(trainer._sam.perturbation.mask.masks)}
    if optimizer is None:  # the method's own optimizer (AdaSAM), written out by hand in tests/reference.py
        optim = AMSGrad(reference_model.parameters(), lr=0.05, eps=own_eps)
    else:
        optim = OPTIMIZERS[optimizer](reference_model.parameters())
    reference_sam(reference_model, optim, windows, **{"accumulation": accumulation, **reference_kwargs})
    return trainer, reference_model, windows


@pytest.mark.parametrize("ga, accumulation", [(1, "window"), (2, "window"), (2, "micro")])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("method", SAM_CASES)
def test_matches_reference_loop(tmp_path, method, optimizer, ga, accumulation):
    case = METHOD_CASES[method]
    if loss_term(method):
        pytest.skip(f"{method} is a one-pass loss term: its hand-written loop is in {case['reference']}")
    if not supports(method, accumulation, ga):
        pytest.skip(f"{method} refuses {accumulation} accumulation with GA > 1")
    if case.get("optimizer") == "own" and optimizer == "adamw":
        pytest.skip(f"{method} brings its own optimizer (covered by the sgd row)")
    optimizer = optimizer_for(method, optimizer)
    if ga == 1 and "window" not in case["accumulation"]:
        accumulation = "micro"
    trainer, reference_model, windows = train_with_reference(
        tmp_path, optimizer, ga, accumulation, case["args"], case["reference"], own_eps=case.get("optimizer_eps", 1e-8)
    )
    # AdamW divides by sqrt(v): last-bit differences on near-zero gradient entries grow to ~1e-6.
    assert_same_weights(state(trainer.model), state(reference_model), exact=False, atol=ATOL[optimizer or "adamw"])
    # The test can fail: a run without SAM ends elsewhere.
    plain = copy_model(tiny_bert())
    plain_optim = OPTIMIZERS[optimizer](plain.parameters()) if optimizer else AMSGrad(
        plain.parameters(), lr=0.05, eps=case.get("optimizer_eps", 1e-8))  # fmt: skip
    reference_sam(plain, plain_optim, windows, rho=0.0)
    assert any(
        not torch.allclose(a, b, atol=1e-6) for a, b in zip(state(plain).values(), state(reference_model).values())
    )


def test_unnormalized_ascent_matches_reference(tmp_path):
    trainer, reference_model, _ = train_with_reference(
        tmp_path,
        "sgd",
        2,
        "micro",
        {"sam_rho": 0.5, "sam_ascent": "unnormalized"},
        {"rho": 0.5, "ascent": "unnormalized"},
    )
    assert_same_weights(state(trainer.model), state(reference_model), exact=False)


def test_asam_in_the_papers_form_matches_reference(tmp_path):
    # The preset (biases scaled, on the ramp) is the asam row of test_matches_reference_loop; this is the paper's
    # form one flag pair away: T = 1 on biases, SAM on every step.
    trainer, reference_model, _ = train_with_reference(
        tmp_path,
        "sgd",
        2,
        "window",
        {"sam_method": "asam", "sam_rho": 0.5, "sam_adaptive_bias": False, "sam_schedule": "always"},
        {"rho": 0.5, "ascent": "adaptive", "eta": 0.01},
    )
    assert_same_weights(state(trainer.model), state(reference_model), exact=False)


@pytest.mark.parametrize(("rule", "reference_rule"), [
    ({"sam_method": "sam", "sam_rho": 0.5}, {"rho": 0.5}),
    ({"sam_method": "asam", "sam_rho": 2.0, "sam_schedule": "always"},
     {"rho": 2.0, "ascent": "adaptive", "eta": 0.01, "scale_biases": True}),
])  # fmt: skip
def test_rho_warmup_matches_reference(tmp_path, rule, reference_rule):
    # Over the first 3/4 of the 4 steps: rho/3, 2 rho/3, rho, rho.
    trainer, reference_model, _ = train_with_reference(
        tmp_path, "sgd", 2, "window", {**rule, "sam_rho_warmup": 0.75}, {**reference_rule, "rho_warmup": 0.75}
    )
    assert_same_weights(state(trainer.model), state(reference_model), exact=False)
    logged = [h["sam/rho"] for h in trainer.state.log_history if "sam/rho" in h]
    rho = rule["sam_rho"]
    assert logged == pytest.approx([rho / 3, 2 * rho / 3, rho, rho], rel=1e-5)  # logs keep 6 digits


@pytest.mark.parametrize("method", SAM_CASES)
def test_window_batch2_ga2_equals_batch4_ga1(tmp_path, method):
    if "window" not in METHOD_CASES[method]["accumulation"]:
        pytest.skip(f"{method} perturbs per shard, not per window")
    if not METHOD_CASES[method].get("window_invariant", True):
        pytest.skip(f"{method} selects examples per micro-batch")
    data = tiny_dataset()
    args = METHOD_CASES[method]["args"]
    opt = optimizer_for(method, "adamw")
    a = train_sam(tmp_path / "a", tiny_bert(), data, opt, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  **args)  # fmt: skip
    b = train_sam(tmp_path / "b", tiny_bert(), data, opt, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                  **args)  # fmt: skip
    assert_same_weights(state(a.model), state(b.model), exact=False, atol=ATOL["adamw"])
    if "micro" in METHOD_CASES[method]["accumulation"]:
        micro = train_sam(tmp_path / "m", tiny_bert(), data, opt, per_device_train_batch_size=2,
                          gradient_accumulation_steps=2, sam_accumulation="micro", **args)  # fmt: skip
        assert any(
            not torch.allclose(x, y, atol=1e-6) for x, y in zip(state(a.model).values(), state(micro.model).values())
        )


# ---------------------------------------------------------------- precision


class ScalerTrainer(SequentialSAMTrainer):
    """Installs a real CPU GradScaler before `accelerator.prepare` and counts its unscale_ calls."""

    def __init__(self, *args, overflow_at_loss_call=None, **kwargs):
        super().__init__(*args, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        self.unscale_calls = 0
        unscale = scaler.unscale_

        def counting_unscale(optimizer):
            self.unscale_calls += 1
            return unscale(optimizer)

        scaler.unscale_ = counting_unscale
        self.accelerator.scaler = scaler
        # What accelerate's unscale_gradients does under native fp16 (on CPU it is a no-op since mixed_precision
        # is "no"): clipping then sees unscaled gradients, and GradScaler.step does not unscale again.
        self.accelerator.unscale_gradients = lambda optimizer=None: [
            scaler.unscale_(opt.optimizer) for opt in self.accelerator._optimizers
        ]
        self._overflow_at = overflow_at_loss_call  # 1: step 0's clean pass, 2: its descent pass
        self._loss_calls = 0

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        self._loss_calls += 1
        if self._loss_calls == self._overflow_at:
            return loss * math.inf
        return loss


FP16_CASES = [("sam", 0.0)] + [(m, 1.0) for m in SAM_CASES]


@pytest.mark.parametrize("method, max_grad_norm", FP16_CASES)
def test_fp16_grad_scaler_path_unscales_once_and_matches_fp32(tmp_path, method, max_grad_norm):
    data = tiny_dataset()
    args = {**METHOD_CASES[method]["args"], "max_grad_norm": max_grad_norm}
    opt = optimizer_for(method, "adamw")
    scaled = train_sam(tmp_path / "a", tiny_bert(), data, opt, trainer_cls=ScalerTrainer, **args)
    fp32 = train_sam(tmp_path / "b", tiny_bert(), data, opt, **args)
    assert scaled.accelerator.scaler.get_scale() == 2.0**10  # no overflow, no skipped step
    # unscale_ once per optimizer step: Trainer's clip or GradScaler.step, never our ascent.
    assert scaled.unscale_calls == scaled.state.global_step == 4
    # A power-of-two scale is exact: the scaled run is the fp32 run.
    assert_same_weights(state(scaled.model), state(fp32.model), exact=False, atol=ATOL["adamw"])


def test_fp16_overflowing_ascent_skips_perturbation_and_logs_it(tmp_path):
    data = tiny_dataset()
    sam = train_sam(
        tmp_path / "s",
        tiny_bert(),
        data,
        "sgd",
        trainer_cls=ScalerTrainer,
        max_steps=1,
        trainer_kwargs={"overflow_at_loss_call": 1},
    )
    plain = train_sam(
        tmp_path / "p", tiny_bert(), data, "sgd", trainer_cls=ScalerTrainer, max_steps=1, sam_method="none"
    )
    logged = [h for h in sam.state.log_history if "sam/skipped" in h]
    assert logged[0]["sam/skipped"] == 1.0
    # eps = 0 for that step and the weights were restored exactly: the step is the plain one.
    assert_same_weights(state(sam.model), state(plain.model))
    assert sam.state.global_step == 1 and sam.accelerator.scaler.get_scale() == 2.0**10


def test_fp16_overflowing_descent_skips_the_step_and_keeps_the_weights_bit_exactly(tmp_path):
    model = tiny_bert()
    before = state(model)
    sam = train_sam(
        tmp_path, model, tiny_dataset(), "sgd", trainer_cls=ScalerTrainer, max_steps=1,
        trainer_kwargs={"overflow_at_loss_call": 2},
    )  # fmt: skip
    # GradScaler found inf in the descent gradient: no optimizer step, the scale halved, and w is w (restored by copy,
    # not w + eps - eps).
    assert sam.accelerator.scaler.get_scale() == 2.0**9
    assert_same_weights(before, state(sam.model))
    assert [h["sam/skipped"] for h in sam.state.log_history if "sam/skipped" in h] == [0.0]


class NonFiniteDescentScaler(ScalerTrainer):
    """The real CPU GradScaler, and a loss at w + eps that is NaN on every SAM step (a radius the model's fp16
    forward overflows at): lowering the loss scale cannot help, since the loss is NaN before it is scaled."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * math.nan if self._sam.perturbation.active else loss  # at w + eps


def test_fp16_non_finite_losses_at_w_plus_eps_stop_training_as_without_fp16(tmp_path):
    # The GradScaler skips each of these steps and halves its scale, so without the guard's count the run would go
    # on without a word, its weights frozen and its scale falling towards 0, for as long as it was set to train.
    model = tiny_bert()
    before = state(model)
    trainer = NonFiniteDescentScaler(model=model, args=sam_args(tmp_path, max_steps=20), train_dataset=tiny_dataset())
    with pytest.raises(RuntimeError, match="sam_rho"):
        trainer.train()
    assert trainer.state.global_step == 4  # the fifth SAM step in a row stops it, as in fp32 and bf16
    assert trainer.accelerator.scaler.get_scale() == 2.0**6  # the scaler skipped the first four itself
    assert_same_weights(before, state(trainer.model))


class RestoreCheckingTrainer(SequentialSAMTrainer):
    """Asserts after every restore that the weights are bit-identical to those before the perturbation."""

    restores = 0
    moved = 0

    def _sam_build(self):
        super()._sam_build()
        perturbation = self._sam.perturbation
        restore = perturbation.restore

        def checked(move):  # ascend (from the gradient) or shift (Momentum-SAM, from the optimizer's moment)
            def checked_move(*args, **kwargs):
                self._before = [p.detach().clone() for p in perturbation.params]
                out = move(*args, **kwargs)
                self.moved += any(not torch.equal(p, b) for p, b in zip(perturbation.params, self._before))
                return out

            return checked_move

        def checked_restore():
            if not perturbation.active:  # Momentum-SAM's first step has no moment to move along
                return restore()
            restore()
            for p, before in zip(perturbation.params, self._before):
                assert torch.equal(p, before)
            self.restores += 1

        perturbation.ascend, perturbation.shift = checked(perturbation.ascend), checked(perturbation.shift)
        perturbation.restore = checked_restore


BF16_CASES = [("sam", torch.bfloat16)] + [(m, torch.float32) for m in SAM_CASES]


@pytest.mark.parametrize("method, weights_dtype", BF16_CASES)
def test_bf16_autocast_trains_and_restores_exactly(tmp_path, method, weights_dtype):
    model = tiny_bert().to(weights_dtype)
    before = state(model)
    trainer = train_sam(tmp_path, model, tiny_dataset(), optimizer_for(method, "adamw"),
                        trainer_cls=RestoreCheckingTrainer, bf16=True, **METHOD_CASES[method]["args"])  # fmt: skip
    # Every perturbation moved the weights and every restore put them back bit for bit (loss terms: none).
    assert (trainer.restores >= 1 or loss_term(method)) and trainer.moved == trainer.restores
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(before[n], p) for n, p in state(trainer.model).items())


class ComplexMix(torch.nn.Module):
    """A classifier with a complex weight, or (`as_real`) the same weight held as its real and imaginary parts."""

    def __init__(self, as_real: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(VOCAB, 8)
        mix = torch.randn(8, 8, dtype=torch.complex64) / 3
        self.as_real = as_real
        if as_real:
            self.mix_real, self.mix_imag = torch.nn.Parameter(mix.real.clone()), torch.nn.Parameter(mix.imag.clone())
        else:
            self.mix = torch.nn.Parameter(mix)
        self.head = torch.nn.Linear(8, LABELS)

    def weight(self) -> torch.Tensor:
        return torch.complex(self.mix_real, self.mix_imag) if self.as_real else self.mix

    def forward(self, input_ids, labels):
        logits = self.head((self.embedding(input_ids).mean(1).to(torch.complex64) @ self.weight()).abs())
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize(
    "overrides",
    [
        {"sam_method": "sam"},
        {"sam_method": "gsam", "gsam_alpha": 0.5, "sam_rho": 0.5},
        {"sam_method": "looksam", "looksam_alpha": 0.7, "sam_rho": 0.5, "max_steps": 6},
        {"sam_method": "none", "weight_ema_decay": 0.9},
    ],
)
def test_a_complex_weight_trains_as_its_real_and_imaginary_parts(tmp_path, overrides):
    # The loss sees the same weight either way and PyTorch's gradient of a complex weight is that of its two parts, so
    # SAM, its descent transforms and the weight average must not tell them apart. GSAM's and LookSAM's inner
    # products took the real parts alone (weights 0.003 and 0.055 apart), and the float32 weight average dropped the
    # imaginary part of the model it left after training.
    weights = []
    for as_real in (False, True):
        model = ComplexMix(as_real)
        trainer = SequentialSAMTrainer(model=model, args=sam_args(tmp_path / str(as_real), **overrides),
                                       train_dataset=tiny_dataset(),
                                       optimizers=(torch.optim.SGD(model.parameters(), lr=0.5), None))  # fmt: skip
        trainer.train()
        weights.append(trainer.model.weight().detach())
    assert weights[0].imag.abs().max() > 0.1
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- features


class _UnfreezeTheClassifierAtStep2(TrainerCallback):
    """Gradual unfreezing: the head is frozen at the start and trains from step 2 on."""

    def on_step_begin(self, args, state_, control, model=None, **kwargs):
        if state_.global_step >= 2:  # also after a resume past step 2, as a gradual-unfreezing schedule does
            model.classifier.requires_grad_(True)


@pytest.mark.parametrize(("accumulation", "ga"), [("window", 1), ("window", 2), ("micro", 2)])
def test_a_parameter_unfrozen_during_training_gets_the_descent_gradient_alone(tmp_path, accumulation, ga):
    # The parameters the step handles were listed at the first step: one unfrozen later kept its clean gradient
    # under the descent gradient added to it, so at rho 0 it moved twice as far as under the plain Trainer.
    runs = []
    for trainer_cls, make_args in ((SequentialTrainer, plain_args), (SequentialSAMTrainer, sam_args)):
        model = tiny_bert()
        model.classifier.requires_grad_(False)
        extra = {"sam_rho": 0.0, "sam_accumulation": accumulation} if trainer_cls is SequentialSAMTrainer else {}
        trainer = trainer_cls(
            model=model,
            args=make_args(tmp_path / str(len(runs)), gradient_accumulation_steps=ga, per_device_train_batch_size=2,
                           **extra),
            train_dataset=tiny_dataset(),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),  # every parameter, frozen or not
            callbacks=[_UnfreezeTheClassifierAtStep2()],
        )  # fmt: skip
        trainer.train()
        runs.append(state(trainer.model))
    assert not torch.equal(runs[0]["classifier.weight"], tiny_bert().classifier.weight)  # it did train
    assert_same_weights(*runs, exact=False)


def test_a_resume_after_a_callback_unfroze_parameters_equals_the_uninterrupted_run(tmp_path):
    # The state file recorded the trainable set at save time (classifier unfrozen: 41 tensors) as the perturbed set,
    # but the run perturbed the 39 chosen at its first step, which its state (F-SAM's average) covers: restarting the
    # same script was refused as "written for another perturbed set".
    def run(resume=None, **extra):
        model = tiny_bert()
        model.classifier.requires_grad_(False)
        trainer = SAMTrainer(
            model=model,
            args=sam_args(tmp_path, sam_method="fsam", max_steps=4, **extra),
            train_dataset=tiny_dataset(),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),  # every parameter, frozen or not
            callbacks=[_UnfreezeTheClassifierAtStep2()],
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(save_strategy="steps", save_steps=3)
    resumed = run(resume=str(tmp_path / "checkpoint-3"))
    assert_same_weights(state(straight.model), state(resumed.model))


def _run_trial(trainer, trial: dict, monkeypatch) -> None:
    """`train(trial=...)` as `hyperparameter_search` calls it with a dict trial (Ray Tune or W&B), which Trainer sets
    on the arguments in `_hp_search_setup`; neither backend is installed, so their two lookups are stood in for."""
    from transformers.trainer_utils import HPSearchBackend

    monkeypatch.setattr("transformers.integrations.hp_params", dict)
    monkeypatch.setattr(trainer, "_get_output_dir", lambda trial: trainer.args.output_dir, raising=False)
    trainer.hp_search_backend = HPSearchBackend.WANDB
    trainer.train(trial=trial)


def test_a_hyperparameter_search_trial_resolves_the_sam_fields_again(tmp_path, monkeypatch):
    # Trainer sets a trial's values with setattr, after the preset was resolved: a searched radius left sam_rho_min at
    # the old one, which turned GSAM's schedule on (the radius shrank with the learning rate: 0.1, 0.0875, ...).
    args = sam_args(tmp_path, sam_method="sam", lr_scheduler_type="linear")
    trainer = SAMTrainer(model_init=lambda: tiny_bert(), args=args, train_dataset=tiny_dataset())
    for rho in (0.1, 0.02):
        _run_trial(trainer, {"sam_rho": rho}, monkeypatch)
        assert rho_min(trainer.args) == rho  # unset: the radius itself, a constant
        assert [h["sam/rho"] for h in trainer.state.log_history if "sam/rho" in h] == [rho] * 4
    _run_trial(trainer, {"sam_method": "asam"}, monkeypatch)  # the trial's method with its own preset
    assert trainer.args.sam_ascent == "adaptive" and trainer.args.sam_rho == 0.02  # the earlier trial's radius stays
    with pytest.raises(ValueError, match="sam_rho"):
        _run_trial(trainer, {"sam_rho": -1.0}, monkeypatch)
    with pytest.raises(ValueError, match="one kind of method"):
        _run_trial(trainer, {"weight_ema_decay": 0.9}, monkeypatch)  # its callback was not added at construction
    assert trainer.args.sam_method == "asam" and trainer.args.sam_rho == 0.02  # the last good trial's


def test_a_hyperparameter_search_trial_is_checked_as_the_trainer_was_built(tmp_path, monkeypatch):
    # Only the trial's sam_* fields were checked again: a searched gradient_accumulation_steps let Stable SAM's
    # whole-window rescale run in micro mode, which skips it (the trial trained exactly as plain SAM), and the
    # checks __init__ and train() made of the model, the launcher and the data were skipped: a searched sam_include
    # matching nothing trained at twice the cost with nothing perturbed (sam/eps_norm 0), a searched ssam-f on an
    # iterable training set failed with "object of type 'IterableDataset' has no len()".
    args = sam_args(tmp_path, sam_method="stable-sam", sam_accumulation="micro", max_steps=2)
    trainer = SAMTrainer(model_init=lambda: tiny_bert(), args=args, train_dataset=tiny_dataset(16))
    with pytest.raises(ValueError, match="use --sam_accumulation window"):
        _run_trial(trainer, {"gradient_accumulation_steps": 2}, monkeypatch)
    assert trainer.args.gradient_accumulation_steps == 1  # the last good trial's
    with pytest.raises(ValueError, match="No trainable parameter matches sam_include='nothing'"):
        _run_trial(trainer, {"sam_include": "nothing"}, monkeypatch)
    assert trainer.args.sam_include is None
    iterable = tiny_dataset(16).to_iterable_dataset()
    trainer = SAMTrainer(model_init=lambda: tiny_bert(), args=sam_args(tmp_path, max_steps=2), train_dataset=iterable)
    with pytest.raises(ValueError, match="needs a map-style train_dataset"):
        _run_trial(trainer, {"sam_method": "ssam-f"}, monkeypatch)
    assert trainer.args.sam_method == "sam" and trainer.args.sam_mask == "none"


def test_adasam_takes_the_learning_rate_of_a_hyperparameter_search_trial(tmp_path, monkeypatch):
    # AdaSAM's optimizer kwargs were read from the arguments once, when the trainer was built: a searched
    # learning_rate (the usual search) left every trial at the first one.
    args = sam_args(tmp_path, sam_method="adasam", max_steps=2, learning_rate=0.05)
    trainer = SAMTrainer(model_init=lambda: tiny_bert(), args=args, train_dataset=tiny_dataset())
    _run_trial(trainer, {"learning_rate": 1e-4, "adam_beta1": 0.5}, monkeypatch)
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer.optimizer, AdaSAMOptimizer)
    assert group["initial_lr"] == 1e-4 and group["betas"] == (0.5, 0.999)
    assert [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h] == [1e-4, 1e-4]


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's inductor needs a C++ compiler on CPU")
def test_torch_compile_replays_the_compiled_dropout_and_rho_0_equals_the_compiled_trainer(tmp_path):
    # Inductor draws its own dropout masks from seeds it takes from the torch generator: replaying the generator
    # state must give the descent pass the clean pass's masks, or rho 0 would not be the plain step.
    runs = {}
    for method in ("none", "sam"):
        runs[method] = train_sam(
            tmp_path / method, tiny_bert(dropout=0.1), tiny_dataset(), max_steps=2, torch_compile=True,
            sam_method=method, sam_rho=0.0,
        )  # fmt: skip
    assert_same_weights(state(runs["none"].model), state(runs["sam"].model))
    assert [h["sam/sharpness"] for h in runs["sam"].state.log_history if "sam/sharpness" in h] == [0.0, 0.0]


@pytest.mark.parametrize("method", SAM_CASES)
def test_lora_perturbs_and_updates_only_adapters(tmp_path, method):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"])
    )
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = train_sam(
        tmp_path,
        model,
        tiny_dataset(),
        optimizer_for(method, "adamw"),
        trainer_cls=RestoreCheckingTrainer,
        **METHOD_CASES[method]["args"],
    )
    if not loss_term(method):
        perturbed = {id(p) for p in trainer._sam.perturbation.params}
        assert perturbed == {id(p) for p in model.parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    assert any(
        "lora_" in n and not torch.equal(p, trainable_before[n])
        for n, p in model.named_parameters()
        if p.requires_grad
    )
    assert (trainer.restores >= 1 or loss_term(method)) and trainer.moved == trainer.restores


def test_include_exclude_select_the_perturbed_set(tmp_path):
    trainer = train_sam(
        tmp_path, tiny_bert(), tiny_dataset(), max_steps=1, sam_include=r"LayerNorm", sam_exclude=r"bias$"
    )
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    selected = [names[id(p)] for p in trainer._sam.perturbation.params]
    assert selected and all("LayerNorm.weight" in n for n in selected)


# A tied weight is one tensor under two names (GPT-2's `lm_head.weight` is `transformer.wte.weight`), and
# `named_parameters()` lists it once, under the name of the module registered first. Matched on that name alone,
# `--sam_exclude lm_head` left the LM head perturbed without a word, and `--sam_include lm_head` was refused as
# matching nothing.
def test_include_exclude_match_every_name_of_a_tied_weight(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def model():
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=0,
                            eos_token_id=0)  # fmt: skip
        return GPT2LMHeadModel(config)

    data = tiny_dataset()
    data = data.remove_columns("labels").add_column("labels", data["input_ids"])
    excluded = train_sam(tmp_path / "e", model(), data, max_steps=1, sam_exclude=r"^lm_head\.")
    tied = excluded.model.lm_head.weight
    assert tied is excluded.model.transformer.wte.weight
    assert excluded._sam.perturbation.params and all(p is not tied for p in excluded._sam.perturbation.params)
    seen = {}

    class Watching(SequentialSAMTrainer):  # the tied weight at w, its clean gradient, at w + eps, and after restore
        def _sam_ascend(self, grad_factor):
            seen["w"], seen["g"] = self.model.lm_head.weight.detach().clone(), self.model.lm_head.weight.grad.clone()
            super()._sam_ascend(grad_factor)
            seen["w + eps"] = self.model.lm_head.weight.detach().clone()

        def _sam_record_losses(self, *args, **kwargs):
            seen["restored"] = self.model.lm_head.weight.detach().clone()
            super()._sam_record_losses(*args, **kwargs)

    included = train_sam(tmp_path / "i", model(), data, max_steps=1, trainer_cls=Watching, sam_include=r"^lm_head\.")
    assert [p is included.model.lm_head.weight for p in included._sam.perturbation.params] == [True]
    # Perturbed once (eps = rho g / ||g||, not twice through its two names) and put back bit for bit.
    eps = seen["w + eps"] - seen["w"]
    torch.testing.assert_close(eps, 0.05 * seen["g"] / seen["g"].norm(), atol=1e-7, rtol=1e-4)
    assert torch.equal(seen["restored"], seen["w"])


@pytest.mark.parametrize("method", ["sam", "asam", "momentum-sam"])
def test_a_parameter_the_optimizer_does_not_hold_is_not_perturbed(tmp_path, method):
    # An optimizer built over the head alone (`optimizers=(opt, None)`) trains nothing else: the rest of the model,
    # though it requires grad, is as constant as a frozen one and must not be perturbed either. It was: the head's
    # weights after these 4 `sam` steps differed by 0.0064 from those of the same run with the rest frozen.
    def run(folder, freeze):
        model = tiny_bert()
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier") or not freeze)
        head = [p for name, p in model.named_parameters() if name.startswith("classifier")]
        optimizer = torch.optim.SGD(head, lr=0.05, momentum=0.9)
        trainer = SequentialSAMTrainer(model=model, args=sam_args(tmp_path / folder, sam_method=method),
                                       train_dataset=tiny_dataset(), optimizers=(optimizer, None))  # fmt: skip
        trainer.train()
        return trainer

    held, frozen = run("held", freeze=False), run("frozen", freeze=True)
    assert_same_weights(state(held.model), state(frozen.model))
    assert [id(p) for p in held._sam.perturbation.params] == [id(p) for p in held.model.classifier.parameters()]


def test_an_optimizer_holding_no_parameter_of_the_perturbed_set_is_refused(tmp_path):
    model = tiny_bert()
    optimizer = torch.optim.SGD(model.classifier.parameters(), lr=0.05)
    trainer = SequentialSAMTrainer(model=model, args=sam_args(tmp_path, sam_include="LayerNorm"),
                                   train_dataset=tiny_dataset(), optimizers=(optimizer, None))  # fmt: skip
    before = state(model)
    with pytest.raises(ValueError, match="optimizer holds none"):
        trainer.train()
    assert_same_weights(before, state(trainer.model))


@pytest.mark.parametrize("method", ["sam", "gsam", "stable-sam"])
def test_a_perturbed_set_without_gradients_in_a_step_leaves_it_plain(tmp_path, method):
    # sam_include on a head (or tower) that a batch does not use: no gradient to ascend along, so eps = 0. The
    # ascent rules' and descent transforms' foreach ops raised on the empty list instead.
    def model():
        m = tiny_bert()
        m.unused_head = torch.nn.Linear(16, LABELS)
        return m

    data = tiny_dataset()
    sam = train_sam(tmp_path / "s", model(), data, "sgd", sam_method=method, sam_include="unused_head")
    plain = train_sam(tmp_path / "p", model(), data, "sgd", sam_method="none")
    assert_same_weights(state(plain.model), state(sam.model))


def test_gradient_checkpointing_gives_the_same_sam_steps(tmp_path):
    data = tiny_dataset()
    gc = train_sam(tmp_path / "gc", tiny_bert(), data, "adamw", gradient_checkpointing=True)
    ref = train_sam(tmp_path / "no", tiny_bert(), data, "adamw")
    assert_same_weights(state(gc.model), state(ref.model), exact=False, atol=ATOL["adamw"])


def tiny_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    return ResNetForImageClassification(config)


def image_dataset(n=16):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict(
        {
            "pixel_values": torch.randn(n, 3, 16, 16, generator=generator).tolist(),
            "labels": torch.randint(0, 3, (n,), generator=generator).tolist(),
        }
    )


def bn_stats(model):
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n}


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_stats_are_those_of_the_clean_pass(tmp_path, momentum):
    data = image_dataset()

    def model():
        m = tiny_resnet()
        for layer in m.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.momentum = momentum
        return m

    sam = train_sam(tmp_path / "s", model(), data, "sgd", max_steps=2)
    plain = train_sam(tmp_path / "p", model(), data, "sgd", max_steps=1, sam_method="none")
    sam_one = train_sam(tmp_path / "o", model(), data, "sgd", max_steps=1)
    for name, value in bn_stats(plain.model).items():
        assert torch.equal(value, bn_stats(sam_one.model)[name]), name
    unfrozen = train_sam(tmp_path / "u", model(), data, "sgd", max_steps=1, sam_freeze_bn_stats=False)
    assert any(not torch.equal(v, bn_stats(unfrozen.model)[n]) for n, v in bn_stats(plain.model).items())
    assert all(torch.isfinite(v.float()).all() for v in bn_stats(sam.model).values())


def test_same_dropout_replays_masks(tmp_path):
    # rho = 0 makes both passes see the same weights: equal to Trainer iff both draw the same dropout masks.
    data = tiny_dataset()
    plain = train_plain(tmp_path / "p", tiny_bert(dropout=0.3), data, "sgd")
    same = train_sam(tmp_path / "s", tiny_bert(dropout=0.3), data, "sgd", sam_rho=0.0)
    fresh = train_sam(tmp_path / "f", tiny_bert(dropout=0.3), data, "sgd", sam_rho=0.0, sam_same_dropout=False)
    assert_same_weights(state(plain.model), state(same.model))
    assert any(not torch.equal(a, b) for a, b in zip(state(plain.model).values(), state(fresh.model).values()))


# ---------------------------------------------------------------- logging


def test_sam_metrics_are_logged(tmp_path):
    trainer = train_sam(tmp_path, tiny_bert(), tiny_dataset(), "sgd", logging_steps=2)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for entry in logs:
        for key in (
            "sam/rho",
            "sam/grad_norm",
            "sam/perturbed_loss",
            "sam/sharpness",
            "sam/passes_per_step",
            "sam/skipped",
            "sam/sam_step_fraction",
        ):
            assert math.isfinite(entry[key]), key
        assert entry["sam/rho"] == 0.05 and entry["sam/passes_per_step"] == 2.0 and entry["sam/skipped"] == 0.0
        assert entry["sam/grad_norm"] > 0
        assert math.isclose(entry["sam/eps_norm"], 0.05, rel_tol=1e-5)  # SAM's eps has norm rho
        # sharpness is perturbed minus clean loss, on the same per-step scale as Trainer's `loss`.
        assert abs(entry["sam/perturbed_loss"] - entry["sam/sharpness"] - entry["loss"]) < 1e-4


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"sam_method": "esam"}, 0.03 / 0.6),  # SWP: rho / beta on the kept tensors
        ({"sam_method": "ssam-d", "sam_sparsity": 0.0}, 0.07071),  # a full mask leaves the norm whole
        ({"sam_method": "ssam-d"}, None),  # a random half of the entries: shorter (rho / sqrt(2) in expectation)
    ],
)
def test_logged_eps_norm_is_the_perturbation_applied(tmp_path, overrides, expected):
    trainer = train_sam(tmp_path, tiny_bert(), tiny_dataset(), "sgd", logging_steps=1, max_steps=3, **overrides)
    norms = [h["sam/eps_norm"] for h in trainer.state.log_history if "sam/eps_norm" in h]
    assert len(norms) == 3
    rho = trainer.args.sam_rho
    for norm in norms:
        if expected is not None:
            assert math.isclose(norm, expected, rel_tol=1e-5), norms
        else:
            assert 0 < norm < 0.9 * rho, norms


def test_small_logged_values_keep_their_significant_digits(tmp_path):
    # Every logged mean was rounded to 6 decimals: at sam_rho=3e-7, sam/rho and sam/eps_norm were logged as 0.0.
    trainer = train_sam(tmp_path, tiny_bert(), tiny_dataset(), "sgd", sam_rho=3e-7, max_steps=2)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for entry in logs:
        assert entry["sam/rho"] == 3e-7  # to 7 significant digits, the float32 mean reads as the radius given
        assert entry["sam/eps_norm"] == pytest.approx(3e-7, rel=1e-5)
        assert entry["sam/passes_per_step"] == 2.0


def test_metrics_of_plain_steps_alone_are_reduced_on_the_training_device(tmp_path, monkeypatch):
    # A logging window of plain steps (late-sam's first 87.5%, ss-sam's plain draws) holds host floats alone. They
    # were stacked on the CPU for the sum over ranks, which NCCL's process group refuses ("No backend type associated
    # with device type cpu"): multi-GPU late-sam failed at its first log.
    import hf_sam.mixin
    from hf_sam.metrics import SAMMetrics

    windows = []

    class Recording(SAMMetrics):
        def log_values(self, *args, **kwargs):
            windows.append((kwargs.get("device"), [isinstance(v, torch.Tensor) for v in self._sums.values()]))
            return super().log_values(*args, **kwargs)

    monkeypatch.setattr(hf_sam.mixin, "SAMMetrics", Recording)
    trainer = train_sam(tmp_path, tiny_bert(), tiny_dataset(), sam_method="late-sam", max_steps=4)
    assert windows == [(trainer.accelerator.device, [False, False])] * 4  # every step plain, every sample a float
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [sorted(k for k in h if k.startswith("sam/")) for h in logs] == [
        ["sam/passes_per_step", "sam/sam_step_fraction"]
    ] * 4  # nothing that only a SAM step measures
    # What the sum over ranks gets: the stacked sums and counts on that device, whatever the samples were.
    devices = []

    def two_ranks(stacked):
        devices.append(stacked.device)
        return torch.tensor([[2.0, 0.0], [2.0, 2.0]])  # each of two ranks: passes 1.0 and fraction 0.0, one sample

    metrics = SAMMetrics()
    metrics.add("sam/sam_step_fraction", 0.0)
    metrics.add("sam/passes_per_step", 1.0)
    meta = torch.device("meta")
    assert metrics.log_values(two_ranks, device=meta) == {"sam/passes_per_step": 1.0, "sam/sam_step_fraction": 0.0}
    assert devices == [meta]


class LossRecordingTrainer(SequentialSAMTrainer):
    """Records every micro-batch's clean and perturbed loss as the step hands them to the metrics."""

    def _sam_record_losses(self, clean, perturbed, index, window_size, dropped=False):
        self.recorded.append((clean.detach().clone(), perturbed.detach().clone()))
        return super()._sam_record_losses(clean, perturbed, index, window_size, dropped)


@pytest.mark.parametrize("overrides", [{}, {"sam_accumulation": "micro"}, {"sam_method": "msam"}])
def test_logged_losses_of_bf16_weights_are_summed_in_float32_as_trainer_sums_its_loss(tmp_path, overrides):
    # A bf16 model returns bf16 losses. Summed over a window of 8 in bf16, each addition was rounded (to 0.0078 near
    # 1): sam/perturbed_loss was logged as 1.125 and sam/sharpness as 0.031 where the micro-batches' own losses gave
    # 1.133 and 0.037, while Trainer sums its `loss` in float32.
    trainer = LossRecordingTrainer(
        model=tiny_bert().to(torch.bfloat16), train_dataset=tiny_dataset(16),
        args=sam_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=8, max_steps=2,
                      **overrides),
    )  # fmt: skip
    trainer.recorded = []
    trainer.train()
    logs = [h for h in trainer.state.log_history if "sam/sharpness" in h]
    assert len(logs) == 2 and len(trainer.recorded) == 16
    for step, entry in enumerate(logs):
        window = trainer.recorded[8 * step : 8 * step + 8]
        clean = torch.stack([c.float() for c, _ in window]).double().sum()
        perturbed = torch.stack([p.float() for _, p in window]).double().sum()
        assert math.isclose(entry["loss"], clean.item(), rel_tol=1e-6)  # Trainer's own float32 sum
        assert math.isclose(entry["sam/perturbed_loss"], perturbed.item(), rel_tol=1e-6)
        assert math.isclose(entry["sam/sharpness"], (perturbed - clean).item(), rel_tol=1e-4, abs_tol=1e-6)


def test_esam_swp_under_torch_compile_warns_of_recompiles(tmp_path):
    from transformers.testing_utils import CaptureLogger

    from hf_sam import setup_checks

    for swp, warned in ((True, True), (False, False)):
        with CaptureLogger(setup_checks.logger) as captured:
            args = sam_args(tmp_path, sam_method="esam", esam_swp=swp, torch_compile=True)
            SAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
        assert ("recompiles" in captured.out) == warned


# ---------------------------------------------------------------- faults: an aborted SAM step leaves w as it was


class FaultyTrainer(SequentialSAMTrainer):
    """Raises `fault` from the `fault_at`-th perturbed pass (from 1) of optimizer step `fault_step` (w + eps then)."""

    def __init__(self, *args, fault, fault_step, fault_at, **kwargs):
        super().__init__(*args, **kwargs)
        self.fault, self.fault_step, self.fault_at, self.perturbed_passes = fault, fault_step, fault_at, 0

    def _sam_perturbed_pass(self, *args, **kwargs):
        if self.state.global_step == self.fault_step:
            self.perturbed_passes += 1
        if self.perturbed_passes == self.fault_at:
            self.perturbed_passes = -(10**9)  # once (a retried loop runs through)
            assert self._sam.perturbation.active  # the fault lands while w + eps is in the model
            raise self.fault
        return super()._sam_perturbed_pass(*args, **kwargs)


class WeightsAtStepBegin(TrainerCallback):
    """Snapshots the weights at the start of every optimizer step and of every training loop."""

    def __init__(self):
        self.step_begin, self.train_begin = None, []

    def on_step_begin(self, args, state_, control, model=None, **kwargs):
        self.step_begin = state(model)

    def on_train_begin(self, args, state_, control, model=None, **kwargs):
        self.train_begin.append(state(model))


# (method, GA, accumulation overrides, which perturbed pass of step 1 fails): with GA 2 or mSAM's shards the
# second, when the first one's descent gradient is already in .grad.
FAULT_CASES = [
    ("sam", 1, {}, 1),
    ("sam", 2, {}, 2),
    ("sam", 2, {"sam_accumulation": "micro"}, 2),
    ("msam", 1, {}, 2),
    ("esam", 1, {}, 1),
    ("gsam", 1, {}, 1),
]


@pytest.mark.parametrize("method, ga, extra, fault_at", FAULT_CASES)
def test_an_interrupted_sam_step_restores_the_weights_bit_exactly(tmp_path, method, ga, extra, fault_at):
    snapshots = WeightsAtStepBegin()
    trainer = FaultyTrainer(
        model=tiny_bert(dropout=0.1),
        args=sam_args(
            tmp_path,
            gradient_accumulation_steps=ga,
            per_device_train_batch_size=4 // ga,
            **{**METHOD_CASES[method]["args"], **extra},
        ),
        train_dataset=tiny_dataset(),
        callbacks=[snapshots],
        fault=KeyboardInterrupt(),
        fault_step=1,
        fault_at=fault_at,
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.state.global_step == 1  # the fault hit the second optimizer step
    assert not trainer._sam.perturbation.active
    assert_same_weights(snapshots.step_begin, state(trainer.model))
    assert all(p.grad is None for p in trainer.model.parameters())


class InterruptBetweenMicroBatches(TrainerCallback):
    """Ctrl-C in the Trainer's loop after the first micro-batch of the second window (w + eps is in the model)."""

    def on_substep_end(self, args, state_, control, **kwargs):
        if state_.global_step == 1:
            raise KeyboardInterrupt


def test_an_interrupt_between_two_micro_batches_of_a_window_restores_the_weights(tmp_path):
    snapshots = WeightsAtStepBegin()
    trainer = SequentialSAMTrainer(
        model=tiny_bert(dropout=0.1),
        args=sam_args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2),
        train_dataset=tiny_dataset(),
        callbacks=[snapshots, InterruptBetweenMicroBatches()],
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not trainer._sam.perturbation.active
    assert_same_weights(snapshots.step_begin, state(trainer.model))


def test_auto_find_batch_size_retries_an_out_of_memory_sam_step_from_the_unperturbed_weights(tmp_path):
    # accelerate's retry catches this message (a CPU allocation failure), shrinks the batch and reruns the loop.
    snapshots = WeightsAtStepBegin()
    trainer = FaultyTrainer(
        model=tiny_bert(),
        args=sam_args(tmp_path, auto_find_batch_size=True, per_device_train_batch_size=4, max_steps=2),
        train_dataset=tiny_dataset(),
        callbacks=[snapshots],
        fault=RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes."),
        fault_step=0,
        fault_at=1,
    )
    initial = state(trainer.model)
    trainer.train()
    assert trainer._train_batch_size < 4 and trainer.state.global_step == 2  # accelerate retried at 90%
    assert len(snapshots.train_begin) == 2
    assert_same_weights(initial, snapshots.train_begin[1])  # the retry starts from w, not w + eps


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("method", SAM_CASES)
def test_resume_matches_uninterrupted_run(tmp_path, method):
    data = tiny_dataset(48)
    common = dict(
        max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=2, **METHOD_CASES[method]["args"]
    )
    straight = train_sam(tmp_path / "a", tiny_bert(dropout=0.1), data, trainer_cls=SAMTrainer, **common)
    first = SAMTrainer(
        model=tiny_bert(dropout=0.1),
        args=sam_args(tmp_path / "b", save_strategy="steps", save_steps=3, **common),
        train_dataset=data,
    )
    first.train()
    resumed = SAMTrainer(model=tiny_bert(dropout=0.1), args=sam_args(tmp_path / "b", **common), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert_same_weights(state(straight.model), state(resumed.model))


def test_resume_without_or_with_foreign_state_is_a_clear_error(tmp_path):
    data = tiny_dataset()
    first = SAMTrainer(
        model=tiny_bert(),
        args=sam_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=2),
        train_dataset=data,
    )
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    other = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, max_steps=4, sam_method="asam"), train_dataset=data)
    with pytest.raises(ValueError, match="sam_method='sam'"):
        other.train(resume_from_checkpoint=str(checkpoint))
    (checkpoint / "sam_state.safetensors").unlink()
    again = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, max_steps=4), train_dataset=data)
    with pytest.raises(ValueError, match="sam_state.safetensors"):
        again.train(resume_from_checkpoint=str(checkpoint))


def test_resume_from_checkpoint_true_skips_a_checkpoint_cut_off_while_saving(tmp_path):
    # Trainer's `get_last_checkpoint` took the newest folder: its weights were loaded into the model, then reading its
    # trainer_state.json (written last) failed with a FileNotFoundError.
    data = tiny_dataset()
    straight = train_sam(tmp_path / "a", tiny_bert(), data, trainer_cls=SAMTrainer, max_steps=6)
    saving = dict(max_steps=4, save_strategy="steps", save_steps=2)
    SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path / "b", **saving), train_dataset=data).train()
    (tmp_path / "b" / "checkpoint-4" / "trainer_state.json").unlink()  # a save cut off before its last file
    resumed = SAMTrainer(model=tiny_bert(1), args=sam_args(tmp_path / "b", max_steps=6), train_dataset=data)
    resumed.train(resume_from_checkpoint=True)
    assert_same_weights(state(straight.model), state(resumed.model))
    (tmp_path / "b" / "checkpoint-2" / "trainer_state.json").unlink()
    none_whole = SAMTrainer(model=tiny_bert(1), args=sam_args(tmp_path / "b", max_steps=6), train_dataset=data)
    before = state(none_whole.model)
    with pytest.raises(ValueError, match="found no complete checkpoint"):
        none_whole.train(resume_from_checkpoint=True)
    assert_same_weights(before, state(none_whole.model))


@pytest.mark.parametrize("other", ["sam", "none"])
def test_resuming_adasam_with_another_method_is_refused_before_its_optimizer_state_is_read(tmp_path, other):
    # optimizer.pt holds AdaSAMOptimizer's state: torch's AdamW fails on it with a bare KeyError('step'), before
    # hf_sam's own check of the state file's method would have said what is wrong.
    data = tiny_dataset()
    saving = dict(save_strategy="steps", save_steps=2, max_steps=2, sam_method="adasam")
    SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, **saving), train_dataset=data).train()
    resumed = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, max_steps=4, sam_method=other), train_dataset=data)
    with pytest.raises(ValueError, match="sam_method='adasam'.*AdaSAMOptimizer"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


# ---------------------------------------------------------------- Seq2Seq


def tiny_t5(dropout: float = 0.1):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=40,
        d_model=16,
        d_kv=8,
        d_ff=24,
        num_layers=1,
        num_heads=2,
        dropout_rate=dropout,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


def test_seq2seq_rho_zero_equals_seq2seq_trainer(tmp_path):
    from datasets import Dataset
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from hf_sam import SAMSeq2SeqTrainer, SAMSeq2SeqTrainingArguments

    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {
            "input_ids": torch.randint(2, 40, (16, 6), generator=generator).tolist(),
            "labels": torch.randint(2, 40, (16, 4), generator=generator).tolist(),
        }
    )
    common = dict(
        report_to="none",
        use_cpu=True,
        max_steps=3,
        per_device_train_batch_size=4,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        gradient_accumulation_steps=2,
        logging_steps=1,
    )
    plain = Seq2SeqTrainer(
        model=tiny_t5(), args=Seq2SeqTrainingArguments(output_dir=str(tmp_path / "p"), **common), train_dataset=data
    )
    plain.train()
    sam = SAMSeq2SeqTrainer(
        model=tiny_t5(),
        train_dataset=data,
        args=SAMSeq2SeqTrainingArguments(output_dir=str(tmp_path / "s"), sam_method="sam", sam_rho=0.0, **common),
    )
    sam.train()
    assert_same_weights(state(plain.model), state(sam.model))
    real = SAMSeq2SeqTrainer(
        model=tiny_t5(),
        train_dataset=data,
        args=SAMSeq2SeqTrainingArguments(output_dir=str(tmp_path / "r"), sam_method="sam", **common),
    )
    real.train()
    assert any(not torch.equal(a, b) for a, b in zip(state(plain.model).values(), state(real.model).values()))
    assert any("sam/sharpness" in h for h in real.state.log_history)


# ---------------------------------------------------------------- method-specific properties


class PassCountingTrainer(SequentialSAMTrainer):
    """Counts forward passes of the model (one per pass: clean, perturbed or plain)."""

    forwards = 0

    def compute_loss(self, *args, **kwargs):
        PassCountingTrainer.forwards += 1
        return super().compute_loss(*args, **kwargs)


@pytest.mark.parametrize("method, extra", [("ss-sam", {}), ("looksam", {"looksam_k": 4})])
def test_plain_steps_run_one_pass(tmp_path, method, extra):
    PassCountingTrainer.forwards = 0
    steps = 12
    trainer = train_sam(tmp_path, tiny_bert(), tiny_dataset(48), "sgd", trainer_cls=PassCountingTrainer,
                        max_steps=steps, logging_steps=steps, sam_method=method, **extra)  # fmt: skip
    log = next(h for h in trainer.state.log_history if "sam/sam_step_fraction" in h)
    sam_steps = round(log["sam/sam_step_fraction"] * steps)
    assert 0 < sam_steps < steps
    assert PassCountingTrainer.forwards == steps + sam_steps  # SAM steps 2 passes, the others exactly 1
    assert math.isclose(log["sam/passes_per_step"], 1 + sam_steps / steps, rel_tol=1e-6)
    if method == "looksam":
        assert sam_steps == 3  # steps 0, 4, 8


@pytest.mark.parametrize(
    "method, extra",
    [("none", {}), ("sam", {}), ("ss-sam", {}), ("esam", {}), ("esam", {"esam_gamma": 0.5}), ("mesa", {})],
)
def test_total_flos_counts_the_passes_that_ran(tmp_path, method, extra):
    # Trainer adds one forward+backward per micro-batch to `state.total_flos` after `training_step`: a SAM step's two
    # passes were counted as one (3,283,200 for `sam` here, the plain Trainer's count).
    plain = train_plain(tmp_path / "p", tiny_bert(), tiny_dataset(), "sgd")
    trainer = train_sam(tmp_path / "s", tiny_bert(), tiny_dataset(), "sgd", sam_method=method, **extra)
    passes = [h["sam/passes_per_step"] for h in trainer.state.log_history if "loss" in h and method != "none"]
    # One micro-batch per step: the mean of the logged passes is the run's (ss-sam mixes plain steps and SAM steps).
    mean_passes = sum(passes) / len(passes) if passes else 1.0
    assert method != "sam" or mean_passes == 2.0
    assert trainer.state.total_flos == pytest.approx(plain.state.total_flos * mean_passes, rel=1e-6)


def test_total_flos_counts_the_fisher_passes_of_ssam_f(tmp_path):
    plain = train_plain(tmp_path / "p", tiny_bert(), tiny_dataset(), "sgd")
    trainer = train_sam(tmp_path / "s", tiny_bert(), tiny_dataset(), "sgd", sam_method="ssam-f", sam_fisher_samples=6)
    per_example = plain.state.total_flos / (4 * 4)  # 4 steps of 4 examples of one length
    # Two passes per micro-batch, and one refresh (at the first step) of 6 one-example forward+backward passes.
    assert trainer.state.total_flos == pytest.approx(2 * plain.state.total_flos + 6 * per_example, rel=1e-6)


def test_looksam_preset_is_sam_every_k_steps_and_keeps_no_copy(tmp_path):
    # Its default alpha 0 reuses nothing (docs/methods.md#looksam): bit for bit SAM on every k-th step with the radius
    # grown to 0.1 over the run, no g_v held.
    look = train_sam(tmp_path / "l", tiny_bert(), tiny_dataset(), "adamw", max_steps=6, sam_method="looksam",
                     looksam_k=2, logging_steps=1)  # fmt: skip
    every_k = train_sam(tmp_path / "s", tiny_bert(), tiny_dataset(), "adamw", max_steps=6, sam_method="sam",
                        sam_rho=0.1, sam_rho_warmup=1.0, sam_schedule="every_k", sam_interval=2)  # fmt: skip
    assert_same_weights(state(look.model), state(every_k.model))
    assert look._sam.state_dict() == {}
    rhos = [h["sam/rho"] for h in look.state.log_history if "sam/rho" in h]
    assert rhos == pytest.approx([0.1 * (t + 1) / 6 for t in (0, 2, 4)], rel=1e-4)  # the SAM steps (rounded logs)
    reuse = train_sam(tmp_path / "r", tiny_bert(), tiny_dataset(), "adamw", max_steps=6, sam_method="looksam",
                      looksam_k=2, looksam_alpha=0.7)  # fmt: skip
    assert reuse._sam.state_dict() and any(
        not torch.equal(a, b) for a, b in zip(state(reuse.model).values(), state(look.model).values())
    )


class CleanCopyRecordingTrainer(SequentialSAMTrainer):
    """Records, at each ascent, whether the step holds a copy of the clean gradient g for a descent transform."""

    def _sam_ascend(self, grad_factor):
        self.clean_copies = getattr(self, "clean_copies", []) + [self._sam.descent.clean_copy is not None]
        return super()._sam_ascend(grad_factor)


@pytest.mark.parametrize("method, weight", [("looksam", "looksam_alpha"), ("gsam", "gsam_alpha")])
def test_a_descent_transform_at_weight_zero_copies_no_clean_gradient(tmp_path, method, weight):
    # LookSAM's preset (alpha 0) and GSAM at alpha 0 leave g~ as it is: a copy of g per SAM step (one parameter-sized
    # buffer, and under DDP with local ascent one extra all-reduce of it) would buy nothing.
    idle = train_sam(tmp_path / "i", tiny_bert(), tiny_dataset(), "sgd", trainer_cls=CleanCopyRecordingTrainer,
                     max_steps=4, sam_method=method, **{weight: 0.0})  # fmt: skip
    assert idle.clean_copies and not any(idle.clean_copies)
    assert not idle._sam.descent.active  # nor, under DeepSpeed, a sync of the held gradient on its plain steps
    acting = train_sam(tmp_path / "a", tiny_bert(), tiny_dataset(), "sgd", trainer_cls=CleanCopyRecordingTrainer,
                       max_steps=4, sam_method=method, **{weight: 0.5})  # fmt: skip
    assert acting.clean_copies and all(acting.clean_copies)


def test_looksam_reuses_nothing_from_a_sam_step_at_radius_zero(tmp_path):
    # GSAM's schedule with sam_rho_min 0 gives rho 0 where the learning rate is 0 (step 0 of a warm-up): there g~ = g
    # and g_v = 0 in exact arithmetic; its rounding noise, rescaled to alpha ||g||, must not reach the next step.
    common = dict(max_steps=2, sam_method="looksam", sam_rho_warmup=0.0, sam_rho_min=0.0,
                  lr_scheduler_type="linear", warmup_steps=2)  # fmt: skip
    reuse = train_sam(tmp_path / "r", tiny_bert(), tiny_dataset(), "sgd", looksam_alpha=0.7, **common)
    assert [h["sam/rho"] for h in reuse.state.log_history if "sam/rho" in h] == [0.0]  # step 0 is the SAM step
    plain = train_sam(tmp_path / "p", tiny_bert(), tiny_dataset(), "sgd", looksam_alpha=0.0, **common)
    assert_same_weights(state(reuse.model), state(plain.model))


def test_stable_sam_descent_keeps_the_ascent_norm(tmp_path):
    # Trainer logs the norm of the final gradient (no clipping here): it must equal ||g||, logged as sam/grad_norm.
    trainer = train_sam(tmp_path, tiny_bert(), tiny_dataset(), "sgd", sam_method="stable-sam", sam_rho=0.5,
                        gradient_accumulation_steps=2, per_device_train_batch_size=2)  # fmt: skip
    logs = [h for h in trainer.state.log_history if "sam/grad_norm" in h]
    assert len(logs) == 4
    for entry in logs:
        assert math.isclose(entry["grad_norm"], entry["sam/grad_norm"], rel_tol=1e-5)
    plain_sam = train_sam(tmp_path / "p", tiny_bert(), tiny_dataset(), "sgd", sam_method="sam", sam_rho=0.5,
                          sam_ascent="unnormalized", gradient_accumulation_steps=2,
                          per_device_train_batch_size=2)  # fmt: skip
    logs = [h for h in plain_sam.state.log_history if "sam/grad_norm" in h]
    assert any(not math.isclose(e["grad_norm"], e["sam/grad_norm"], rel_tol=1e-3) for e in logs)


@pytest.mark.parametrize("warmup", [0.0, 0.5])
def test_gsam_rho_follows_the_learning_rate(tmp_path, warmup):
    # With sam_rho_warmup the two schedules multiply: steps 0 and 1 of 4 at half and full of the warm-up.
    trainer = train_sam(tmp_path, tiny_bert(), tiny_dataset(), "sgd", sam_method="gsam", sam_rho=0.2,
                        sam_rho_min=0.05, sam_rho_warmup=warmup, lr_scheduler_type="linear",
                        max_steps=4)  # fmt: skip
    peak = 0.1  # the SGD optimizer's lr, which the scheduler decays
    logs = [h for h in trainer.state.log_history if "sam/rho" in h]
    assert len(logs) == 4
    for step, entry in enumerate(logs):
        # The lr logged at a step is the one the step used: rho = rho_min + (rho - rho_min) lr / peak lr.
        expected = 0.05 + (0.2 - 0.05) * entry["learning_rate"] / peak
        warmed = min(1.0, (step + 1) / (warmup * 4)) if warmup else 1.0
        assert math.isclose(entry["sam/rho"], expected * warmed, rel_tol=1e-5)
    assert logs[0]["sam/rho"] > logs[-1]["sam/rho"]


def test_gsam_rho_follows_a_reduce_on_plateau_learning_rate_of_a_passed_optimizer(tmp_path):
    # ReduceLROnPlateau keeps no base_lrs: the peak is the passed optimizer's own lr (0.01), not args.learning_rate
    # (Trainer's default 5e-5, which the optimizer never used), so rho falls with the lr, a tenth per evaluation.
    model = tiny_bert()
    trainer = SequentialSAMTrainer(
        model=model,
        args=sam_args(
            tmp_path,
            sam_method="gsam",
            sam_rho_min=0.0,
            learning_rate=5e-5,
            max_steps=4,
            lr_scheduler_type="reduce_lr_on_plateau",
            eval_strategy="steps",
            eval_steps=1,
            lr_scheduler_kwargs={"factor": 0.1, "patience": 0, "mode": "max"},
        ),  # fmt: skip
        train_dataset=tiny_dataset(),
        eval_dataset=tiny_dataset(8, seed=1),
        optimizers=(torch.optim.AdamW(model.parameters(), lr=0.01), None),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "sam/rho" in h]
    assert len(logs) == 4 and logs[-1]["learning_rate"] < 0.01  # the plateau scheduler did lower the lr
    for entry in logs:
        assert math.isclose(entry["sam/rho"], 0.05 * entry["learning_rate"] / 0.01, rel_tol=1e-5)


def test_gsam_rho_follows_a_sequential_scheduler_of_a_passed_optimizer(tmp_path):
    # SequentialLR (warm-up then cosine) keeps no base_lrs: the peak fell back to args.learning_rate (5e-5), an lr the
    # passed optimizer never had, so every lr gave a ratio of 1 and the radius stayed at 0.05 on every step.
    model = tiny_bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lr_scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, 0.25, 1.0, total_iters=2),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 6),
        ],
        milestones=[2],
    )
    trainer = SequentialSAMTrainer(
        model=model,
        args=sam_args(tmp_path, sam_method="gsam", sam_rho_min=0.0, learning_rate=5e-5, max_steps=6),
        train_dataset=tiny_dataset(),
        optimizers=(optimizer, lr_scheduler),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "sam/rho" in h]
    assert len(logs) == 6 and logs[0]["learning_rate"] < logs[2]["learning_rate"] == 0.1  # warm-up, then decay
    for entry in logs:
        assert math.isclose(entry["sam/rho"], 0.05 * entry["learning_rate"] / 0.1, rel_tol=1e-5)


def test_gsam_rho_follows_a_reduce_on_plateau_learning_rate_from_the_first_step_of_a_late_schedule(tmp_path):
    # The plateau scheduler's peak was the lr that the run's first SAM step found: late-sam's first SAM step (step 4
    # of 8) came after three evaluations had halved the lr, and took that lr (0.0125) for the peak, so it perturbed at
    # the full radius 0.1 where the lr said 0.025.
    trainer = SequentialSAMTrainer(
        model=tiny_bert(),
        args=sam_args(
            tmp_path,
            sam_method="late-sam",
            sam_schedule_boundary=0.5,
            sam_rho=0.1,
            sam_rho_min=0.0,
            max_steps=8,
            lr_scheduler_type="reduce_lr_on_plateau",
            eval_strategy="steps",
            eval_steps=1,
            lr_scheduler_kwargs={"factor": 0.5, "patience": 0, "mode": "max"},
        ),
        train_dataset=tiny_dataset(),
        eval_dataset=tiny_dataset(8, seed=1),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "sam/rho" in h]
    assert len(logs) == 4 and logs[0]["learning_rate"] < 0.05  # the lr was lowered before the first SAM step
    for entry in logs:
        assert math.isclose(entry["sam/rho"], 0.1 * entry["learning_rate"] / 0.05, rel_tol=1e-5)


def test_adasam_builds_its_optimizer_and_checkpoints_its_state(tmp_path):
    args = sam_args(tmp_path, sam_method="adasam", save_strategy="steps", save_steps=2, max_steps=2)
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, AdaSAMOptimizer)
    saved = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert {"m", "v", "v_hat"} <= set(next(iter(saved["state"].values())))


def test_adasam_reads_its_hyperparameters_when_the_optimizer_is_built(tmp_path):
    # hyperparameter_search sets each trial's values on trainer.args after __init__ (Trainer._hp_search_setup), and
    # Trainer reads them when it builds its optimizer: AdaSAM's must not be the values of the trainer's creation.
    trainer = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, sam_method="adasam", max_steps=1),
                         train_dataset=tiny_dataset())  # fmt: skip
    for key, value in {"learning_rate": 0.001, "adam_beta1": 0.5, "adam_epsilon": 1e-6}.items():
        setattr(trainer.args, key, value)
    trainer.train()
    group = trainer.optimizer.param_groups[0]
    assert (group["initial_lr"], group["betas"], group["eps"]) == (0.001, (0.5, 0.999), 1e-6)


def test_momentum_sam_refuses_an_optimizer_without_momentum_before_any_update(tmp_path):
    model = tiny_bert()
    before = state(model)
    trainer = SequentialSAMTrainer(
        model=model,
        args=sam_args(tmp_path, sam_method="momentum-sam"),
        train_dataset=tiny_dataset(),
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),  # plain SGD keeps no first moment
    )
    with pytest.raises(ValueError, match="SGD keeps none"):
        trainer.train()
    assert_same_weights(before, state(trainer.model))


def test_momentum_sam_logs_its_first_step_as_the_plain_step_it_is(tmp_path):
    # Before the optimizer's first update there is no moment to perturb along: the step ran one plain pass at w, and
    # was logged as a SAM step (sam/sam_step_fraction 1.0, sam/rho 0.2).
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    trainer = SequentialSAMTrainer(model=model, args=sam_args(tmp_path, sam_method="momentum-sam", max_steps=3),
                                   train_dataset=tiny_dataset(), optimizers=(optimizer, None))  # fmt: skip
    trainer.train()
    logs = [{k: v for k, v in h.items() if k.startswith("sam/")} for h in trainer.state.log_history if "loss" in h]
    assert logs[0] == {"sam/passes_per_step": 1.0, "sam/sam_step_fraction": 0.0}
    assert all(log["sam/sam_step_fraction"] == 1.0 and log["sam/rho"] == 0.2 for log in logs[1:])
    assert all(log["sam/momentum_norm"] > 0 for log in logs[1:])


def test_momentum_direction_over_adasam_perturbs_along_its_first_moment(tmp_path):
    # AdaSAM keeps its first moment as "m": the direction used to find none there and ran plain AMSGrad steps.
    args = {"sam_method": "adasam", "sam_direction": "momentum", "sam_rho": 0.2, "adam_epsilon": 1e-3}
    trainer, reference_model, windows = train_with_reference(
        tmp_path, None, 1, "window", args, {"rho": 0.2, "direction": "momentum"}, own_eps=1e-3
    )
    norms = [h["sam/momentum_norm"] for h in trainer.state.log_history if "sam/momentum_norm" in h]
    # No moment before the first update: that step is a plain one, and logs no norm.
    assert len(norms) == 3 and all(n > 0 for n in norms), norms
    assert_same_weights(state(trainer.model), state(reference_model), exact=False)
    plain = copy_model(tiny_bert())
    reference_sam(plain, AMSGrad(plain.parameters(), lr=0.05, eps=1e-3), windows, rho=0.0)
    pairs = zip(state(plain).values(), state(reference_model).values())
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in pairs)  # the test can fail: plain AdaSAM differs


def test_momentum_sam_perturbs_along_adafactors_first_moment(tmp_path):
    # Adafactor with beta1 keeps its first moment as "exp_avg", but its groups hold "beta1", not Adam's "betas": it
    # was refused as an optimizer that keeps none.
    args = {"sam_method": "momentum-sam", "sam_rho": 0.2}
    trainer, reference_model, windows = train_with_reference(
        tmp_path, "adafactor", 1, "window", args, {"rho": 0.2, "direction": "momentum"}
    )
    norms = [h["sam/momentum_norm"] for h in trainer.state.log_history if "sam/momentum_norm" in h]
    # No moment before the first update: that step is a plain one, and logs no norm.
    assert len(norms) == 3 and all(n > 0 for n in norms), norms
    assert_same_weights(state(trainer.model), state(reference_model), exact=False)
    plain = copy_model(tiny_bert())
    reference_sam(plain, OPTIMIZERS["adafactor"](plain.parameters()), windows, rho=0.0)
    pairs = zip(state(plain).values(), state(reference_model).values())
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in pairs)  # the test can fail: plain Adafactor differs


class _BetasWithOtherMomentKey(torch.optim.SGD):
    """Adam-style betas, and its first moment under a key Momentum-SAM does not know (as bitsandbytes' "state1")."""

    def __init__(self, params):
        super().__init__(params, lr=0.1, momentum=0.9)
        for group in self.param_groups:
            group["betas"], group["momentum"] = (0.9, 0.999), 0.0

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    state["state1"] = 0.9 * state.get("state1", torch.zeros_like(p)) + p.grad
                    p -= group["lr"] * state["state1"]


def test_momentum_sam_refuses_an_optimizer_whose_first_moment_it_cannot_find(tmp_path):
    model = tiny_bert()
    trainer = SequentialSAMTrainer(
        model=model,
        args=sam_args(tmp_path, sam_method="momentum-sam"),
        train_dataset=tiny_dataset(),
        optimizers=(_BetasWithOtherMomentKey(model.parameters()), None),
    )
    with pytest.raises(ValueError, match="state1"):  # instead of plain steps that perturb nothing
        trainer.train()


# Shards of unequal size (a batch not a multiple of sam_micro_batches): each shard's loss is its share of the
# micro-batch by its number of examples, so mSAM at rho 0 stays the plain Trainer. Also for a model that takes
# `num_items_in_batch` but returns its own mean (BERT's classification head, transformers' default
# `accepts_loss_kwargs`): Trainer does not divide its loss, and each shard used to count as the whole micro-batch.
@pytest.mark.parametrize("takes_item_count", [False, True])
@pytest.mark.parametrize("batch, ga", [(4, 1), (6, 1), (5, 1), (3, 2), (4, 2)])
def test_msam_at_rho_zero_is_the_plain_trainer_with_unequal_shards(tmp_path, batch, ga, takes_item_count):
    common = dict(
        per_device_train_batch_size=batch, gradient_accumulation_steps=ga, max_steps=3, optim="sgd", learning_rate=0.5
    )

    def model():
        bert = tiny_bert()
        bert.accepts_loss_kwargs = takes_item_count
        return bert

    plain = SequentialSAMTrainer(
        model=model(), args=sam_args(tmp_path / "p", sam_method="none", **common), train_dataset=tiny_dataset()
    )
    plain.train()
    msam = SequentialSAMTrainer(
        model=model(),
        args=sam_args(tmp_path / "m", sam_method="msam", sam_rho=0.0, **common),
        train_dataset=tiny_dataset(),
    )
    msam.train()
    assert msam._sam.loss_ignores_item_count is (True if takes_item_count else None)
    assert_same_weights(state(plain.model), state(msam.model), exact=False, atol=1e-6)
    plain_losses = [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert plain_losses == pytest.approx([h["loss"] for h in msam.state.log_history if "loss" in h], rel=1e-5)


# A token-level loss is a mean over the labels that are not -100: with padded labels (seq2seq targets, causal LM
# continuations) each shard carries its share of the micro-batch's labelled tokens, not of its examples. Weighted by
# examples, mSAM at rho 0 moved the weights up to 0.17 away from the plain Trainer's in 3 SGD steps.
# (GPT-2 with its default `accepts_loss_kwargs` normalizes by `num_items_in_batch` itself, which was right already.)
@pytest.mark.parametrize("architecture, takes_item_count", [("t5", None), ("t5", False), ("gpt2", False)])
@pytest.mark.parametrize("batch, ga", [(5, 1), (4, 2)])
def test_msam_at_rho_zero_is_the_plain_trainer_on_padded_token_labels(
    tmp_path, architecture, takes_item_count, batch, ga
):
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 40, (16, 6), generator=generator)
    labels = ids.clone()
    for row in labels:
        row[int(torch.randint(2, 6, (1,), generator=generator)) :] = -100
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})

    def model():
        if architecture == "t5":
            lm = tiny_t5(dropout=0.0)  # no dropout: shards draw other masks than the whole batch
        else:
            torch.manual_seed(0)
            config = GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
            lm = GPT2LMHeadModel(config)
        if takes_item_count is not None:
            lm.accepts_loss_kwargs = takes_item_count
        return lm

    common = dict(
        per_device_train_batch_size=batch, gradient_accumulation_steps=ga, max_steps=3, optim="sgd", learning_rate=0.5
    )
    plain = SequentialSAMTrainer(model=model(), args=sam_args(tmp_path / "p", sam_method="none", **common),
                                 train_dataset=data)  # fmt: skip
    plain.train()
    msam = SequentialSAMTrainer(model=model(), args=sam_args(tmp_path / "m", sam_method="msam", sam_rho=0.0, **common),
                                train_dataset=data)  # fmt: skip
    msam.train()
    assert_same_weights(state(plain.model), state(msam.model), exact=False, atol=1e-6)
    plain_losses = [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert plain_losses == pytest.approx([h["loss"] for h in msam.state.log_history if "loss" in h], rel=1e-5)


# One perturbation per micro-batch (or mSAM shard) with a loss Trainer normalizes by `num_items_in_batch` (a causal
# LM's token mean): a micro-batch's `.grad` is its share of the window's tokens times its own gradient, not 1/GA of
# it. Taken as 1/GA, sam/grad_norm read 2.44 for a mean of 3.02 here (3.42 for 4.26 over mSAM's shards), and the
# unnormalized ascent (eps = rho g) moved the many-token micro-batch 1.75x too far and the few-token one 0.25x.
@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("ascent", ["sam", "unnormalized"])
def test_micro_accumulation_ascends_along_each_micro_batch_gradient_on_token_losses(tmp_path, shards, ascent):
    from tests.helpers import tiny_gpt2, uneven_token_lm_data

    ids, labels, data = uneven_token_lm_data()  # micro-batches of 14 and 2 scored tokens
    model = tiny_gpt2

    trainer = SequentialSAMTrainer(model=model(), args=sam_args(tmp_path, per_device_train_batch_size=2,
                                   gradient_accumulation_steps=2, sam_accumulation="micro", sam_micro_batches=shards,
                                   sam_ascent=ascent, max_steps=1, optim="sgd", sam_rho=0.05),
                                   train_dataset=data)  # fmt: skip
    trainer.train()
    assert trainer.model_accepts_loss_kwargs
    # The norm of each perturbation unit's own (token-mean) gradient at w.
    reference = model()
    norms = []
    for rows in ([[0, 1]], [[2, 3]]) if shards == 1 else ([[0]], [[1]], [[2]], [[3]]):
        reference.zero_grad()
        reference(input_ids=ids[rows[0]], labels=labels[rows[0]]).loss.backward()
        norms.append(float(torch.sqrt(sum((p.grad**2).sum() for p in reference.parameters()))))
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["sam/grad_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-4)
    expected_eps = 0.05 * sum(norms) / len(norms) if ascent == "unnormalized" else 0.05
    assert log["sam/eps_norm"] == pytest.approx(expected_eps, rel=1e-4)


def _cross_entropy_mean(outputs, labels, num_items_in_batch=None):
    """A `compute_loss_func` that returns its own mean, ignoring the count it is given."""
    return torch.nn.functional.cross_entropy(outputs.logits, labels)


# Trainer skips its 1/GA for any `compute_loss_func`, also one that returns its own mean: each of mSAM's 4 shards then
# counted as the whole micro-batch (at rho 0 the logged loss read 4.39 where the plain Trainer's was 1.10, the weights
# 0.15 apart after 4 AdamW steps). One that normalizes by the count is a share of the window already.
@pytest.mark.parametrize(
    "loss_func, ga", [(_cross_entropy_mean, 1), (_cross_entropy_mean, 2), (_cross_entropy_sum_over_window, 2)]
)
def test_msam_at_rho_zero_is_the_plain_trainer_with_a_compute_loss_func(tmp_path, loss_func, ga):
    common = dict(gradient_accumulation_steps=ga, max_steps=3, optim="sgd", learning_rate=0.5)
    kwargs = {"compute_loss_func": loss_func}
    plain = train_sam(tmp_path / "p", tiny_bert(), tiny_dataset(), trainer_kwargs=kwargs, sam_method="none", **common)
    msam = train_sam(tmp_path / "m", tiny_bert(), tiny_dataset(), trainer_kwargs=kwargs, sam_method="msam",
                     sam_rho=0.0, **common)  # fmt: skip
    assert bool(msam._sam.loss_ignores_item_count) is (loss_func is _cross_entropy_mean)
    assert_same_weights(state(plain.model), state(msam.model), exact=False, atol=1e-6)
    plain_losses = [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert plain_losses == pytest.approx([h["loss"] for h in msam.state.log_history if "loss" in h], rel=1e-5)


def test_msam_at_rho_zero_is_the_plain_trainer_with_label_smoothing(tmp_path):
    # Deciding whether the loss is normalized by num_items_in_batch ran compute_loss twice on one dict, and Trainer's
    # label smoother pops `labels` from it: the second call found no labels and no loss (a ValueError).
    common = dict(gradient_accumulation_steps=2, max_steps=3, optim="sgd", label_smoothing_factor=0.1)

    def model():
        bert = tiny_bert()
        bert.accepts_loss_kwargs = True  # transformers' default for BERT: Trainer passes num_items_in_batch on
        return bert

    plain = train_sam(tmp_path / "p", model(), tiny_dataset(), sam_method="none", **common)
    msam = train_sam(tmp_path / "m", model(), tiny_dataset(), sam_method="msam", sam_rho=0.0, **common)
    assert msam._sam.loss_ignores_item_count is False  # the label smoother divides by num_items_in_batch
    assert_same_weights(state(plain.model), state(msam.model), exact=False, atol=1e-6)


# The sam/* metrics of one train() call do not leak into the next call on the same trainer.
def first_log_after_resume(trainer, step):
    return next(h for h in trainer.state.log_history if "loss" in h and h["step"] == step)


def test_a_resume_on_the_same_trainer_logs_only_its_own_steps(tmp_path):
    common = dict(logging_steps=4, sam_method="ss-sam", sam_schedule="constant", sam_probability=0.5)
    # 6 steps, the last log at step 4: steps 4 (plain) and 5 (SAM) are not logged by this call.
    args = sam_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=6, **common)
    trainer = SequentialSAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    trainer.train()
    trainer.args.max_steps = 10  # go on to 10 steps, on the same trainer
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    fresh = SequentialSAMTrainer(
        model=tiny_bert(), args=sam_args(tmp_path, max_steps=10, **common), train_dataset=tiny_dataset()
    )
    fresh.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    same, expected = first_log_after_resume(trainer, 8), first_log_after_resume(fresh, 8)
    assert same["loss"] == expected["loss"]
    assert expected["sam/sam_step_fraction"] == 1.0  # steps 6 and 7 are SAM steps
    for key in ("sam/sam_step_fraction", "sam/passes_per_step", "sam/perturbed_loss", "sam/sharpness"):
        assert same[key] == expected[key], key


# A routed model (a mixture of experts, any branch the weights choose) can use other tensors at w + eps than at w, or
# on a plain step than at the last SAM step. The descent transforms pair g and g~ by tensor, not by position.
class Routed(torch.nn.Module):
    """Two experts; the sign of `gate` picks one, so an eps that flips it routes the perturbed pass elsewhere."""

    def __init__(self, gate: float):
        super().__init__()
        torch.manual_seed(0)
        self.gate = torch.nn.Parameter(torch.tensor([gate]))
        self.a = torch.nn.Linear(4, 2)
        self.b = torch.nn.Linear(4, 2, bias=False)

    def forward(self, x, labels=None):
        expert = self.a if self.gate.item() > 0 else self.b
        logits = expert(x) * (1 + self.gate)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def routed_data():
    from datasets import Dataset

    torch.manual_seed(1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    return Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}).with_format("torch"), x, y


def routed_grads(model, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x, y)["loss"].backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gsam_pairs_g_and_g_tilde_by_tensor_when_eps_reroutes_the_model(tmp_path):
    rho, alpha, lr = 0.5, 0.1, 0.05
    data, x, y = routed_data()
    common = dict(sam_rho=rho, gsam_alpha=alpha, optim="sgd", max_steps=1, per_device_train_batch_size=8)
    trainer = SAMTrainer(model=Routed(-0.01), args=sam_args(tmp_path, sam_method="gsam", **common), train_dataset=data)
    trainer.train()  # crashed: 3 descent gradients against 2 clean ones
    # By hand: the clean pass uses expert b, the pass at w + eps expert a.
    model = Routed(-0.01)
    start = state(model)
    g = routed_grads(model, x, y)
    assert set(g) == {"gate", "b.weight"}
    norm = torch.sqrt(sum(v.square().sum() for v in g.values()))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in g:
                p.add_(g[n] * rho / norm)
    g_tilde = routed_grads(model, x, y)
    assert set(g_tilde) == {"gate", "a.weight", "a.bias"}
    clean = {n: g.get(n, torch.zeros_like(v)) for n, v in g_tilde.items()}  # g is 0 where w did not use a tensor
    coef = sum((clean[n] * g_tilde[n]).sum() for n in g_tilde) / sum(v.square().sum() for v in g_tilde.values())
    expected = dict(start)
    for n, v in g_tilde.items():
        expected[n] = start[n] - lr * ((1 + alpha * coef) * v - alpha * clean[n])
    assert_same_weights(state(trainer.model), expected, exact=False, atol=1e-6)
    assert torch.equal(trainer.model.b.weight, start["b.weight"])  # used only at w: no descent gradient, no update


def test_looksam_reuses_nothing_for_a_tensor_the_last_sam_step_did_not_use(tmp_path):
    data, x, y = routed_data()
    # A constant radius (the preset grows it over the run), so a 1-step run is the 2-step run's first step.
    common = dict(sam_rho=0.5, sam_rho_warmup=0.0, looksam_alpha=0.7, optim="sgd", per_device_train_batch_size=8)
    trainer = SAMTrainer(
        model=Routed(0.001), args=sam_args(tmp_path, sam_method="looksam", max_steps=2, **common), train_dataset=data
    )
    trainer.train()  # crashed with a KeyError: step 2 (plain) routes to expert b, which step 1 (SAM) never used
    first = SAMTrainer(
        model=Routed(0.001), args=sam_args(tmp_path, sam_method="looksam", max_steps=1, **common), train_dataset=data
    )
    first.train()
    assert first.model.gate.item() < 0 < 0.001  # the plain step runs on expert b
    g = routed_grads(first.model, x, y)
    assert set(g) == {"gate", "b.weight"}
    # b.weight has no g_v: its update is the plain gradient's; expert a, unused, stays.
    expected_b = first.model.b.weight.detach() - 0.05 * g["b.weight"]
    torch.testing.assert_close(trainer.model.b.weight.detach(), expected_b, atol=1e-7, rtol=0)
    assert torch.equal(trainer.model.a.weight, first.model.a.weight)
