"""`SAMMixin`: the SAM step inside `transformers.Trainer.training_step`.

`Trainer` keeps owning the optimizer, scheduler, AMP scaler, clipping and its one `optimizer.step()` per update;
the mixin only decides which forward+backward passes fill `.grad` before that step. Every pass goes through
`Trainer.training_step`, so loss scaling, `num_items_in_batch`, accumulation normalization and label smoothing
work unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from accelerate.utils import is_compiled_module
from torch import nn
from transformers.trainer_utils import has_length
from transformers.utils import logging

from .arguments import SAMArgumentsMixin
from .checkpoint import (
    check_saved_average,
    check_saved_optimizer,
    last_complete_checkpoint,
    load_run_state,
    save_run_state,
)
from .components import LOSS_TERMS
from .esam import per_example_loss, per_example_nll, take_examples
from .host_state import off_the_record
from .loss_term import (
    AfterOptimizerStep,
    AtEpochEnd,
    AtTrainEnd,
    BeforeOptimizerStep,
    capture_outputs,
    capture_pass,
    labels_of_positions,
    logits_of,
    loss_shifts_labels,
    loss_taken_as_normalized,
    per_token_log_probs,
    token_average_factor,
)
from .methods import METHODS
from .metrics import SAMMetrics
from .momentum_sam import first_moments, holds_moments, keeps_momentum, no_momentum_message
from .msam import label_count, sequence_bounds, shard_sizes, split_batch, take_sequences
from .perturbation import optimizer_held
from .radius import note_peak_lr, step_rho
from .replay import bn_snapshot, capture_rng, frozen_bn_stats, restore_bn, restore_rng, rng_untouched
from .run import SAMRun
from .saf import INDEX_COLUMN, add_example_index, signature_with_index
from .schedules import is_sam_step
from .setup_checks import (
    batch_not_a_dict_message,
    batch_without_model_inputs_message,
    check_host_batches,
    check_loss_term_setup,
    check_own_optimizer,
    check_sam_run,
    check_sam_setup,
    check_train_dataset,
    check_training_args,
    loss_term_bypass_message,
    step_bypass_message,
    unheld_perturbed_set_message,
    window_bypass_message,
)
from .sync import drop_deferred_grads, gradient_sync, tracks_used_tensors
from .tensors import all_reduce_mean_, global_norm, resharded_after
from .weight_ema import WeightEMA
from .zero import ZeroStep, without_shm_comm_build


logger = logging.get_logger(__name__)


def _setup_kind(args) -> tuple:
    """What `SAMMixin.__init__` sets up from the arguments (callbacks, checks, AdaSAM's optimizer class)."""
    return args.sam_enabled, args.sam_loss_term, args.weight_ema_decay > 0, METHODS[args.sam_method].optimizer


def _args_position(init) -> int:
    """Where a trainer's `__init__` takes its training arguments positionally (1 when it does not say by name)."""
    parameters = list(inspect.signature(init).parameters.values())
    for i, parameter in enumerate(parameters):
        if parameter.name == "args" and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            return i
    return 1


class SAMMixin:
    """Put in front of `transformers.Trainer` (or any subclass) to train with SAM and its variants.

    Requires `args` to carry the `sam_*` fields (`SAMTrainingArguments`, or `SAMArgumentsMixin` in front of
    another `TrainingArguments` subclass). Everything else is the parent trainer's signature.

    Example:

    ```python
    class SAMMyTrainer(SAMMixin, MyTrainer): ...  # TRL's SFTTrainer and DPOTrainer ship ready-made
    ```
    """

    # The arguments class built when none is passed (None: SAMTrainingArguments); the ready-made TRL trainers set
    # their config class, which the host trainer needs.
    sam_default_args_class: type | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        # `args` is the host's second parameter for Trainer and SFTTrainer, the third for DPOTrainer (after ref_model).
        position = _args_position(super().__init__)
        training_args = kwargs.get("args", args[position] if len(args) > position else None)
        if training_args is None:
            from .arguments import SAMTrainingArguments

            training_args = (self.sam_default_args_class or SAMTrainingArguments)(output_dir="trainer_output")
            if len(args) > position:
                args = (*args[:position], training_args, *args[position + 1 :])
            else:
                kwargs["args"] = training_args
        check_training_args(self, training_args)
        self._sam_check_host(training_args)
        with without_shm_comm_build():  # the Accelerator may set up DeepSpeed's process group here
            super().__init__(*args, **kwargs)
        check_host_batches(self)
        self._sam_metrics = SAMMetrics()
        self._sam = SAMRun()  # everything one train() call holds: its pieces and where the step stands
        if self.args.sam_loss_term != "none":
            check_loss_term_setup(self)
        if self.args.sam_loss_term != "none" or self.args.weight_ema_decay > 0:
            self.add_callback(AfterOptimizerStep(self._sam_after_optimizer_step))
        if self.args.weight_ema_decay > 0:
            # First, so the callbacks that save or log the model when training ends (W&B's log_model="end") get the
            # average that the model holds after train(), not the trained weights.
            self.callback_handler.callbacks.insert(0, AtTrainEnd(self._sam_leave_average))
        if self.args.sam_enabled:
            check_sam_setup(self)  # also hands AdaSAM's optimizer to Trainer
            # First, so no callback's on_epoch_end sees w + eps of a window that Trainer left early.
            self.callback_handler.callbacks.insert(0, AtEpochEnd(self._sam_end_cut_window))
        if self.args.sam_enabled or self.args.weight_ema_decay > 0:
            self.add_callback(BeforeOptimizerStep(self._sam_before_optimizer_step))

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        # Trainer's optimizer steps per epoch (the second value), Sparse SAM's default refresh interval. A dataloader
        # without a length has no epoch: Trainer counts the whole run as one, and `check_train_dataset` asks SSAM-D
        # for its interval.
        self._sam.epoch_steps = values[1] if has_length(dataloader) else None
        return values

    def create_optimizer(self, *args: Any, **kwargs: Any):
        own = METHODS[self.args.sam_method].optimizer if self.args.sam_enabled else None
        if self.optimizer is None and own is not None and self.optimizer_cls_and_kwargs is not None:
            # The method's optimizer (AdaSAM), set up in __init__: its hyperparameters are read now, as Trainer reads
            # its own optimizer's (a hyperparameter-search trial sets its learning rate on args after __init__).
            self.optimizer_cls_and_kwargs = (own, own.kwargs_from(self.args))
        return super().create_optimizer(*args, **kwargs)

    def _sam_check_host(self, args) -> None:
        """Refuse, before the host trainer builds anything, a method this host cannot run (see `SAMDPOTrainer`)."""

    def train(self, *args: Any, **kwargs: Any):
        args, kwargs = self._sam_last_complete_checkpoint(args, kwargs)
        # Parameters may be replaced between __init__ and the first step (FSDP2 sharding, model_init), so the
        # method's pieces are built again, from the prepared model, at the first step of every `train()` call.
        self._sam.reset()
        self._sam.in_train = True
        # Nor do the metrics of the steps after the last log of an earlier call (a resume on the same trainer,
        # hyperparameter_search's next trial) belong to the first log of this one.
        self._sam_metrics = SAMMetrics()
        if self.args.sam_loss_term == "saf" and self.train_dataset is not None:
            self.train_dataset = add_example_index(self.train_dataset)  # unchanged when it has an `idx` column
        check_train_dataset(self)
        try:
            with without_shm_comm_build():  # deepspeed.initialize sets up its process group if nothing did before
                result = super().train(*args, **kwargs)
        except BaseException:
            # Interrupted between two micro-batches of a window (a KeyboardInterrupt in the Trainer's loop or a
            # callback), the weights would still be at w + eps.
            self._sam_abort_step()
            # The run is over and the model holds its trained weights (what save_model() saves): a later evaluate()
            # must score them too, not swap in this run's average.
            self._sam.weight_ema = None
            raise
        finally:
            self._sam.in_train = False
        # Ends a cut window, then puts the average in (done at on_train_end already, unless a subclass skipped the
        # callbacks).
        self._sam_leave_average()
        return result

    def _sam_last_complete_checkpoint(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """`train(resume_from_checkpoint=True)`: the newest checkpoint written to the end (`last_complete_checkpoint`),
        where Trainer takes the newest folder, loads its weights into the model and then fails on its missing
        trainer_state.json (written last) when the save was cut off. Returns `train`'s arguments with that folder."""
        by_name = "resume_from_checkpoint" in kwargs
        resume = kwargs["resume_from_checkpoint"] if by_name else (args[0] if args else None)
        if resume is not True:
            return args, kwargs
        checkpoint = last_complete_checkpoint(self.args.output_dir)
        if checkpoint is None:
            raise ValueError(
                f"resume_from_checkpoint=True found no complete checkpoint in output_dir={self.args.output_dir!r} (a"
                " checkpoint-N folder whose trainer_state.json, which Trainer writes last, is readable). Pass the"
                " checkpoint folder to resume from, or train without resume_from_checkpoint."
            )
        if by_name:
            return args, {**kwargs, "resume_from_checkpoint": checkpoint}
        return (checkpoint, *args[1:]), kwargs

    def _inner_training_loop(self, *args: Any, **kwargs: Any):
        # `auto_find_batch_size` runs Trainer's inner loop again, with a smaller batch, after an out-of-memory error:
        # a new run from global_step 0 on a newly prepared model (under DeepSpeed a new engine). Nothing of the failed
        # attempt may carry over: F-SAM's average took its gradient at the larger batch, the ZeroStep held the
        # released engine (whose optimizer then stepped while the new one never did), and its metrics not yet logged
        # went into the retry's first log.
        self._sam_end_cut_window()  # w, should the error have left the weights at w + eps outside training_step
        self._sam.reset()
        self._sam.in_train = True  # reset() cleared it; train() is still running
        self._sam_metrics = SAMMetrics()
        checkpoint = kwargs.get("resume_from_checkpoint")
        if checkpoint is not None and getattr(self, "is_deepspeed_enabled", False):
            # The engine reads its checkpoint's optimizer state right after building the optimizer, before
            # `_load_optimizer_and_scheduler` (an AdaSAM state fails there with a bare KeyError): checked here.
            check_saved_optimizer(self, checkpoint)
        return super()._inner_training_loop(*args, **kwargs)

    def _sam_leave_average(self) -> None:
        """The model left after training (saved, pushed, evaluated) is the average; checkpoints written during
        training keep the trained weights and the average apart, so a resume continues exactly."""
        self._sam_end_cut_window()  # first: putting w back after would overwrite the average
        if self._sam.weight_ema is not None:
            self._sam.weight_ema.copy_to_model()
            self._sam.weight_ema = None

    def _hp_search_setup(self, trial) -> None:
        # Trainer sets a hyperparameter-search trial's values on the arguments with `setattr`, inside `train()` and
        # after `model_init` built the trial's model, past the checks of __init__ and train(): they run again here.
        if self.hp_search_backend is None or trial is None:
            return super()._hp_search_setup(trial)  # no trial: Trainer sets nothing
        fields = [f.name for f in dataclasses.fields(self.args)]
        sam_fields = {f.name for f in dataclasses.fields(SAMArgumentsMixin)}
        before = {name: getattr(self.args, name) for name in fields}
        given = getattr(self.args, "_sam_given", None)
        kind = _setup_kind(self.args)
        super()._hp_search_setup(trial)
        changed = {name: getattr(self.args, name) for name in fields if getattr(self.args, name) != before[name]}
        sam_changed = {name: value for name, value in changed.items() if name in sam_fields}
        try:
            if sam_changed:
                self.args._sam_apply_trial(sam_changed)  # the fields derived from the searched ones follow them
            else:
                # The trial's other fields against the sam_* ones: a searched gradient_accumulation_steps with a
                # descent transform in micro mode, which skips it.
                self.args.check_after_changes()
            if _setup_kind(self.args) != kind:
                raise ValueError(
                    f"The hyperparameter-search trial sets {sam_changed}, which changes what {type(self).__name__}"
                    " set up when it was built (whether SAM steps run, the loss term, the weight average, the"
                    " method's own optimizer). Search within one kind of method, or build one trainer per kind."
                )
            # The trial's model and values, as __init__ and train() checked the first ones (a searched sam_include
            # matching nothing, ssam-f on an iterable training set); under FSDP this also syncs the ascent again.
            if self.args.sam_enabled:
                check_sam_run(self)
            if self.args.sam_loss_term != "none":
                check_loss_term_setup(self)
            check_train_dataset(self)
        except ValueError:
            for name in {*changed, *sam_fields}:  # a refused trial leaves the arguments as the last good one
                setattr(self.args, name, before[name])
            self.args._sam_given = given
            raise

    def evaluate(self, *args: Any, **kwargs: Any):
        with self._sam_unperturbed(), self._sam_averaged_weights(), resharded_after(self.model):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any):
        with self._sam_unperturbed(), self._sam_averaged_weights(), resharded_after(self.model):
            return super().predict(*args, **kwargs)

    def save_model(self, *args: Any, **kwargs: Any) -> None:
        with self._sam_unperturbed():
            super().save_model(*args, **kwargs)

    def _sam_unperturbed(self):
        """w in the model for the block: a callback may evaluate or save between two micro-batches of a window
        (`on_substep_end`), where window mode and Momentum-SAM hold w + eps; the window then goes on from w + eps."""
        perturbation = self._sam.perturbation
        return perturbation.unperturbed() if perturbation is not None else contextlib.nullcontext()

    def _sam_averaged_weights(self):
        """During training with weight_ema_decay: evaluate the averaged weights, then go on from the trained ones."""
        ema = self._sam.weight_ema
        return ema.swapped_in() if ema is not None else contextlib.nullcontext()

    def _sam_weight_ema_build(self) -> None:
        trainable = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self._sam.weight_ema = WeightEMA(trainable, self.args.weight_ema_decay)

    def _sam_abort_step(self) -> None:
        """Undo a SAM step cut short by an exception: w back to its bit-exact value, the step's gradients dropped.

        Without it, an interrupted run (Ctrl-C in a notebook) or an out-of-memory error that `auto_find_batch_size`
        retries with a smaller batch would carry on from, evaluate or save the perturbed weights w + eps.
        """
        if self._sam.zero is not None:
            self._sam.zero.abort()
        perturbation = self._sam.perturbation
        if perturbation is None or not perturbation.active:
            return
        perturbation.restore()
        ran = self._sam.window_next - 1  # the last micro-batch of the window that Trainer ran
        if 0 <= ran < len(self._sam.window_bn):
            # Window mode ran the clean passes of the micro-batches after it too: their batch-norm statistics would
            # stay in the model that is saved, evaluated and trained on next, from batches Trainer never trained on.
            restore_bn(self._sam.bn_layers, self._sam.window_bn[ran])
        self._sam.release_grads()  # `.grad` holds eps or a descent gradient at w + eps: neither belongs to a step now
        drop_deferred_grads(self.model)  # and FSDP2's held-back gradient of the window's unsynced backwards
        self._sam.forget_step()

    def _sam_end_cut_window(self) -> None:
        """Trainer leaves its loop after any micro-batch once a callback sets `should_training_stop` or
        `should_epoch_stop` (e.g. in `on_step_begin`), so a window can end before its last micro-batch, with the
        weights still at w + eps. Put w back and drop the window's partial gradients, as for an interrupted step."""
        perturbation = self._sam.perturbation
        if perturbation is not None and perturbation.active:
            self._sam_abort_step()
        elif self._sam.zero is not None and self._sam.zero.open:
            # Under DeepSpeed the window's passes stay held from the engine even with w back (micro mode restores
            # after each micro-batch, a plain window of a schedule never perturbs): without this the engine stayed
            # inside its held reduction, with accelerate's wrapper swapped out and the partial gradient in `.grad`.
            self._sam.zero.abort()

    def _sam_before_optimizer_step(self) -> None:
        """A TrainerCallback calls this right before every optimizer step."""
        if self.args.sam_enabled:
            self._sam_check_step_ran()
        if self._sam.weight_ema is not None:
            # Parameters that a callback unfroze since the last step (gradual unfreezing) join the average now, at the
            # weights they held while frozen: built at the first step, it left them out, and the model left after
            # training held their trained weights among the averaged ones.
            self._sam.weight_ema.admit_trainable(self.model)

    def _sam_check_step_ran(self) -> None:
        """Before the first update: a `training_step` override that never calls SAMMixin's would train as the plain
        Trainer without a word (the method's pieces are built at its first step, so none means it never ran)."""
        if self._sam.perturbation is None:
            raise ValueError(step_bypass_message(self.args.sam_method, type(self).__name__))

    def _sam_build(self) -> None:
        if self.args.sam_direction == "momentum" and not keeps_momentum(self.optimizer):
            raise ValueError(no_momentum_message(self.optimizer))  # at the first step, before any update
        check_own_optimizer(self)
        note_peak_lr(self)
        self._sam.build(self.model, self.args, optimizer_held(self))
        if not self._sam.perturbation.params:  # __init__ found some: the optimizer (one passed in) holds none of them
            raise ValueError(unheld_perturbed_set_message(self.args))
        if getattr(self, "is_deepspeed_enabled", False):
            self._sam.zero = ZeroStep(self.accelerator, self.model_wrapped)

    def _sam_sync_held_grads(self, params: list[torch.Tensor]) -> None:
        """DeepSpeed: average the gradient each rank holds (in `.grad`, not reduced by the engine) over the ranks,
        where DDP's synced backward would have: a synced ascent, and before a descent transform."""
        if self._sam.zero is not None:
            all_reduce_mean_([p.grad for p in params if p.grad is not None])

    def _sam_average_grads(self) -> list[torch.Tensor]:
        """Average the `.grad` of an unsynced backward over the ranks in place, 0 where this rank's pass reached no
        tensor (as DDP counts it); returns the tensors that were given that 0."""
        unreached = [p for p in self._sam.trainable if p.grad is None]
        for p in unreached:
            p.grad = torch.zeros_like(p)
        all_reduce_mean_([p.grad for p in self._sam.trainable])
        return unreached

    # ------------------------------------------------------------------ the step

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # Trainer prefetches the whole accumulation window here: keep it so window mode can run every
        # micro-batch's clean pass before the first descent pass.
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._sam.window = batch_samples
        self._sam.window_next = 0
        return batch_samples, num_items_in_batch

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        self._sam.passes = 1.0
        loss = self._sam_training_step(model, inputs, num_items_in_batch)
        if self._sam.passes != 1.0:
            # Trainer adds one forward+backward, `floating_point_ops(inputs)`, to `total_flos` after this returns: the
            # passes beyond it (a SAM step's second, ESAM's partial ones, MESA's teacher forward) are added here.
            self.current_flos += (self._sam.passes - 1.0) * float(self.floating_point_ops(inputs))
        return loss

    def _sam_count_passes(self, passes: float) -> None:
        """The forward+backward passes this micro-batch runs (no-grad forwards as 1/3): logged as
        `sam/passes_per_step`, and counted in Trainer's `total_flos`."""
        self._sam_metrics.add("sam/passes_per_step", passes)
        self._sam.passes = passes

    def _sam_training_step(self, model, inputs, num_items_in_batch) -> torch.Tensor:
        """One micro-batch's passes (`training_step` adds those beyond Trainer's one to `total_flos`)."""
        if not isinstance(inputs, Mapping) and (self.args.sam_enabled or self.args.sam_loss_term != "none"):
            raise ValueError(batch_not_a_dict_message(type(self).__name__, inputs))  # before any pass
        if self.args.sam_loss_term != "none" or (self.args.sam_enabled and self.args.esam_gamma < 1):
            unwrapped = self.accelerator.unwrap_model(model)
            message = batch_without_model_inputs_message(type(self).__name__, self.args.sam_method, unwrapped, inputs)
            if message is not None:
                raise ValueError(message)  # before any pass
        if not self.args.sam_enabled:
            if self.args.sam_loss_term != "none" and not self._sam.term_reached:
                return self._sam_first_loss_term_pass(model, inputs, num_items_in_batch)
            return super().training_step(model, inputs, num_items_in_batch)
        if self._sam.perturbation is None:
            self._sam_build()
        accumulates = getattr(self, "current_gradient_accumulation_steps", 1) > 1
        if self._sam.in_train and self._sam.window is None and accumulates:
            # A get_batch_samples override that never reached SAMMixin's: refused before any pass.
            raise ValueError(window_bypass_message(type(self).__name__))
        index, window = self._sam_position(inputs)
        last = index == len(window) - 1
        zero = self._sam.zero
        if zero is not None and index == 0:
            # DeepSpeed: every backward of this step (SSAM-F's Fisher passes too) holds its gradient back from the
            # engine until the weights are back at w
            zero.begin()
        if index == 0:
            if self._sam.refresh_trainable(self.model) and not self._sam.warned_new_trainable:
                self._sam.warned_new_trainable = True
                logger.warning(
                    "Parameters became trainable after the first step of train() (a callback unfroze them): they"
                    " are trained with the descent gradient, but not perturbed, since the perturbed set (and any"
                    " state of the method over it) is chosen at the first step. To perturb them, unfreeze them"
                    " before train(), or call train() again (resume from a checkpoint) after unfreezing."
                )
            if self._sam.perturbation.mask is not None:
                with off_the_record(self):  # the Fisher passes are no training passes of the host's
                    fisher_flops = self._sam.perturbation.mask.before_step(self, self._sam.perturbation.params)
                # Outside: off_the_record puts the host's counters back, Trainer's `current_flos` among them.
                self.current_flos += fisher_flops
            self._sam.esam.before_step(self.state.global_step)
            # One decision per optimizer step, seeded by (seed, global_step): identical on every rank.
            self._sam.window_is_sam = is_sam_step(self.args, self.state.global_step, self.state.max_steps)
            if self._sam.window_is_sam and self.args.sam_direction == "momentum":
                # Before the optimizer's first update it holds no moment to perturb along: a plain step, logged as one.
                self._sam.window_is_sam = holds_moments(self.optimizer, self._sam.perturbation.params)
            self._sam_metrics.add("sam/sam_step_fraction", float(self._sam.window_is_sam))
        try:
            if self._sam.window_is_sam and self.args.sam_direction == "momentum":
                self._sam_count_passes(1.0)
                loss = self._sam_momentum_step(model, inputs, index, last, num_items_in_batch)
            elif not self._sam.window_is_sam:
                self._sam_count_passes(1.0)
                loss = super().training_step(model, inputs, num_items_in_batch)
                if last and self._sam.descent.active:
                    self._sam_sync_held_grads(self._sam.perturbation.params)
                    self._sam.descent.after_plain_step(self._sam.perturbation)
            else:
                self._sam_count_passes(self._sam.esam.passes())
                if self.args.sam_micro_batches > 1 or (self.args.sam_accumulation == "micro" and len(window) > 1):
                    loss = self._sam_micro_step(model, inputs, index, window, num_items_in_batch)
                else:
                    loss = self._sam_window_step(model, inputs, index, window, num_items_in_batch)
        except BaseException:
            self._sam_abort_step()
            raise
        if zero is not None and last:
            zero.finish()  # one reduction of the step's gradient into DeepSpeed's partitions, then engine.step()
        if last:
            # Trainer steps after a window's last micro-batch, except where an iterable training set ran out inside
            # the window: its gradient then stays in `.grad` and joins the next window's step.
            self._sam.carried = not self.accelerator.sync_gradients
        return loss

    def _sam_first_loss_term_pass(self, model, inputs, num_items_in_batch) -> torch.Tensor:
        """SAF's and MESA's first training pass, which must reach `SAMMixin.compute_loss` (it adds their term).

        A subclass of `SAMTrainer` that overrides `compute_loss` without calling `super().compute_loss` would train
        as the plain Trainer without a word (and hand SAF's index column to the model): refused before any update.
        """
        message = loss_term_bypass_message(self.args.sam_method, type(self).__name__)
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except TypeError as error:  # SAF's index column, which SAMMixin.compute_loss takes out, reached the model
            if not self._sam.term_reached and INDEX_COLUMN in inputs:
                raise ValueError(message) from error
            raise
        if not self._sam.term_reached:
            raise ValueError(message)  # before the optimizer step: the window's gradient is dropped with the run
        return loss

    def _sam_split_batch(self, inputs, shards: int) -> list[dict[str, Any]]:
        """mSAM's shards of a micro-batch: contiguous rows (a host whose rows belong together overrides this)."""
        return split_batch(inputs, shards)

    def _sam_position(self, inputs) -> tuple[int, list]:
        """Index of `inputs` in the current accumulation window, and the window (`[inputs]` if called alone).

        Trainer calls `training_step` once per prefetched micro-batch, in order, so the position counts even when a
        `training_step` override hands on a new dict (`{**inputs, ...}`): taken for a window of one, each micro-batch
        would mix its clean gradient into the earlier micro-batches' descent gradients, and the ascent would drop
        them (the step would keep the last micro-batch's gradient alone).
        """
        window, index = self._sam.window, self._sam.window_next
        if window is None or index >= len(window):
            return 0, [inputs]
        self._sam.window_next += 1
        if window[index] is inputs:
            return index, window
        if len(window) == 1:
            return 0, [inputs]  # the override's dict is the whole window
        per_window = self.args.sam_micro_batches == 1 and self.args.sam_accumulation == "window"
        if index == 0 and per_window and self.args.sam_direction != "momentum":
            # Window mode runs every micro-batch's clean pass at the first one, from the prefetched batches: the
            # override's changes to the other micro-batches would be missed.
            raise ValueError(
                "training_step received another dict than the batch Trainer prefetched for this accumulation window"
                " (a training_step override that passes on a new dict?). sam_accumulation='window' runs the clean"
                " passes of the whole window from the prefetched batches at its first micro-batch, so it would miss"
                " the override's changes: change the prefetched dict in place and pass it on, or use"
                " --sam_accumulation micro."
            )
        return index, window

    def _sam_window_step(self, model, inputs, index, window, num_items_in_batch) -> torch.Tensor:
        """One perturbation from the whole window: batch b x GA k is the same SAM step as batch bk x GA 1."""
        if index == 0:
            # The window starts with zero gradients (Trainer zeroes after each step): the clean passes
            # accumulate the window's gradient g there, with nothing to stash.
            self._sam.window_clean, self._sam.window_rng, self._sam.window_examples = [], [], []
            self._sam.window_bn = []
            carry = self._sam.set_aside_carried()
            for j, batch in enumerate(window):
                sync = self.args.sam_ascent_sync and j == len(window) - 1
                clean, rng, examples = self._sam_clean_pass(model, batch, num_items_in_batch, sync)
                self._sam.window_clean.append(clean)
                self._sam.window_rng.append(rng)
                self._sam.window_examples.append(examples)
                if self._sam.bn_layers and j < len(window) - 1:
                    # A stop may cut the window after micro-batch j (`_sam_abort_step`): the statistics it leaves.
                    self._sam.window_bn.append(bn_snapshot(self._sam.bn_layers))
            local_ascent = self.accelerator.num_processes > 1 and not self.args.sam_ascent_sync
            self._sam.descent.keep_clean(self._sam.perturbation, local_ascent)
            self._sam_ascend(grad_factor=1.0)
            if carry is not None or (local_ascent and tracks_used_tensors(model)):
                # Zeroed, not dropped: the carried gradient is added back to it; and under DDP that finds unused
                # tensors the unsynced clean passes marked every tensor they reached as used, so one that w + eps (a
                # routed model) or ESAM's subset leaves without a descent gradient must still hold one (0), or DDP's
                # reduction fails on it.
                self._sam.zero_grads()
            else:
                self._sam.release_grads()
            if carry is not None:
                if self._sam.descent.active:
                    self._sam.carry = carry  # added after the descent transform, which acts on this window's own
                else:
                    self._sam.add_back(carry)  # the descent passes add to it, in the plain Trainer's order
        clean = self._sam.window_clean[index]
        perturbed = self._sam_perturbed_pass(
            model, inputs, num_items_in_batch, self._sam.window_rng[index], clean, self._sam.window_examples[index]
        )
        if index < len(window) - 1:
            self._sam_record_losses(clean, perturbed, index, len(window))
        else:
            self._sam.perturbation.restore()
            finite = self._sam.guard.update_is_finite(self)
            if finite:
                if self._sam.descent.active:
                    self._sam_sync_held_grads(self._sam.perturbation.params)
                self._sam.descent.after_sam_step(self._sam.perturbation, self._sam.raw_norm, self._sam.rho)
                if self._sam.carry is not None:
                    self._sam.add_back(self._sam.carry)
            self._sam_record_losses(clean, perturbed, index, len(window), dropped=not finite)
            self._sam.forget_step()  # also drops the clean copy of a step whose update was dropped
        return clean

    def _sam_momentum_step(self, model, inputs, index, last, num_items_in_batch) -> torch.Tensor:
        """Momentum-SAM: every pass of the window runs at w - rho m / ||m||; the update is applied from w."""
        perturbation = self._sam.perturbation
        if index == 0:
            rho = self._sam_rho()
            # m is identical on every rank (replicated optimizer state) or sharded like its weight (FSDP2): no sync.
            moments = first_moments(self.optimizer, perturbation.params)  # None for a tensor not yet stepped
            norm = perturbation.shift(moments, -rho)  # -m: along the coming update
            self._sam_metrics.add("sam/momentum_norm", norm)
            self._sam_metrics.add("sam/rho", rho)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._sam.guard.note(loss)
        if last:
            perturbation.restore()
            self._sam.guard.update_is_finite(self)  # a loss that w - rho m/||m|| made non-finite: no update
        return loss

    def _sam_micro_step(self, model, inputs, index, window, num_items_in_batch) -> torch.Tensor:
        """One perturbation per micro-batch, or per shard of it (mSAM); earlier descent gradients are set aside."""
        shards = self._sam_split_batch(inputs, self.args.sam_micro_batches)
        sizes = shard_sizes(shards, len(shards) > 1 and self._sam_loss_shifts_labels())
        outer_ga = self.current_gradient_accumulation_steps
        # A model that takes `num_items_in_batch` but returns its own mean (most classification heads): Trainer does
        # not divide its loss, and each shard would count as the whole micro-batch. Its shards are divided by their
        # share alone, so their sum is the micro-batch's mean, as the plain Trainer's loss for it (not divided by GA).
        shard_means = len(shards) > 1 and self._sam_loss_ignores_item_count(model, shards[0], num_items_in_batch)
        window_items = None if shard_means else self._sam_window_items(num_items_in_batch)
        total_clean = total_perturbed = 0.0
        with contextlib.ExitStack() as restore:
            restore.callback(setattr, self, "current_gradient_accumulation_steps", outer_ga)
            if shard_means:
                restore.enter_context(self._sam_loss_divided_by_ga())
            for j, shard in enumerate(shards):
                # Each shard's loss is its share of the micro-batch, by its number of labels that count (or examples;
                # see `shard_sizes`): Trainer divides by this when it normalizes by GA.
                share = sum(sizes) / sizes[j]
                self.current_gradient_accumulation_steps = share if shard_means else outer_ga * share
                held = [p for p in self._sam.trainable if p.grad is not None]
                stash = None
                # Inside the Trainer loop, index > 0 (or a later shard) means earlier descent gradients sit in .grad,
                # as does the gradient of a window that Trainer took no optimizer step after (`carried`).
                if (index > 0 or j > 0 or self._sam.window is None or self._sam.carried) and held:
                    stash = self._sam.stash_grads(held)
                    self._sam.zero_grads()  # the ascent gradient must not mix with the stashed descent gradients
                # Under DDP that finds unused tensors, a synced backward ends DDP's iteration and forgets the tensors
                # that this window's earlier, unsynced descent backwards reached: one that only they reached was left
                # out of the window's reduction, another gradient on each rank. Such a clean gradient is averaged by
                # hand (one flat all-reduce, where DDP's would have run).
                by_hand = self.args.sam_ascent_sync and stash is not None and tracks_used_tensors(model)
                clean, rng, examples = self._sam_clean_pass(
                    model, shard, num_items_in_batch, self.args.sam_ascent_sync and not by_hand
                )
                unreached = self._sam_average_grads() if by_hand else []
                # `.grad` holds the shard's own gradient g over this factor (a device tensor when counted from labels):
                # 1/GA of the micro-batch's share, or, for a loss Trainer normalizes by `num_items_in_batch`, the
                # shard's share of the window's items (a micro-batch of few tokens is no 1/GA of the window).
                grad_factor = len(window) * share
                items = label_count(shard, self._sam_loss_shifts_labels()) if window_items is not None else None
                if items is not None:
                    grad_factor = window_items / items.clamp(min=1).to(window_items.device)
                self._sam_ascend(grad_factor=grad_factor)
                self._sam.zero_grads()
                for p in unreached:
                    p.grad = None  # as before the average: this rank's passes have not reached it
                if stash is not None:
                    # Back in .grad before the descent backward, so a synced backward all-reduces the full sum.
                    self._sam.add_back(stash)
                if getattr(self, "is_fsdp_enabled", False):
                    # FSDP2 keeps an unsynced backward's gradient outside `.grad` (unsharded, until the next synced
                    # backward), out of reach of the stash and of the zeroing before the next ascent: sync each one.
                    descent_sync = gradient_sync(model, True)
                elif j == len(shards) - 1:
                    descent_sync = contextlib.nullcontext()
                else:
                    descent_sync = gradient_sync(model, False)
                with descent_sync:
                    perturbed = self._sam_perturbed_pass(model, shard, num_items_in_batch, rng, clean, examples)
                self._sam.perturbation.restore()
                # Summed in float32, as Trainer sums the losses it logs: a bf16 model's shard losses summed in bf16
                # were rounded at each addition.
                total_clean = total_clean + clean.float()
                total_perturbed = total_perturbed + perturbed.float()
        dropped = index == len(window) - 1 and not self._sam.guard.update_is_finite(self)
        self._sam_record_losses(total_clean, total_perturbed, index, len(window), dropped=dropped)
        return total_clean

    def _sam_window_items(self, num_items_in_batch) -> torch.Tensor | None:
        """The window's items per rank's pass, when Trainer takes the loss as normalized by `num_items_in_batch` (it
        then skips its 1/GA): `num_items_in_batch`, over the processes it multiplies the loss by when it averages the
        tokens across devices. None when Trainer divides by GA, or for a count that is no tensor."""
        if not loss_taken_as_normalized(self, num_items_in_batch):
            return None
        if not isinstance(num_items_in_batch, torch.Tensor) or num_items_in_batch.dim() != 0:
            return None
        # As Trainer.compute_loss multiplies the loss by the processes when it averages the tokens across devices.
        return num_items_in_batch.float() / token_average_factor(self, num_items_in_batch)

    def _sam_loss_ignores_item_count(self, model, shard, num_items_in_batch) -> bool:
        """Whether Trainer takes the loss as normalized by `num_items_in_batch` (and skips its 1/GA) while the model,
        or the `compute_loss_func`, returns its own mean. Decided once per `train()` call from two forwards without
        gradient (eval mode, RNG kept) at `num_items_in_batch` and twice it: a loss normalized by the count halves.
        Under several processes the ranks' losses are summed first (a collective: every rank calls this at the same
        point, as the ESAM subset, mSAM's shards and the loss terms do)."""
        # Trainer skips its 1/GA for any `compute_loss_func`, also one that ignores the count it is given
        # (`F.cross_entropy(outputs.logits, labels)`): probed like a model's loss, or each of mSAM's shards counted as
        # the whole micro-batch (the loss and the gradient 4x the plain Trainer's at rho 0).
        if (
            num_items_in_batch is None
            or not loss_taken_as_normalized(self, num_items_in_batch)
            or getattr(self, "loss_is_scaled_for_ga", None) is not None
        ):
            return False
        if self._sam.loss_ignores_item_count is None:
            was_training = model.training
            model.eval()
            try:
                # Off the record: a host that collects per-pass metrics in compute_loss (TRL's SFTTrainer) files these
                # eval-mode forwards under its evaluation metrics, which the next `evaluate()` would average in.
                with (
                    rng_untouched(self.args.device),
                    torch.no_grad(),
                    self.compute_loss_context_manager(),
                    resharded_after(model),
                    off_the_record(self),
                ):
                    prepared = self._prepare_inputs(dict(shard))
                    # A copy for each: Trainer's compute_loss pops `labels` with label smoothing.
                    once = self.compute_loss(model, dict(prepared), num_items_in_batch=num_items_in_batch)
                    twice = self.compute_loss(model, dict(prepared), num_items_in_batch=2 * num_items_in_batch)
            finally:
                model.train(was_training)
            if self.accelerator.num_processes > 1:
                # Decided on the ranks' summed losses, so every rank decides at the same call: a rank whose own loss
                # is 0 (no scored token in its micro-batch) would stay undecided and probe again alone next step.
                summed = self.accelerator.reduce(torch.stack([once.detach().float(), twice.detach().float()]), "sum")
                once, twice = summed[0], summed[1]
            if float(once) != 0:  # one host sync, once per run
                self._sam.loss_ignores_item_count = bool(torch.isclose(once, twice))
        return bool(self._sam.loss_ignores_item_count)

    # ------------------------------------------------------------------ passes

    def _sam_clean_pass(self, model, inputs, num_items_in_batch, sync: bool):
        """Forward+backward at w; the backward syncs across ranks only if `sync` (forward included).

        Returns the loss, the RNG state before the pass (for the descent pass to replay) and, with ESAM's data
        selection, each example's loss (else None).
        """
        esam = self._sam.esam
        rng = capture_rng(self.args.device) if self.args.sam_same_dropout or esam.sds else None
        with gradient_sync(model, sync), esam.clean_pass(self.model) as captured:
            loss = super().training_step(model, dict(inputs), num_items_in_batch)
        if sync:
            self._sam_sync_held_grads(self._sam.trainable)
        examples = None
        if esam.sds:
            with torch.no_grad():
                examples = self.per_example_loss(captured[-1], self._prepare_inputs(dict(inputs)))
        return loss, rng, examples

    def _sam_perturbed_pass(
        self, model, inputs, num_items_in_batch, rng, clean=None, clean_examples=None
    ) -> torch.Tensor:
        """Forward+backward at w + eps with the clean pass's dropout masks and without touching BN statistics.

        With ESAM's data selection, a no-grad forward at w + eps (same dropout masks) scores each example by how
        much its loss rose, and the forward+backward runs on the top share only. Returns the perturbed loss on
        the scale of `clean` (for SDS: clean + mean rise, over the whole batch).
        """
        if clean_examples is not None:
            return self._esam_selected_descent(model, inputs, rng, clean, clean_examples, num_items_in_batch)
        if rng is not None:
            restore_rng(rng, self.args.device)
        # Only the clean pass feeds the host's token counts and per-pass metrics (TRL's num_tokens, token accuracy).
        with frozen_bn_stats(self._sam.bn_layers), off_the_record(self):
            loss = super().training_step(model, dict(inputs), num_items_in_batch)
        self._sam.guard.note(loss)
        return loss

    def _esam_selected_descent(
        self, model, inputs, rng, clean, clean_examples, num_items_in_batch=None
    ) -> torch.Tensor:
        prepared = self._prepare_inputs(dict(inputs))
        if rng is not None:
            restore_rng(rng, self.args.device)
        # Unwrapped: no DDP bookkeeping. Under torch.compile the compiled module, which the clean pass ran: inductor
        # draws its own dropout masks from the replayed generator, and an eager forward would score each example
        # under other masks (a "rise" at rho 0).
        scorer = model if is_compiled_module(model) else self.model
        with torch.no_grad(), frozen_bn_stats(self._sam.bn_layers), off_the_record(self):
            # The host's own loss computation, as in the clean pass, so both score examples from the same kind of
            # output (logits, or a fused LM head's per-token log-probabilities).
            with self.compute_loss_context_manager(), capture_outputs(self.model) as captured:
                self.compute_loss(scorer, dict(prepared))
            rise = self.per_example_loss(captured[-1], prepared) - clean_examples
        # Where the clean pass left the RNG (the scoring forward drew its masks again). With `sam_same_dropout` the
        # subset's pass replays the clean pass's draws but draws for fewer examples, so the stream is put back here
        # after it: it must stay the plain Trainer's (later dropout, and samplers that draw from the global RNG, such
        # as group_by_length's). Without it the subset's pass draws fresh masks from here, as the descent pass does
        # without data selection (the scoring forward replays either way: the rise must measure eps, not dropout).
        replay = rng is not None and self.args.sam_same_dropout
        after_clean = capture_rng(self.args.device) if replay else None
        bounds = sequence_bounds(prepared)
        if bounds is not None:
            batch = len(bounds) - 1
        else:
            batch = next(v.shape[0] for v in prepared.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        if rise.shape != (batch,):
            raise ValueError(
                f"ESAM's data selection needs one loss per example, but per_example_loss gave shape"
                f" {tuple(rise.shape)} for a batch of {batch}. Override `per_example_loss(outputs, inputs)` for this"
                " trainer's loss, or set --esam_gamma 1."
            )
        selected = self._sam.esam.select(rise, prepared.get("labels"))
        if bounds is not None:
            subset = take_sequences(dict(inputs), bounds, sorted(selected.tolist()))
        else:
            subset = take_examples(dict(inputs), selected, rise.shape[0])
        # A model that takes `num_items_in_batch` but returns its own mean (T5, BART: their forward takes **kwargs):
        # Trainer neither divides its clean loss by the accumulation steps nor normalizes it by the count (and
        # multiplies it by the processes under `average_tokens_across_devices`). The subset's mean must be scaled
        # the same way, or its descent was 1/GA (1/(GA x processes) under DDP) of the plain Trainer's.
        own_mean = self._sam_loss_ignores_item_count(model, subset, num_items_in_batch)
        if replay:
            restore_rng(rng, self.args.device)
        if own_mean:
            # The count reaches Trainer (which then scales as for the clean pass), not the model's mean loss.
            with frozen_bn_stats(self._sam.bn_layers), off_the_record(self):
                self._sam.guard.note(super().training_step(model, subset, num_items_in_batch))
            # As Trainer scales such a loss: not divided by GA (it takes it as normalized by the count), times the
            # processes under `average_tokens_across_devices`.
            rise_scale = token_average_factor(self, num_items_in_batch)
        elif (subset_count := self._esam_subset_count(inputs, subset, num_items_in_batch)) is not None:
            # A loss Trainer normalizes by the window's count (a causal LM's token mean, label smoothing) weighs each
            # micro-batch by its share of the window's items. The subset keeps that share, spread over its own items:
            # the count it is normalized by is the window's times subset items / micro-batch items (with every
            # example selected, the plain step; as its own mean over GA, a micro-batch of 14 of 16 tokens counted 1/2).
            with frozen_bn_stats(self._sam.bn_layers), off_the_record(self):
                self._sam.guard.note(super().training_step(model, subset, subset_count[0]))
            rise_scale = token_average_factor(self, num_items_in_batch) * subset_count[1]
        else:
            with frozen_bn_stats(self._sam.bn_layers), off_the_record(self), self._sam_loss_divided_by_ga():
                # num_items_in_batch counts the whole window: the subset's loss is its own mean instead, which Trainer
                # must divide by the accumulation steps, as it does a model's mean loss.
                self._sam.guard.note(super().training_step(model, subset, None))
            rise_scale = 1 / self.current_gradient_accumulation_steps
        if after_clean is not None:
            restore_rng(after_clean, self.args.device)
        return clean + rise.mean().detach() * rise_scale

    def _esam_subset_count(self, inputs, subset, num_items_in_batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a loss Trainer takes as normalized by the window's `num_items_in_batch`: the count the subset's loss is
        normalized by (the window's, times the subset's share of the micro-batch's items), and the micro-batch's share
        of the window's items; None where the items are not integer labels that Trainer counts."""
        if not isinstance(num_items_in_batch, torch.Tensor) or not loss_taken_as_normalized(self, num_items_in_batch):
            return None
        shifts = self._sam_loss_shifts_labels()
        items, subset_items = label_count(inputs, shifts), label_count(subset, shifts)
        if items is None or subset_items is None:
            return None
        items = items.to(num_items_in_batch.device).clamp(min=1)
        subset_items = subset_items.to(num_items_in_batch.device).clamp(min=1)
        return num_items_in_batch * subset_items / items, items / num_items_in_batch

    @contextlib.contextmanager
    def _sam_loss_divided_by_ga(self):
        """Trainer skips its 1/GA division whenever a `compute_loss_func` is set (or `loss_is_scaled_for_ga` is True),
        taking the loss as normalized over the window by `num_items_in_batch`; a pass run without that count returns
        a mean of its own, so the division is asked for explicitly."""
        had = "loss_is_scaled_for_ga" in vars(self)
        previous = vars(self).get("loss_is_scaled_for_ga")
        self.loss_is_scaled_for_ga = False
        try:
            yield
        finally:
            if had:
                self.loss_is_scaled_for_ga = previous
            else:
                del self.loss_is_scaled_for_ga

    def per_example_loss(self, outputs, inputs: dict[str, Any]) -> torch.Tensor:
        """Loss of each example of the batch (ESAM's data selection). Override for other heads or losses.

        Args:
            outputs: What the model returned for `inputs`: a `ModelOutput`, dict or tuple with logits, or a fused LM
                head's output with per-token `log_probs` and `label_mask` (TRL's `SFTTrainer`).
            inputs (`dict`): The prepared batch, with `labels` (not needed for a fused LM head's output).

        Returns:
            `torch.Tensor` of shape `(batch,)`.
        """
        # A padding-free batch (one row of sequences back to back, TRL's `padding_free` and packing) scores each
        # sequence: the row as one example would leave ESAM nothing to select.
        bounds = sequence_bounds(inputs)
        token_log_probs = per_token_log_probs(outputs)
        if token_log_probs is not None:
            return per_example_nll(*token_log_probs, bounds)
        try:
            logits = logits_of(outputs, "esam")
        except ValueError as error:
            # Any method runs the selection (`--sam_method sam --esam_gamma 0.5`), and only the selection needs logits.
            raise ValueError(
                f"ESAM's data selection (esam_gamma={self.args.esam_gamma}) scores each example from the model's"
                f" logits, but the model returned {type(outputs).__name__}, without `.logits` (a question-answering"
                " head returns start and end logits). Override `SAMTrainer.per_example_loss(outputs, inputs)` for"
                " this head, or set --esam_gamma 1."
            ) from error
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                "ESAM's data selection needs `labels` in the batch to score examples. Override"
                " `SAMTrainer.per_example_loss(outputs, inputs)`, or set --esam_gamma 1."
            )
        model = self.accelerator.unwrap_model(self.model)
        labels = labels_of_positions(labels, logits, model)  # prompt tuning's virtual tokens lead the logits
        problem_type = getattr(getattr(model, "config", None), "problem_type", None)
        # Trainer trains the label-smoothed loss (unless a compute_loss_func replaces it): examples are ranked by the
        # rise of that loss, and sam/perturbed_loss adds that rise to the smoothed clean loss.
        smoother = self.label_smoother if self.compute_loss_func is None else None
        smoothing = smoother.epsilon if smoother is not None else 0.0
        return per_example_loss(logits, labels, self._sam_loss_shifts_labels(), bounds, problem_type, smoothing)

    # ------------------------------------------------------------------ tensor bookkeeping

    def _sam_rho(self) -> float:
        return step_rho(self)

    def _sam_ascend(self, grad_factor: float | torch.Tensor) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        loss_scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
        if self._sam.zero is not None:
            loss_scale = self._sam.zero.loss_scale()  # DeepSpeed's fp16 scale, which the held `.grad` carries
        grad_unit = grad_factor / loss_scale if loss_scale is not None else grad_factor
        rho = self._sam_rho()
        mask = self._sam.perturbation.mask
        if mask is not None:
            mask.before_ascent(self, self._sam.perturbation.params)
        step_rho = self._sam.esam.ascent_rho(rho)
        raw_norm, skipped = self._sam.perturbation.ascend(step_rho, grad_unit)
        # ||eps|| as applied (eps now sits in `.grad`): below rho where a mask or a skipped step shortens it.
        self._sam_metrics.add("sam/eps_norm", global_norm(self._sam.perturbation.with_grads()[2]))
        if mask is not None:
            self._sam_metrics.add("sam/mask_density", mask.current_density)
        self._sam.raw_norm = raw_norm
        self._sam.rho = rho
        # A clean gradient that is not finite (an fp16 overflow, which the loss scaler skips) is left out of the mean,
        # as its loss is out of Trainer's `loss`: one such step made the whole logging window's norm inf or NaN.
        add = self._sam_metrics.add_finite if self.args.logging_nan_inf_filter else self._sam_metrics.add
        add("sam/grad_norm", raw_norm * grad_unit)
        self._sam_metrics.add("sam/skipped", skipped)
        self._sam_metrics.add("sam/rho", rho)

    def _sam_record_losses(
        self, clean: torch.Tensor, perturbed: torch.Tensor, index: int, window_size: int, dropped: bool = False
    ) -> None:
        # Both are this micro-batch's share of the step loss; summing a window's shares into one sample per window
        # gives per-step values on the same scale as Trainer's `loss`. With `logging_nan_inf_filter` (Trainer's
        # default), a step whose loss at w + eps was not finite (its update dropped) is left out of the means.
        if index == 0:
            # Nothing of a window that a stop cut short; those of a window Trainer took no step after (`carried`),
            # which its `loss` adds to this step's.
            carried, self._sam.carried_losses = self._sam.carried_losses, None
            self._sam.step_losses = [carried] if carried is not None and self._sam.carried else []
        self._sam.step_losses.append((clean, perturbed))
        if index < window_size - 1:
            return
        # In float32, as Trainer accumulates its logged loss: a bf16 model's micro-batch losses summed in bf16 were
        # rounded at each addition, and sam/sharpness (a small difference of two such sums) read 0.031 where the
        # losses of a window of 8 gave 0.037.
        clean = sum(c.float() for c, _ in self._sam.step_losses)
        perturbed = sum(p.float() for _, p in self._sam.step_losses)
        self._sam.step_losses = []
        if dropped:
            # The guard dropped the update on every rank: a rank whose own loss at w + eps was finite leaves the step
            # out of the means too, as the rank that saw the non-finite loss does.
            perturbed = torch.full_like(torch.as_tensor(perturbed, dtype=torch.float32), float("nan"))
        if not self.accelerator.sync_gradients:
            # No optimizer step after this window: its losses join the next window's, in one sample.
            self._sam.carried_losses = (clean, perturbed)
            return
        add = self._sam_metrics.add_finite if self.args.logging_nan_inf_filter else self._sam_metrics.add
        add("sam/perturbed_loss", perturbed)
        add("sam/sharpness", perturbed - clean)

    # ------------------------------------------------------------------ one-pass loss terms (SAF, MESA)

    def _sam_keeps_index(self, description: str | None) -> bool:
        # Only the training set keeps SAF's index column; evaluation batches stay as Trainer makes them.
        return self.args.sam_loss_term == "saf" and str(description).lower() == "training"

    def _remove_unused_columns(self, dataset, description: str | None = None):
        if not self._sam_keeps_index(description):
            return super()._remove_unused_columns(dataset, description=description)
        with signature_with_index(self):
            return super()._remove_unused_columns(dataset, description=description)

    def _get_collator_with_removed_columns(self, data_collator, description: str | None = None):
        if not self._sam_keeps_index(description):
            return super()._get_collator_with_removed_columns(data_collator, description=description)
        with signature_with_index(self):
            return super()._get_collator_with_removed_columns(data_collator, description=description)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Trainer's loss; with `sam_loss_term` (SAF, MESA), plus lambda tau^2 mean KL on training passes.

        SAF's index column is taken out of `inputs` here, so the model never receives it.
        """
        if self.args.sam_loss_term == "none":
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        inputs = dict(inputs)
        index = inputs.pop(INDEX_COLUMN, None)
        if not model.training:  # evaluation and prediction: the plain loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        self._sam.term_reached = True
        if self._sam.loss_term is None:
            self._sam_loss_term_build()
        loss_term = self._sam.loss_term
        # A model that takes num_items_in_batch but returns its own mean (BERT's heads): Trainer then neither divides
        # its loss by GA nor normalizes it over the window, and the term follows that scale (`term_scale`; decided
        # once per run, from two eval-mode forwards, which take the plain branch above).
        self._sam_loss_ignores_item_count(model, inputs, num_items_in_batch)
        prepared = loss_term.prepare(inputs)
        # The term reads the pass's own outputs through hooks rather than `return_outputs=True`, which a host may
        # answer with an extra forward (TRL's SFTTrainer computes its loss without logits and recomputes them).
        # Trainer may pop `labels` (label smoothing) from the dict it gets: pass a copy, keep ours for MESA's mask.
        with capture_pass(self.model, loss_term.needs_hidden_state) as captured:
            result = super().compute_loss(
                model, dict(inputs), return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs else (result, None)
        term = loss_term.term(inputs, captured, index, prepared, num_items_in_batch)
        if term is not None:
            loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def _sam_loss_term_build(self) -> None:
        """SAF: the logit bank, one row per example. MESA: the EMA teacher, from the prepared model."""
        self._sam.loss_term = LOSS_TERMS[self.args.sam_loss_term](self)

    def _sam_loss_shifts_labels(self) -> bool:
        if self._sam.shifts_labels is None:  # once per train() call
            self._sam.shifts_labels = loss_shifts_labels(self)
        return self._sam.shifts_labels

    def _sam_after_optimizer_step(self) -> None:
        """A TrainerCallback calls this right after every optimizer step (MESA's EMA update, the weight average)."""
        if self._sam.loss_term is not None:
            self._sam.loss_term.after_optimizer_step()
        # A step that changed no weight: the guard dropped its update (a non-finite loss at w + eps), or fp16 loss
        # scaling skipped it (an overflow; Trainer leaves the learning rate as it is then). Both are host flags.
        skipped = self._sam.guard.take_dropped() or self.accelerator.optimizer_step_was_skipped
        if self.args.weight_ema_decay > 0:
            if self._sam.weight_ema is None:
                self._sam_weight_ema_build()  # from the weights after the first step
            if not skipped:  # its unchanged weights are no new iterate: folded in, they pulled the average to them
                self._sam.weight_ema.update()

    # ------------------------------------------------------------------ logging and checkpoints

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._sam_metrics:
            reduce = None
            if self.accelerator.num_processes > 1:
                reduce = lambda t: self.accelerator.reduce(t, reduction="sum")  # noqa: E731
            # Reduced on the training device: a window of host floats alone (a schedule's plain steps, Momentum-SAM's
            # first step) was stacked on the CPU, which NCCL's process group refuses ("No backend type associated
            # with device type cpu").
            logs.update(self._sam_metrics.log_values(reduce, device=self.accelerator.device))
            if self.args.sam_enabled and "sam/rho" in logs:
                self._sam.stall.observe(
                    logs["loss"],
                    logs.get("sam/sharpness"),
                    self.state.global_step,
                    self.state.max_steps,
                    logs["sam/rho"],
                )
        super().log(logs, *args, **kwargs)

    def sam_state_dict(self) -> dict[str, torch.Tensor]:
        """Method state to checkpoint, as tensors: `<namespace>.<piece's key>` for every piece that has some
        (`ascent.`, `mask.`, `descent.<i>.`, `loss_term.`), so each piece gets back exactly what it saved."""
        return self._sam.state_dict()

    def load_sam_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `sam_state_dict` returned: each piece gets the keys of its namespace, with it stripped."""
        if self.args.sam_loss_term != "none" and self._sam.loss_term is None:
            self._sam_loss_term_build()
        if self.args.weight_ema_decay > 0:
            if self._sam.weight_ema is None:
                self._sam_weight_ema_build()
            # The checkpoint's average also covers the parameters that a callback unfroze during the run, which the
            # same script restarted holds frozen until its callback unfreezes them again: they stay averaged.
            prefix = "weight_ema.average."
            averaged = {key[len(prefix) :] for key in state if key.startswith(prefix)}
            self._sam.weight_ema.admit([(n, p) for n, p in self.model.named_parameters() if n in averaged])
        self._sam.load_state_dict(state, self.args.device, f"sam_method={self.args.sam_method!r}")

    def _sam_has_run_state(self) -> bool:
        args = self.args
        return args.sam_enabled or args.sam_loss_term != "none" or args.weight_ema_decay > 0

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._sam_has_run_state():
            save_run_state(self, output_dir)
            # Rank 0 writes trainer_state.json next, which marks the checkpoint whole (`last_complete_checkpoint`):
            # not before every rank's state file is written.
            self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            check_saved_optimizer(self, checkpoint)  # before torch reads another optimizer's state
            check_saved_average(self, checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self._sam_has_run_state():
            if self.args.sam_enabled and self._sam.perturbation is None:
                self._sam_build()
            self.load_sam_state_dict(load_run_state(self, checkpoint))
        if checkpoint is not None and self.args.sam_enabled:
            self._sam_replay_logged_losses()

    def _sam_replay_logged_losses(self) -> None:
        """Hand the stall check the training losses that the checkpoint logged (Trainer has read its log history):
        the resumed run's own first log comes past the first tenth of training, which the check compares with, so a
        run resumed after it stalled was never reported."""
        for logs in self.state.log_history:
            if "loss" in logs and "sam/rho" in logs and "step" in logs:
                self._sam.stall.observe(
                    logs["loss"], logs.get("sam/sharpness"), logs["step"], self.state.max_steps, logs["sam/rho"]
                )
