"""The moving average of the weights (`weight_ema_decay`): its defining property, evaluation, resume, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_sam import SAMTrainer

from .helpers import (
    PeakNewTensorBytes,
    SequentialSAMTrainer,
    assert_same_weights,
    sam_args,
    state,
    tiny_bert,
    tiny_dataset,
)


DECAY = 0.6  # small, so the warm-up min(decay, (1 + t) / (10 + t)) and the plain decay both occur in 8 steps


class Snapshots:
    """Records the trained weights after every optimizer step (a callback)."""

    def __init__(self):
        self.weights = []

    def on_optimizer_step(self, args, state_, control, model=None, **kwargs):
        self.weights.append({n: p.detach().clone().float() for n, p in model.named_parameters()})


def hand_average(snapshots: list[dict]) -> dict:
    average = None
    for t, weights in enumerate(snapshots):
        if average is None:
            average = {n: w.clone() for n, w in weights.items()}  # built from the weights after the first step
        decay = min(DECAY, (1 + t) / (10 + t))
        average = {n: decay * average[n] + (1 - decay) * weights[n] for n in average}
    return average


@pytest.mark.parametrize("method", ["none", "sam"])
def test_the_model_left_after_training_is_the_moving_average_of_the_iterates(tmp_path, method):
    from transformers import TrainerCallback

    class Recorder(Snapshots, TrainerCallback):
        pass

    recorder = Recorder()
    args = sam_args(tmp_path, sam_method=method, max_steps=8, weight_ema_decay=DECAY)
    trainer = SequentialSAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(), callbacks=[recorder])
    trainer.train()
    assert len(recorder.weights) == 8
    expected = hand_average(recorder.weights)
    assert_same_weights(state(trainer.model), expected, exact=False, atol=1e-6)
    assert not torch.equal(trainer.model.classifier.weight, recorder.weights[-1]["classifier.weight"])


class LossTimesAtStep(SequentialSAMTrainer):
    """Multiplies the loss of every pass with gradient of optimizer step `at` (from 0) by `factor`."""

    def __init__(self, *args, at: int, factor: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.factor = at, factor

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * self.factor if self.state.global_step == self.at and torch.is_grad_enabled() else loss


@pytest.mark.parametrize(
    ("method", "loss_scaler", "factor", "optim"),
    [
        # The guard drops the update of a step whose loss at w + eps is not finite.
        ("sam", False, math.nan, "adamw_torch_fused"),
        # fp16 loss scaling skips a step whose scaled gradient overflowed (a finite loss); accelerate reports it for
        # an optimizer that the scaler steps itself, not for a fused one, which skips on the device.
        ("none", True, 1e36, "adamw_torch"),
        # Both: the guard leaves the skip to the scaler, and knows of it under a fused optimizer too.
        ("sam", True, math.inf, "adamw_torch_fused"),
    ],
)
def test_a_step_that_changed_no_weight_is_not_folded_into_the_average(tmp_path, method, loss_scaler, factor, optim):
    # Its unchanged weights were folded in as one more iterate (and the warm-up advanced): the average ended 0.0035
    # away from the moving average of the iterates the run went through.
    from transformers import TrainerCallback

    class Recorder(Snapshots, TrainerCallback):
        pass

    recorder = Recorder()
    args = sam_args(tmp_path, sam_method=method, max_steps=8, weight_ema_decay=DECAY, optim=optim)
    trainer = LossTimesAtStep(model=tiny_bert(), args=args, train_dataset=tiny_dataset(), callbacks=[recorder],
                              at=2, factor=factor)  # fmt: skip
    if loss_scaler:
        # fp16 on a GPU runs accelerate's loss scaler; on the CPU the same scaler is set by hand, before train()
        # prepares the optimizer with it.
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.train()
    unchanged = [t for t in range(1, 8) if all(torch.equal(a, recorder.weights[t - 1][n])
                                               for n, a in recorder.weights[t].items())]  # fmt: skip
    assert unchanged == [2]
    if loss_scaler:
        assert trainer.accelerator.scaler.get_scale() == 2.0**15  # it skipped that step, and no other
    iterates = [w for t, w in enumerate(recorder.weights) if t not in unchanged]
    assert_same_weights(state(trainer.model), hand_average(iterates), exact=False, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "loss_scaler", "factor"),
    [
        # fp16 loss scaling's first steps, whose scale (2 ** 16 at the start) makes the gradient overflow.
        ("none", True, 1e36),
        # The guard drops the first step's update (a radius too large for the starting weights).
        ("sam", False, math.nan),
    ],
)
def test_the_average_starts_at_the_first_iterate_when_the_first_step_changed_no_weight(
    tmp_path, method, loss_scaler, factor
):
    # The average was built at the first step, skipped or not: the weights before training, which no step produced,
    # kept their share d_0 = 0.1 after the next update, and the average ended 2.3e-4 from that of the iterates.
    class Recorder(Snapshots, TrainerCallback):
        pass

    recorder = Recorder()
    args = sam_args(tmp_path, sam_method=method, max_steps=4, weight_ema_decay=DECAY, optim="adamw_torch")
    trainer = LossTimesAtStep(model=tiny_bert(), args=args, train_dataset=tiny_dataset(), callbacks=[recorder],
                              at=0, factor=factor)  # fmt: skip
    if loss_scaler:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")  # as in the test above
    trainer.train()
    assert_same_weights(recorder.weights[0], state(tiny_bert()))  # the first step changed no weight
    assert not torch.equal(recorder.weights[1]["classifier.weight"], recorder.weights[0]["classifier.weight"])
    assert_same_weights(state(trainer.model), hand_average(recorder.weights[1:]), exact=False, atol=1e-6)


class UnfreezeTheClassifierAtStep2(TrainerCallback):
    """Gradual unfreezing: the head is frozen at the start and trains from step 2 on (also after a resume past it)."""

    def on_step_begin(self, args, state_, control, model=None, **kwargs):
        if state_.global_step >= 2:
            model.classifier.requires_grad_(True)


def test_a_parameter_unfrozen_during_training_is_averaged_from_the_weights_it_held_frozen(tmp_path):
    # The average covered the parameters trainable at the first step: the head unfrozen at step 2 was left out, and the
    # model left after training held its trained weights (0.0022 from its average) among the averaged ones.
    class Recorder(Snapshots, TrainerCallback):
        pass

    def run(output_dir, resume=None, callbacks=(), **extra):
        model = tiny_bert()
        model.classifier.requires_grad_(False)
        trainer = SequentialSAMTrainer(
            model=model,
            args=sam_args(output_dir, sam_method="none", max_steps=5, weight_ema_decay=DECAY, **extra),
            train_dataset=tiny_dataset(),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),  # every parameter, frozen or not
            callbacks=[UnfreezeTheClassifierAtStep2(), *callbacks],
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    recorder = Recorder()
    straight = run(tmp_path / "straight", callbacks=[recorder])
    assert not torch.equal(recorder.weights[-1]["classifier.weight"], tiny_bert().classifier.weight)  # it trained
    assert_same_weights(state(straight.model), hand_average(recorder.weights), exact=False, atol=1e-6)
    # The same script restarted after the unfreezing holds the head frozen until its callback unfreezes it again:
    # the checkpoint's average of it is taken back, and the run continues as the uninterrupted one.
    run(tmp_path / "cut", save_strategy="steps", save_steps=3)
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-3"))
    assert_same_weights(state(resumed.model), state(straight.model))


def test_callbacks_see_the_average_when_training_ends(tmp_path):
    # The average went into the model after Trainer's train() returned, so the callbacks that save or log the model
    # at on_train_end (W&B's log_model="end") kept the trained weights, 0.03 away from what train() leaves.
    from transformers import TrainerCallback

    class AtTrainEnd(TrainerCallback):
        def on_train_end(self, args, state_, control, model=None, **kwargs):
            seen.append(state(model))

    seen = []
    args = sam_args(tmp_path, max_steps=8, weight_ema_decay=DECAY)
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(), callbacks=[AtTrainEnd()])
    trainer.train()
    assert len(seen) == 1
    assert_same_weights(seen[0], state(trainer.model))


def test_evaluation_during_training_scores_the_average_and_training_goes_on_from_the_trained_weights(tmp_path):
    from transformers import TrainerCallback

    class Recorder(Snapshots, TrainerCallback):
        pass

    seen = []

    class Probe(SequentialSAMTrainer):
        def evaluation_loop(self, *args, **kwargs):
            ema = self._sam.weight_ema
            seen.append((state(self.model), {n: a.clone() for n, a in zip(ema.names, ema.average)}))
            return super().evaluation_loop(*args, **kwargs)

    trained = []
    for decay, trainer_class, extra in ((0.0, SequentialSAMTrainer, {}), (DECAY, Probe, {"eval_steps": 2})):
        recorder = Recorder()
        args = sam_args(
            tmp_path / str(decay),
            max_steps=5,
            weight_ema_decay=decay,
            eval_strategy="steps" if extra else "no",
            **extra,
        )
        trainer_class(
            model=tiny_bert(),
            args=args,
            train_dataset=tiny_dataset(),
            eval_dataset=tiny_dataset(8),
            callbacks=[recorder],
        ).train()
        trained.append(recorder.weights[-1])
    assert len(seen) == 3  # steps 2, 4 and the last one
    for evaluated, average in seen:
        assert_same_weights(evaluated, average)
    assert_same_weights(*trained)  # evaluation swapped the trained weights back bit for bit


def test_resume_continues_the_average_exactly(tmp_path):
    full = SAMTrainer(
        model=tiny_bert(),
        train_dataset=tiny_dataset(),
        args=sam_args(tmp_path / "full", max_steps=6, weight_ema_decay=DECAY),
    )
    full.train()
    first = SAMTrainer(
        model=tiny_bert(),
        train_dataset=tiny_dataset(),
        args=sam_args(tmp_path / "cut", max_steps=6, weight_ema_decay=DECAY, save_strategy="steps", save_steps=3),
    )
    first.train()
    resumed = SAMTrainer(
        model=tiny_bert(1),
        train_dataset=tiny_dataset(),
        args=sam_args(tmp_path / "cut", max_steps=6, weight_ema_decay=DECAY),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    assert_same_weights(state(resumed.model), state(full.model))


def test_a_checkpoint_without_the_average_is_refused_on_resume(tmp_path):
    SAMTrainer(
        model=tiny_bert(),
        train_dataset=tiny_dataset(),
        args=sam_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
    ).train()
    resumed = SAMTrainer(
        model=tiny_bert(), train_dataset=tiny_dataset(), args=sam_args(tmp_path, max_steps=4, weight_ema_decay=DECAY)
    )
    with pytest.raises(ValueError, match="update count"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


@pytest.mark.parametrize("method", ["none", "sam"])
def test_a_checkpoint_with_the_average_is_refused_on_resume_without_it(tmp_path, method):
    # The average would be dropped, and the model left after training be the trained weights: under `none` that went
    # without a word, under `sam` the message named no field ("state 'weight_ema.updates', which no piece of this
    # run (ascent) owns").
    SAMTrainer(
        model=tiny_bert(),
        train_dataset=tiny_dataset(),
        args=sam_args(
            tmp_path, max_steps=2, save_strategy="steps", save_steps=2, sam_method=method, weight_ema_decay=DECAY
        ),
    ).train()
    resumed = SAMTrainer(
        model=tiny_bert(), train_dataset=tiny_dataset(), args=sam_args(tmp_path, max_steps=4, sam_method=method)
    )
    with pytest.raises(ValueError, match="weight_ema_decay=0.*--weight_ema_decay"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"weight_ema_decay": 1.0}, "weight_ema_decay=1.0 must lie in"),
        ({"weight_ema_decay": -0.1}, "weight_ema_decay=-0.1 must lie in"),
        (
            {
                "weight_ema_decay": 0.9,
                "load_best_model_at_end": True,
                "eval_strategy": "steps",
                "save_strategy": "steps",
            },
            "load_best_model_at_end",
        ),
        # The checkpoint named best was chosen by the average's score but holds the trained weights: measured, an
        # eval_loss of 1.134 for the average against 1.339 for its model files.
        (
            {
                "weight_ema_decay": 0.9,
                "eval_strategy": "steps",
                "save_strategy": "best",
                "metric_for_best_model": "eval_loss",
            },
            "save_strategy='best'",
        ),
    ],
)
def test_bad_weight_average_settings_are_refused_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        sam_args(tmp_path, **overrides)


class FailAtStep(TrainerCallback):
    """Stops the run with an error after `step` optimizer steps (an out-of-memory error, a guard's stop)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("stopped")


def test_after_a_failed_run_evaluation_scores_the_weights_the_model_holds(tmp_path):
    # A run that stops with an error leaves the trained weights in the model (save_model() saves them): evaluate()
    # must score those too, not swap in the average of the run that is over.
    args = sam_args(tmp_path, sam_method="sam", weight_ema_decay=0.5, max_steps=6, per_device_eval_batch_size=4)
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(), eval_dataset=tiny_dataset(8),
                         callbacks=[FailAtStep(3)])  # fmt: skip
    with pytest.raises(RuntimeError, match="stopped"):
        trainer.train()
    held = state(trainer.model)
    metrics = trainer.evaluate()
    assert_same_weights(held, state(trainer.model))
    plain = Trainer(model=trainer.model, args=TrainingArguments(**_eval_args(tmp_path)), eval_dataset=tiny_dataset(8))
    assert metrics["eval_loss"] == plain.evaluate()["eval_loss"]


def _eval_args(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path / "plain"), report_to="none", use_cpu=True, per_device_eval_batch_size=4)


def test_the_update_of_bf16_weights_holds_no_float32_copy_of_the_whole_model():
    # The average is float32; bf16 weights are upcast for the lerp one tensor at a time. Upcast all at once, every
    # step held a second float32 copy of the trainable weights (as large as the average itself) for the update.
    from hf_sam.weight_ema import WeightEMA

    model = tiny_bert().to(torch.bfloat16)
    named = list(model.named_parameters())
    ema = WeightEMA(named, DECAY)
    ema.update()  # the first update takes the weights as they are; the second one averages
    reference = [average.clone() for average in ema.average]
    with torch.no_grad():
        for _, p in named:
            p.add_(1.0)
    with PeakNewTensorBytes() as counted:
        ema.update()
    largest = max(4 * p.numel() for _, p in named)
    assert counted.peak <= largest < sum(4 * p.numel() for _, p in named) / 4
    weight = 1 - min(DECAY, 2 / 11)
    for average, before, (_, p) in zip(ema.average, reference, named):  # and the same numbers
        torch.testing.assert_close(average, before.lerp(p.detach().float(), weight), atol=0, rtol=0)
