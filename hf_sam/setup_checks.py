"""Checks of a trainer's setup that refuse, before any step, what SAM cannot run correctly (or warn about it)."""

from __future__ import annotations

import inspect

from transformers.trainer_utils import has_length
from transformers.utils import logging

from .arguments import LOCAL_ASCENT_UNDER_FSDP
from .loss_term import loss_shifts_labels, one_output_message, unwrapped_model
from .methods import METHODS
from .momentum_sam import MOMENTUM_UNDER_DEEPSPEED, base_optimizer
from .perturbation import select_perturbed
from .saf import is_map_style
from .zero import (
    check_deepspeed_version,
    check_zero_config,
    check_zero_data_types,
    check_zero_optimizer,
    zero_config,
)


logger = logging.get_logger(__name__)


def check_sam_setup(trainer) -> None:
    """The SAM-step methods, when the trainer is built: `check_sam_run`, then AdaSAM's optimizer handed to Trainer."""
    check_sam_run(trainer)
    if METHODS[trainer.args.sam_method].optimizer is not None:
        _use_the_method_optimizer(trainer, METHODS[trainer.args.sam_method].optimizer)


def check_sam_run(trainer) -> None:
    """The SAM-step methods: distributed backends, ESAM's SWP, the perturbed set. Checked when the trainer is built
    and again for every hyperparameter-search trial (its values, and the model `model_init` built for it)."""
    args = trainer.args
    _check_backends(trainer)
    if args.sam_direction == "momentum" and getattr(trainer, "is_deepspeed_enabled", False):
        raise ValueError(MOMENTUM_UNDER_DEEPSPEED)
    fsdp = getattr(trainer, "is_fsdp_enabled", False)
    if fsdp and not args.sam_ascent_sync:
        # FSDP from an `accelerate launch` config, which the arguments did not see: an explicit False is refused as
        # with `fsdp=` (each rank holds a shard of the ascent gradient); left unset it becomes True.
        if "sam_ascent_sync" in getattr(args, "_sam_given", {}):
            raise ValueError(LOCAL_ASCENT_UNDER_FSDP)
        args.sam_ascent_sync = True
    if not args.sam_ascent_sync and args.sam_direction != "momentum" and _ddp_static_graph(trainer):
        # DDP's static graph takes the first backward of the run for its graph's first iteration and all-reduces it
        # when it ends; a per-rank ascent's clean pass syncs nothing, and DDP failed in it on an internal assert of
        # its reducer ("expect_autograd_hooks_ INTERNAL ASSERT FAILED"), at the first step or after a resume.
        raise ValueError(
            "ddp_static_graph=True needs every SAM step's first backward to all-reduce, but with"
            " sam_ascent_sync=False each rank runs its clean pass without gradient sync (DDP's reducer fails there)."
            " Set --sam_ascent_sync true (one perturbation from the all-reduced gradient), or drop"
            " --ddp_static_graph."
        )
    if args.esam_swp and args.sam_ascent_sync and trainer.accelerator.num_processes > 1:
        fix = (
            "FSDP always syncs the ascent: run ESAM under DDP, or use --esam_swp false under FSDP."
            if fsdp
            else "Drop --sam_ascent_sync or set --esam_swp false."
        )
        raise ValueError(
            "ESAM's stochastic weight perturbation skips weight gradients in the ascent pass, which a synced"
            f" (all-reduced) ascent cannot do across processes. {fix}"
        )
    if args.esam_swp and args.torch_compile:
        logger.warning(
            "ESAM's stochastic weight perturbation changes which tensors require grad at every step, and"
            " torch.compile recompiles the model for each new pattern (up to its recompile limit, then runs it"
            " eagerly). Use --esam_swp false (ESAM's data selection alone) to compile once, or leave torch_compile"
            " off."
        )
    if not any(p.requires_grad for p in trainer.model.parameters()):
        raise ValueError(
            "The model has no trainable parameter (requires_grad is False everywhere): there is nothing to"
            " perturb or train. Unfreeze the parameters to train, or add adapters (PEFT) before the trainer."
        )
    if not select_perturbed(trainer.model, args.sam_include, args.sam_exclude):
        raise ValueError(
            f"No trainable parameter matches sam_include={args.sam_include!r} and"
            f" sam_exclude={args.sam_exclude!r}: nothing would be perturbed. Loosen the regexes."
        )


def _ddp_static_graph(trainer) -> bool:
    """Whether the trainer wraps the model in DDP with `static_graph` (`--ddp_static_graph`, through accelerate's
    DDP kwargs, which FSDP and DeepSpeed ignore)."""
    if trainer.accelerator.num_processes < 2 or getattr(trainer, "is_fsdp_enabled", False):
        return False
    if getattr(trainer, "is_deepspeed_enabled", False):
        return False
    return bool(getattr(getattr(trainer.accelerator, "ddp_handler", None), "static_graph", False))


def _use_the_method_optimizer(trainer, optimizer_cls: type) -> None:
    """A method that brings its optimizer (AdaSAM): Trainer builds its usual decay / no-decay parameter groups around
    the class; a user's optimizer would silently turn the method into plain SAM over it, so it is refused."""
    method = trainer.args.sam_method
    if trainer.optimizer is not None or trainer.optimizer_cls_and_kwargs is not None:
        given = type(trainer.optimizer).__name__ if trainer.optimizer is not None else "optimizer_cls_and_kwargs"
        raise ValueError(
            f"sam_method={method!r} brings its own optimizer ({optimizer_cls.__name__}), but {given} was passed to"
            f" the trainer: {method} would silently be plain SAM over it. Drop the optimizer argument, or use"
            " sam_method='sam' with your optimizer."
        )
    trainer.optimizer_cls_and_kwargs = (optimizer_cls, optimizer_cls.kwargs_from(trainer.args))


def check_loss_term_setup(trainer) -> None:
    """SAF and MESA: ZeRO-1/2 only under DeepSpeed, FSDP2 only; a head with more than one output."""
    _check_backends(trainer)
    config = getattr(trainer.model, "config", None)
    if getattr(config, "num_labels", None) == 1 or getattr(config, "problem_type", None) == "regression":
        raise ValueError(one_output_message(trainer.args.sam_method))
    if _answers_spans(trainer.model):
        # Its ModelOutput has no `.logits`, and its return_dict=False tuple (loss, start_logits, end_logits) would be
        # read as (loss, logits, ...): the KL over the start positions alone, taken as classes.
        raise ValueError(
            f"sam_method={trainer.args.sam_method!r} compares the model's logits over classes (or tokens), and"
            f" {type(unwrapped_model(trainer.model)).__name__} is a question-answering head: it returns start and"
            " end logits over the positions of the input. Use a method that perturbs the weights, e.g. --sam_method"
            " sam."
        )
    if trainer.args.sam_loss_term == "saf" and loss_shifts_labels(trainer):
        raise ValueError(
            "sam_method='saf' keeps one row of logits per training example, and a causal language model has a"
            " (sequence x vocabulary) block per example: the bank would not fit in memory. Use --sam_method mesa"
            " (an EMA teacher instead of a per-example bank) or a SAM method such as --sam_method sam."
        )


def _answers_spans(model) -> bool:
    """Whether `model` is a span-extraction (question-answering) head: its forward takes `start_positions` and
    `end_positions`, the labels transformers' Trainer uses for such heads."""
    forward = getattr(unwrapped_model(model), "forward", None)
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return "start_positions" in parameters and "end_positions" in parameters


def _check_backends(trainer) -> None:
    """What every method needs of the launcher, checked the same way for the SAM-step methods and the loss terms:
    DeepSpeed ZeRO-1/2 without offload, FSDP2 (MESA's sharded teacher and SAF's gathered logits are built for it too).
    """
    _check_deepspeed(trainer)
    _check_fsdp_version(trainer)


def _check_fsdp_version(trainer) -> None:
    """FSDP2 only, whether FSDP came from the arguments or from `accelerate launch`."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None and getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError("hf_sam supports FSDP2 only: set fsdp_version: 2 in the accelerate/FSDP config.")


def _check_deepspeed(trainer) -> None:
    """ZeRO stage 1 and 2 only, without offload, whether the config came from `deepspeed=` or `accelerate launch`."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return
    plugin = trainer.accelerator.state.deepspeed_plugin
    sam_step = trainer.args.sam_enabled
    check_zero_config(zero_config(plugin.deepspeed_config), "the DeepSpeed config", sam_step=sam_step)
    if sam_step:
        bf16 = bool(getattr(trainer.args, "bf16", False))
        check_zero_data_types(plugin.deepspeed_config, "the DeepSpeed config", bf16=bf16)
        own = METHODS[trainer.args.sam_method].optimizer
        check_zero_optimizer(plugin.deepspeed_config, "the DeepSpeed config", trainer.args.sam_method, own)
        check_deepspeed_version()


def check_train_dataset(trainer) -> None:
    """At `train()`: SSAM-F draws its Fisher examples by position, so it needs a map-style training set (and one at
    all, where a `get_train_dataloader` override feeds the steps); SSAM-D's default refresh interval is an epoch,
    which a training set without a length does not have."""
    args, dataset = trainer.args, trainer.train_dataset
    if (
        args.sam_enabled
        and args.sam_mask == "dynamic"
        and args.sam_mask_interval is None
        and dataset is not None
        and not has_length(dataset)
    ):
        raise ValueError(
            "sam_mask='dynamic' (ssam-d) refreshes its mask every sam_mask_interval optimizer steps, by default one"
            " epoch's, and an iterable train_dataset without a length has no epoch: set --sam_mask_interval to the"
            " optimizer steps between refreshes (e.g. those of one pass over your data)."
        )
    if args.sam_enabled and args.sam_mask == "fisher" and dataset is None:
        # A `get_train_dataloader` override may train without one: the first refresh failed with a bare TypeError.
        raise ValueError(
            "sam_mask='fisher' (ssam-f) draws sam_fisher_samples examples from the trainer's train_dataset for its"
            " Fisher mask, and the trainer has none (a get_train_dataloader override that builds its own data?):"
            " pass the map-style training set as train_dataset=, or use sam_method='ssam-d' (a dynamic mask, built"
            " from the gradients)."
        )
    if args.sam_enabled and args.sam_mask == "fisher" and dataset is not None and not is_map_style(dataset):
        raise ValueError(
            "sam_mask='fisher' (ssam-f) draws sam_fisher_samples training examples by position for its Fisher"
            " mask, so it needs a map-style train_dataset with __len__, not an iterable one. Use"
            " sam_method='ssam-d' (a dynamic mask, built from the gradients) or a map-style dataset."
        )


def check_training_args(trainer, training_args) -> None:
    """At `__init__`, before the host builds anything: arguments with the sam_* fields, of the host's own config class
    (`sam_default_args_class`), checked again for fields written after construction."""
    host = type(trainer).__name__
    if not hasattr(training_args, "sam_method"):
        raise ValueError(
            f"{host} needs the sam_* fields: pass SAMTrainingArguments (or a TrainingArguments subclass with"
            f" SAMArgumentsMixin in front) instead of {type(training_args).__name__}."
        )
    config_class = trainer.sam_default_args_class
    if config_class is not None and not isinstance(training_args, config_class):
        # The TRL hosts read their own config's fields: SFTTrainer would rebuild the arguments as a plain SFTConfig
        # (a TypeError on sam_method), DPOTrainer and RewardTrainer fail on a field of their own (an AttributeError).
        config = config_class.__name__
        raise ValueError(
            f"{host} needs {config} (its host's config fields plus the sam_* ones), not"
            f" {type(training_args).__name__}: build {config}(...) with the same arguments."
        )
    # set_optimizer / set_training and attribute writes after construction skip __post_init__'s checks.
    check_after_changes = getattr(training_args, "check_after_changes", None)
    if check_after_changes is not None:
        check_after_changes()


def check_host_batches(trainer) -> None:
    """After the host's `__init__`: a host that generates its batches inside the step cannot run a method's passes.

    TRL's GRPOTrainer, RLOOTrainer, DistillationTrainer (and the experimental trainers built like them) generate
    completions in `_prepare_inputs` and hand out a buffered slice per pass by a pass counter: the perturbed pass would
    train on the next slice or a fresh generation, not the clean pass's batch. Their batches of raw prompts failed in
    `dict(inputs)` (SAM) or in MESA's teacher with unrelated messages.
    """
    args = trainer.args
    if (args.sam_enabled or args.sam_loss_term != "none") and hasattr(trainer, "_buffered_inputs"):
        raise ValueError(
            f"{type(trainer).__name__} generates its training batches inside the step (completions buffered in"
            " `_buffered_inputs` and handed out one per pass): the SAM step's second pass at w + eps would not"
            " see the clean pass's batch, and SAF's bank or MESA's teacher would need model inputs where the"
            f" batch holds prompts and completions. sam_method={args.sam_method!r} is not supported by it:"
            " train it with sam_method='none', or use a host whose batches come from the dataloader"
            " (SAMSFTTrainer, SAMDPOTrainer, SAMRewardTrainer, SAMKTOTrainer)."
        )


def batch_not_a_dict_message(host: str, inputs) -> str:
    """A training batch that reaches `training_step` as no dict: the passes of a step copy it as a dict (mSAM splits
    it, ESAM takes a subset, MESA's teacher takes it as model inputs). TRL's A2POTrainer collates a list of raw
    examples and generates the completions in `_prepare_inputs` at every call, so a second pass would also train on
    other completions; a collator returning a tuple failed the same way, with "dictionary update sequence element"."""
    return (
        f"{host}'s training batch reaches training_step as a {type(inputs).__name__}, not a dict of model inputs:"
        " every pass of a SAM step (and MESA's teacher) takes the batch as a dict. A host that builds its model"
        " inputs inside the step from raw examples (TRL's A2POTrainer generates completions in _prepare_inputs)"
        " would also generate other completions for the pass at w + eps. Use a data_collator that returns a dict,"
        " or train this host with sam_method='none'."
    )


def batch_without_model_inputs_message(host: str, method: str, model, inputs) -> str | None:
    """A batch that holds no model inputs for what runs the model on the batch itself (SAF's bank and MESA's teacher
    score it; ESAM's selection ranks its rows by their own loss), or None where it does. TRL's ORPOTrainer and
    CPOTrainer (experimental) collate preference pairs (`prompt_input_ids`, `chosen_input_ids`, ...) and build the
    model's inputs inside their loss: MESA failed with "You must specify exactly one of input_ids or inputs_embeds"
    and ESAM ranked rows of the concatenated pairs, not the pairs' loss."""
    name = getattr(model, "main_input_name", None)
    if name is None or name in inputs or "inputs_embeds" in inputs:
        return None
    return (
        f"{host}'s training batch holds {', '.join(map(str, inputs))} and no {name!r}: the host builds the model's"
        f" inputs inside its loss (preference pairs, as TRL's ORPOTrainer and CPOTrainer). sam_method={method!r}"
        " needs the batch to be the model's inputs: SAF's bank and MESA's teacher score it, and ESAM's data"
        " selection ranks its rows by their own loss. Use a method that perturbs the weights alone (e.g."
        " --sam_method sam, or --esam_gamma 1 for ESAM's weight perturbation)."
    )


def check_own_optimizer(trainer) -> None:
    """At the first step: a method that brings its own optimizer (AdaSAM) trains with it. `__init__` refuses a passed
    optimizer; one built elsewhere (a `create_optimizer` override, which never reads optimizer_cls_and_kwargs) would
    silently turn the method into plain SAM over it."""
    own = METHODS[trainer.args.sam_method].optimizer
    built = base_optimizer(trainer.optimizer)
    if own is not None and not isinstance(built, own):
        method, name = trainer.args.sam_method, type(built).__name__
        raise ValueError(
            f"sam_method={method!r} brings its own optimizer ({own.__name__}), but the trainer built {name}"
            f" (a create_optimizer override?): {method} would silently be plain SAM over it. Let Trainer build"
            f" the optimizer from optimizer_cls_and_kwargs, or use sam_method='sam' with {name}."
        )


def unheld_perturbed_set_message(args) -> str:
    """An optimizer (passed to the trainer, or built by an override) over none of the parameters the method would
    perturb: each SAM step would perturb nothing, and the run would be the plain optimizer at twice its cost."""
    return (
        f"The optimizer holds none of the trainable parameters that match sam_include={args.sam_include!r} and"
        f" sam_exclude={args.sam_exclude!r}: sam_method={args.sam_method!r} perturbs only parameters the optimizer"
        " updates, so nothing would be perturbed. Build the optimizer over the parameters to train, or set"
        " --sam_include / --sam_exclude to select some of them."
    )


def window_bypass_message(host: str) -> str:
    """A `get_batch_samples` override that never reached SAMMixin's: each micro-batch would be taken for a window of
    one, its clean pass would add to the earlier micro-batches' descent gradients, and the ascent would drop them."""
    return (
        f"{host}.get_batch_samples does not call super().get_batch_samples, through which SAMMixin sees the"
        " accumulation window Trainer prefetched: with gradient_accumulation_steps > 1 the SAM step would keep the"
        " last micro-batch's gradient alone. Call super().get_batch_samples(...) from the override (and change its"
        " batches in place), or put SAMMixin in front of the trainer that overrides it: class"
        " MySAMTrainer(SAMMixin, MyTrainer)."
    )


def loss_term_bypass_message(method: str, host: str) -> str:
    """A `compute_loss` override that never reached SAMMixin's, which adds SAF's / MESA's term."""
    return (
        f"sam_method={method!r} adds its term to the loss in SAMMixin.compute_loss, which {host}.compute_loss"
        " does not call: the run would be the plain Trainer. Call super().compute_loss(model, inputs,"
        " return_outputs, num_items_in_batch) from the override, or put SAMMixin in front of the trainer that"
        " overrides it: class MySAMTrainer(SAMMixin, MyTrainer)."
    )


def step_bypass_message(method: str, host: str) -> str:
    """A `training_step` override that never reached SAMMixin's, which runs the SAM passes."""
    return (
        f"{host}.training_step does not call super().training_step, where SAMMixin runs sam_method={method!r}'s"
        " passes: the run would be the plain Trainer. Call super().training_step(model, inputs, num_items_in_batch)"
        " from the override, or put SAMMixin in front of the trainer that overrides it: class"
        " MySAMTrainer(SAMMixin, MyTrainer)."
    )
