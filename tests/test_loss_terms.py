"""SAF and MESA (one pass + a trajectory KL term) against hand-written loops, and their plumbing in Trainer."""

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors import safe_open
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, TrainerCallback

from hf_sam import SAMTrainer, SAMTrainingArguments, add_example_index
from hf_sam.loss_term import capture_pass
from hf_sam.saf import IndexedDataset, LogitBank, example_ids
from tests.helpers import (
    PeakNewTensorBytes,
    SequentialSAMTrainer,
    assert_same_weights,
    batches,
    copy_model,
    sam_args,
    state,
    tiny_bert,
    tiny_dataset,
)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def kl(student_logits, target_logits, tau):
    """KL(softmax(target/tau) || softmax(student/tau)) per row, written out."""
    p = torch.softmax(target_logits.float() / tau, dim=-1)
    log_q = torch.log_softmax(student_logits.float() / tau, dim=-1)
    return (p * (torch.log(p) - log_q)).sum(-1)


def train(tmp_path, model, data, trainer_cls=SequentialSAMTrainer, optimizer=True, **overrides):
    trainer = trainer_cls(
        model=model,
        args=sam_args(tmp_path, **overrides),
        train_dataset=data,
        optimizers=(sgd(model), None) if optimizer else (None, None),
    )
    trainer.train()
    return trainer


# ---------------------------------------------------------------------- SAF


def reference_saf(model, data, batch, ga, epochs, lam, tau, lag, start, trace=None):
    """SAF in plain PyTorch: a dict (example, epoch) -> logits, KL to the entry `lag` epochs back.

    `trace`, a list, gets one `(kl of each example that found a reference, examples)` per optimizer step."""
    optimizer = sgd(model)
    micro = batches(data, batch)
    for m, start_row in zip(micro, range(0, len(data), batch)):
        m["idx"] = torch.arange(start_row, start_row + len(m["labels"]))
    windows = [micro[k : k + ga] for k in range(0, len(micro), ga)]
    record = {}
    for epoch in range(epochs):
        for s, window in enumerate(windows):
            progress = epoch + s / len(windows)  # Trainer's state.epoch before this step
            optimizer.zero_grad()
            found, examples = [], 0
            for m in window:
                out = model(input_ids=m["input_ids"], labels=m["labels"])
                loss = out.loss
                if progress >= start:
                    terms = [
                        kl(out.logits[r], record[(i, epoch - lag)], tau) if (i, epoch - lag) in record else 0.0
                        for r, i in enumerate(m["idx"].tolist())
                    ]
                    loss = loss + lam * tau**2 * sum(terms) / len(terms)
                    found += [float(t.detach()) for t in terms if isinstance(t, torch.Tensor)]
                    examples += len(terms)
                for r, i in enumerate(m["idx"].tolist()):
                    record[(i, epoch)] = out.logits[r].detach()
                (loss / len(window)).backward()
            optimizer.step()
            if trace is not None and progress >= start:
                trace.append((found, examples))
    return model


@pytest.mark.parametrize("ga", [1, 2])
def test_saf_matches_hand_written_loop_across_epochs(tmp_path, ga):
    data = tiny_dataset(8)
    model = tiny_bert()
    reference = reference_saf(copy_model(model), data, batch=2, ga=ga, epochs=3, lam=1.0, tau=2.0, lag=1, start=1.0)
    trainer = train(tmp_path, model, data, max_steps=-1, num_train_epochs=3, per_device_train_batch_size=2,
                    gradient_accumulation_steps=ga, sam_method="saf", saf_lambda=1.0, saf_tau=2.0)  # fmt: skip
    assert trainer.state.global_step == 3 * 4 // ga
    assert_same_weights(state(trainer.model), state(reference), exact=False, atol=1e-5)
    # The term ran (from epoch 1 on, every example found) and changed the trajectory.
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(("saf/kl" in h) == (h["epoch"] > 1.0) for h in logs)  # logged epoch: after the step
    assert [h["saf/coverage"] for h in logs if "saf/kl" in h] == [1.0] * (2 * 4 // ga)
    plain = reference_saf(copy_model(tiny_bert()), data, batch=2, ga=ga, epochs=3, lam=0.0, tau=2.0, lag=1, start=1)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(state(plain).values(), state(reference).values()))


def test_saf_lag_two_uses_the_ring_buffer(tmp_path):
    data = tiny_dataset(4)
    model = tiny_bert()
    reference = reference_saf(copy_model(model), data, batch=2, ga=1, epochs=4, lam=1.0, tau=2.0, lag=2, start=0.0)
    trainer = train(tmp_path, model, data, max_steps=-1, num_train_epochs=4, per_device_train_batch_size=2,
                    sam_method="saf", saf_lambda=1.0, saf_tau=2.0, saf_lag_epochs=2, saf_start_epoch=0.0)  # fmt: skip
    assert_same_weights(state(trainer.model), state(reference), exact=False, atol=1e-5)
    bank = trainer._sam.loss_term.bank
    assert bank.bank.shape == (4, 3, 3)
    assert bank.written.tolist() == [[3, 1, 2]] * 4  # slot e % 3 holds epoch e


def test_saf_kl_is_the_mean_over_the_examples_that_found_a_reference(tmp_path):
    # docs/methods.md#saf: saf/kl is the mean KL over the examples that found a reference. With lag 2 from epoch 1,
    # no example finds one in epoch 1: its micro-batches counted as KL 0 in the mean, so a window holding them logged
    # 0.0 (no example to average) and a window reaching into epoch 2 a third of the KL (0.00151 for 0.00453).
    data = tiny_dataset(8)
    model = tiny_bert()
    trace = []
    reference_saf(copy_model(model), data, batch=2, ga=1, epochs=4, lam=1.0, tau=2.0, lag=2, start=1.0, trace=trace)
    trainer = train(tmp_path, model, data, max_steps=-1, num_train_epochs=4, per_device_train_batch_size=2,
                    sam_method="saf", saf_lambda=1.0, saf_tau=2.0, saf_lag_epochs=2, logging_steps=3)  # fmt: skip
    logs = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    steps = {4 + k: entry for k, entry in enumerate(trace)}  # the term starts at step 4 (epoch 1)
    for step in (6, 9, 12, 15):
        window = [steps[s] for s in range(step - 3, step) if s in steps]
        found = [v for kls, _ in window for v in kls]
        coverage = len(found) / sum(n for _, n in window)
        assert logs[step]["saf/coverage"] == pytest.approx(coverage, abs=1e-6), step
        if found:
            assert logs[step]["saf/kl"] == pytest.approx(sum(found) / len(found), rel=1e-3, abs=1e-6), step
        else:
            assert "saf/kl" not in logs[step], logs[step]  # no example to average over


def test_index_column_is_kept_for_training_and_never_reaches_the_model(tmp_path):
    rows = tiny_dataset(8).to_dict()
    data = Dataset.from_dict({**rows, "text": ["unused"] * 8})  # a column remove_unused_columns must drop
    model = tiny_bert()
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    trainer = SequentialSAMTrainer(model=model, args=sam_args(tmp_path, sam_method="saf", max_steps=2,
                                   per_device_train_batch_size=2), train_dataset=data,
                                   eval_dataset=add_example_index(data))  # fmt: skip
    trainer.train()
    assert "idx" in trainer.train_dataset.column_names  # added by the trainer (the helper)
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "idx"}
    assert set(next(iter(trainer.get_eval_dataloader()))) == {"input_ids", "labels"}
    assert seen and all("idx" not in kwargs for kwargs in seen)
    trainer.evaluate()  # evaluation batches carry no index, and no term


def test_existing_index_column_and_torch_datasets(tmp_path):
    # A GLUE-like `idx` column with gaps is kept: row r of the bank holds the r-th smallest id, one row per example.
    rows = tiny_dataset(4).to_dict()
    data = Dataset.from_dict({**rows, "idx": [7, 2, 0, 5]})
    assert add_example_index(data) is data and example_ids(data).tolist() == [0, 2, 5, 7]
    assert example_ids(Dataset.from_dict({**rows, "idx": [3, 1, 0, 2]})) is None  # positions: no lookup needed
    trainer = train(tmp_path / "a", tiny_bert(), data, sam_method="saf", max_steps=2, per_device_train_batch_size=2)
    assert trainer._sam.loss_term.bank.written[:, 0].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="repeats"):
        example_ids(Dataset.from_dict({**rows, "idx": [1, 1, 2, 3]}))

    class Plain(torch.utils.data.Dataset):  # a map-style dataset of dicts without an index
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"input_ids": torch.tensor(rows["input_ids"][i]), "labels": torch.tensor(rows["labels"][i])}

    wrapped = add_example_index(Plain())
    assert isinstance(wrapped, IndexedDataset) and wrapped[3]["idx"] == 3 and add_example_index(wrapped) is wrapped
    trainer = train(tmp_path / "b", tiny_bert(), Plain(), sam_method="saf", max_steps=2, per_device_train_batch_size=2)
    assert isinstance(trainer.train_dataset, IndexedDataset)
    assert trainer._sam.loss_term.bank.written[:, 0].tolist() == [0, 0, 0, 0]


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)  # fmt: skip
    return LlamaForCausalLM(config)


def lm_dataset(n=8, seq=6):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32, (n, seq), generator=generator)
    labels = ids.clone()
    for i in range(n):  # a different number of scored tokens per example (prompt masked out)
        labels[i, : 1 + i % 4] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def test_saf_refuses_a_collator_that_drops_the_index_column(tmp_path):
    # examples/README.md: a custom collator must pass `idx` through, or SAF raises a ValueError saying so.
    from transformers import default_data_collator

    def drops_the_index(features):
        return default_data_collator([{k: v for k, v in f.items() if k != "idx"} for f in features])

    model = tiny_bert()
    trainer = SAMTrainer(model=model, args=sam_args(tmp_path, sam_method="saf", max_steps=1),
                         train_dataset=tiny_dataset(4), data_collator=drops_the_index,
                         optimizers=(sgd(model), None))  # fmt: skip
    with pytest.raises(ValueError, match="index column 'idx'.*collator must pass it through"):
        trainer.train()


def test_saf_refuses_token_level_outputs_and_points_to_mesa(tmp_path):
    with pytest.raises(ValueError, match="--sam_method mesa"):
        train(tmp_path, tiny_llama(), lm_dataset(), sam_method="saf", max_steps=1)


def test_saf_resume_across_the_epoch_boundary_equals_uninterrupted_run(tmp_path):
    data = tiny_dataset(8)
    common = dict(max_steps=-1, num_train_epochs=3, per_device_train_batch_size=2, sam_method="saf")
    straight = SAMTrainer(model=tiny_bert(dropout=0.1), args=sam_args(tmp_path / "a", **common), train_dataset=data)
    straight.train()
    first = SAMTrainer(model=tiny_bert(dropout=0.1), train_dataset=data,
                       args=sam_args(tmp_path / "b", save_strategy="steps", save_steps=6, **common))  # fmt: skip
    first.train()
    checkpoint = tmp_path / "b" / "checkpoint-6"  # mid epoch 1: the term is on, the bank holds epochs 0 and 1
    with safe_open(str(checkpoint / "sam_state.safetensors"), framework="pt") as handle:
        assert {"loss_term.saf_bank", "loss_term.saf_written"} <= set(handle.keys())
    resumed = SAMTrainer(model=tiny_bert(dropout=0.1), args=sam_args(tmp_path / "b", **common), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_same_weights(state(straight.model), state(resumed.model))
    other = SAMTrainer(model=tiny_bert(dropout=0.1), args=sam_args(tmp_path / "c", **common),
                       train_dataset=tiny_dataset(10))  # fmt: skip
    with pytest.raises(ValueError, match="training set"):
        other.train(resume_from_checkpoint=str(checkpoint))


# ---------------------------------------------------------------------- MESA


def reference_mesa(model, windows, lam, tau, decay, start, steps_per_epoch, shift=False, warmup=False, trace=None):
    """MESA in plain PyTorch: an EMA copy (eval mode) of the weights as teacher, updated after every step
    (with `warmup`, at decay min(decay, (1 + t) / (10 + t)) after t steps).

    `trace`, a list, gets one list of the step's per-example KL values per optimizer step (classification only)."""
    optimizer = sgd(model)
    teacher = copy.deepcopy(model).eval()
    for step, window in enumerate(windows):
        optimizer.zero_grad()
        kls = []
        scored = sum(int(m["labels"][:, 1:].ne(-100).sum()) for m in window) if shift else None
        for m in window:
            out = model(**m)
            if shift:  # causal LM: the model's loss is normalized over the window's scored tokens (Trainer's count)
                loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), m["labels"][:, 1:].flatten(), reduction="sum")
                loss = loss / scored
            else:
                loss = out.loss / len(window)
            if step / steps_per_epoch >= start:
                with torch.no_grad():
                    target = teacher(input_ids=m["input_ids"]).logits
                if shift:
                    mask = m["labels"][:, 1:].ne(-100)
                    per_token = kl(out.logits[:, :-1], target[:, :-1], tau)
                    loss = loss + lam * tau**2 * per_token[mask].sum() / scored
                else:
                    per_example = kl(out.logits, target, tau)
                    kls += per_example.detach().tolist()
                    loss = loss + lam * tau**2 * per_example.mean() / len(window)
            loss.backward()
        optimizer.step()
        if trace is not None:
            trace.append(kls)
        d = min(decay, (1 + step) / (10 + step)) if warmup else decay
        with torch.no_grad():
            for v, w in zip(teacher.parameters(), model.parameters()):
                v.mul_(d).add_(w, alpha=1 - d)
    return model, teacher


# With two classes the term's gradient is a multiple of the margin's gradient (docs/methods.md#on-two-classes): the run
# is told once, by name, which methods paid there; three classes say nothing.
@pytest.mark.parametrize("method", ["saf", "mesa"])
@pytest.mark.parametrize("num_labels", [2, 3])
def test_a_two_class_head_is_warned_about_once_naming_the_methods_that_paid(tmp_path, method, num_labels):
    from transformers.testing_utils import CaptureLogger

    from hf_sam import loss_term

    data = tiny_dataset(8).map(lambda row: {"labels": row["labels"] % num_labels})
    with CaptureLogger(loss_term.logger) as captured:
        trainer = train(tmp_path, tiny_bert(num_labels=num_labels), data, max_steps=-1, num_train_epochs=2,
                        per_device_train_batch_size=2, sam_method=method)  # fmt: skip
    assert sum(f"{method}/kl" in h for h in trainer.state.log_history) >= 2  # the term ran on several steps
    assert captured.out.count("two-class head") == (1 if num_labels == 2 else 0)
    if num_labels == 2:
        assert f"sam_method={method!r}" in captured.out and "--sam_method sam, ssam-f or esam" in captured.out


def test_mesa_matches_hand_written_ema_teacher_loop(tmp_path):
    data = tiny_dataset(8)
    model = tiny_bert()
    windows = [[b] for b in batches(data, 2)] * 2  # 2 epochs of 4 steps
    reference, teacher = reference_mesa(copy_model(model), windows, lam=0.8, tau=2.0, decay=0.5, start=0.5,
                                        steps_per_epoch=4)  # fmt: skip
    trainer = train(tmp_path, model, data, max_steps=8, per_device_train_batch_size=2, sam_method="mesa",
                    mesa_lambda=0.8, mesa_tau=2.0, mesa_ema_decay=0.5, mesa_start_epoch=0.5)  # fmt: skip
    assert not trainer._sam.loss_term.ema_warmup  # unset: off for a classifier
    assert_same_weights(state(trainer.model), state(reference), exact=False, atol=1e-5)
    ema = trainer._sam.loss_term.teacher
    assert_same_weights(dict(zip(ema.names, ema.ema)), state(teacher), exact=False, atol=1e-5)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [("mesa/kl" in h, h["sam/passes_per_step"]) for h in logs] == [(False, 1.0)] * 2 + [(True, 1.333333)] * 6
    plain, _ = reference_mesa(copy_model(tiny_bert()), windows, lam=0.0, tau=2.0, decay=0.5, start=0.5,
                              steps_per_epoch=4)  # fmt: skip
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(state(plain).values(), state(reference).values()))


def test_mesa_kl_of_a_teacher_near_the_student_is_logged_to_its_significant_digits(tmp_path):
    # Each logged mean was rounded to 6 decimals: while the teacher is near the student (the first steps, or at the
    # default decay of 0.999 for long) the KL is small, and mesa/kl read 1e-06 and 9e-06 for 9.8e-07 and 8.7e-06.
    data = tiny_dataset(8)
    model = tiny_bert()
    trace = []
    reference_mesa(copy_model(model), [[b] for b in batches(data, 2)], lam=0.8, tau=10.0, decay=0.5, start=0.0,
                   steps_per_epoch=4, trace=trace)  # fmt: skip
    trainer = train(tmp_path, model, data, max_steps=4, per_device_train_batch_size=2, sam_method="mesa",
                    mesa_lambda=0.8, mesa_tau=10.0, mesa_ema_decay=0.5)  # fmt: skip
    logged = [h["mesa/kl"] for h in trainer.state.log_history if "mesa/kl" in h]
    expected = [sum(kls) / len(kls) for kls in trace]
    assert 5e-7 < expected[1] < 5e-5  # small, but no rounding noise: the test can fail
    # Both in float32: the hand loop's KL of the first step, where teacher and student are the same, is 2e-8.
    assert logged == pytest.approx(expected, rel=1e-3, abs=5e-8)


def test_mesa_warmed_up_teacher_matches_hand_loop_and_follows_the_recent_weights(tmp_path):
    data = tiny_dataset(8)
    windows = [[b] for b in batches(data, 2)] * 2  # 2 epochs of 4 steps
    common = dict(lam=0.8, tau=2.0, decay=0.999, start=0.0, steps_per_epoch=4)
    reference, teacher = reference_mesa(copy_model(tiny_bert()), windows, warmup=True, **common)
    trainer = train(tmp_path, tiny_bert(), data, max_steps=8, per_device_train_batch_size=2, sam_method="mesa",
                    mesa_lambda=0.8, mesa_tau=2.0, mesa_ema_warmup=True)  # fmt: skip
    assert_same_weights(state(trainer.model), state(reference), exact=False, atol=1e-5)
    ema = trainer._sam.loss_term.teacher
    assert_same_weights(dict(zip(ema.names, ema.ema)), state(teacher), exact=False, atol=1e-5)
    # Its defining property: after 8 steps at beta 0.999 the plain teacher is still ~99% the starting model; the
    # warmed-up one (decay 0.1 ... 0.47) sits nearer the trained weights than the start.
    start, trained = state(tiny_bert()), state(trainer.model)
    name = next(n for n in ema.names if "classifier" in n and n.endswith("weight"))
    averaged = dict(zip(ema.names, ema.ema))[name]
    assert (averaged - trained[name]).norm() < (averaged - start[name]).norm()
    _, plain = reference_mesa(copy_model(tiny_bert()), windows, **common)
    assert (state(plain)[name] - start[name]).norm() < (state(plain)[name] - trained[name]).norm()


def test_mesa_token_level_matches_hand_loop_and_normalizes_over_the_window(tmp_path):
    data = lm_dataset()
    model = tiny_llama()
    micro = [
        {"input_ids": torch.tensor(data[i : i + 2]["input_ids"]), "labels": torch.tensor(data[i : i + 2]["labels"])}
        for i in range(0, 8, 2)
    ]
    windows = [micro[k : k + 2] for k in (0, 2)] * 2
    hand = dict(lam=0.8, tau=2.0, decay=0.5, start=0.0, steps_per_epoch=2, shift=True)
    # mesa_ema_warmup unset is on for a causal LM (the teacher follows the recent weights), off when set False.
    reference, _ = reference_mesa(copy_model(model), windows, warmup=True, **hand)
    plain, _ = reference_mesa(copy_model(model), windows, warmup=False, **hand)
    common = dict(max_steps=4, sam_method="mesa", mesa_lambda=0.8, mesa_tau=2.0, mesa_ema_decay=0.5)
    # Llama takes num_items_in_batch: Trainer normalizes over the window's scored tokens, and so does the term.
    ga = train(tmp_path / "ga", model, data, per_device_train_batch_size=2, gradient_accumulation_steps=2, **common)
    assert ga.args.mesa_ema_warmup is None and ga._sam.loss_term.ema_warmup
    assert_same_weights(state(ga.model), state(reference), exact=False, atol=1e-5)
    whole = train(tmp_path / "b4", tiny_llama(), data, per_device_train_batch_size=4, **common)
    assert_same_weights(state(ga.model), state(whole.model), exact=False, atol=1e-5)
    off = train(tmp_path / "off", tiny_llama(), data, per_device_train_batch_size=4, mesa_ema_warmup=False, **common)
    assert_same_weights(state(off.model), state(plain), exact=False, atol=1e-5)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(state(plain).values(), state(reference).values()))


def test_mesa_kl_is_logged_as_the_mean_over_the_windows_scored_tokens(tmp_path):
    # mesa/kl averaged per-micro-batch means: with GA 2 over micro-batches of 9 and 5 scored tokens the step's log was
    # not the mean over its 14 tokens, which batch 4 without accumulation logs for the same step.
    common = dict(max_steps=2, sam_method="mesa", mesa_lambda=0.8, mesa_tau=1.0, mesa_ema_decay=0.5, logging_steps=1,
                  learning_rate=0.3, optimizer=False)  # fmt: skip
    data = lm_dataset()
    ga = train(tmp_path / "ga", tiny_llama(), data, per_device_train_batch_size=2, gradient_accumulation_steps=2,
               **common)  # fmt: skip
    whole = train(tmp_path / "b4", tiny_llama(), data, per_device_train_batch_size=4, **common)

    def logged(trainer):
        return [h["mesa/kl"] for h in trainer.state.log_history if "mesa/kl" in h]

    assert len(logged(whole)) == 2 and logged(whole)[1] > 1e-3  # the teacher left the student at the second step
    assert logged(ga) == pytest.approx(logged(whole), rel=1e-4, abs=1e-9)


def _cross_entropy_mean(outputs, labels, num_items_in_batch=None):
    """A `compute_loss_func` that returns its own mean, ignoring the count it is given."""
    return F.cross_entropy(outputs.logits, labels)


@pytest.mark.parametrize("mean_from", ["model", "compute_loss_func"])
@pytest.mark.parametrize("method", ["saf", "mesa"])
def test_the_term_keeps_its_weight_against_the_loss_of_a_model_that_returns_its_own_mean(tmp_path, method, mean_from):
    # BERT's classification head takes **kwargs, so Trainer passes num_items_in_batch and skips its 1/GA, but returns
    # its own mean: under GA 2 Trainer sums the two micro-batch means (twice the batch-4 loss), while the term was
    # normalized over the window's examples, at half its weight against that loss. Both follow the loss's scale now:
    # GA 2 at half the learning rate is the batch-4 run. Trainer skips its 1/GA for any `compute_loss_func` too, also
    # one that returns its own mean (MESA's term had half its weight there: weights 0.018 apart after 4 steps).
    def model():
        bert = tiny_bert()
        bert.accepts_loss_kwargs = mean_from == "model"  # transformers' default for this model: True
        return bert

    common = dict(sam_method=method, optim="sgd", **({"num_train_epochs": 3} if method == "saf" else {"max_steps": 4}))
    if method == "mesa":
        common.update(mesa_ema_decay=0.5)
    if mean_from == "compute_loss_func":
        common["trainer_cls"] = functools.partial(SequentialSAMTrainer, compute_loss_func=_cross_entropy_mean)
    data = tiny_dataset(8)
    whole = train(tmp_path / "b4", model(), data, optimizer=False, per_device_train_batch_size=4, learning_rate=0.1,
                  **common)  # fmt: skip
    ga = train(tmp_path / "ga", model(), data, optimizer=False, per_device_train_batch_size=2,
               gradient_accumulation_steps=2, learning_rate=0.05, **common)  # fmt: skip
    assert_same_weights(state(ga.model), state(whole.model), exact=False, atol=1e-6)
    assert ga._sam.loss_ignores_item_count is True


def test_mesa_teacher_shares_frozen_weights_under_lora_and_runs_the_class_forward(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    trainer = train(tmp_path, model, tiny_dataset(8), optimizer=False, sam_method="mesa", max_steps=2, bf16=True)
    teacher = trainer._sam.loss_term.teacher
    assert teacher.names and all(name in dict(model.named_parameters()) for name in teacher.names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(teacher.names)
    for (name, p), (_, v) in zip(model.named_parameters(), teacher.module.named_parameters()):
        assert (v is p) == (not p.requires_grad), name  # the frozen base is shared, adapters are averaged copies
    # accelerate's autocast wrapper of the model's forward is not copied (it would call the student).
    assert "forward" not in teacher.module.__dict__ and not teacher.module.training
    assert set(trainer.sam_state_dict()) == {f"loss_term.mesa_ema.{n}" for n in teacher.names}


def test_mesa_on_an_encoder_decoder_feeds_the_teacher_its_labels(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from hf_sam import SAMSeq2SeqTrainer, SAMSeq2SeqTrainingArguments

    torch.manual_seed(0)
    config = T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(2, 40, (8, 4), generator=generator)
    labels[::2, -1] = -100
    data = Dataset.from_dict({"input_ids": torch.randint(2, 40, (8, 6), generator=generator).tolist(),
                              "labels": labels.tolist()})  # fmt: skip
    args = SAMSeq2SeqTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=3,
                                       per_device_train_batch_size=4, save_strategy="no", logging_steps=1,
                                       learning_rate=0.05, sam_method="mesa", mesa_ema_decay=0.5)  # fmt: skip
    trainer = SAMSeq2SeqTrainer(model=T5ForConditionalGeneration(config), args=args, train_dataset=data)
    trainer.train()
    kls = [h["mesa/kl"] for h in trainer.state.log_history if "mesa/kl" in h]
    # At the first step the teacher is the student: a KL of float32 rounding noise (-1.8e-08 here, T5 in eval and in
    # train mode), where the next steps' are above 1e-4.
    assert len(kls) == 3 and abs(kls[0]) < 1e-5 and all(math.isfinite(k) and k > 1e-4 for k in kls[1:])


# ---------------------------------------------------------------------- cost: one pass


class CountingTrainer(SequentialSAMTrainer):
    compute_loss_calls = 0

    def compute_loss(self, *args, **kwargs):
        CountingTrainer.compute_loss_calls += 1
        return super().compute_loss(*args, **kwargs)


@pytest.mark.parametrize("method", ["saf", "mesa"])
def test_one_pass_per_micro_batch(tmp_path, method):
    CountingTrainer.compute_loss_calls = 0
    model = tiny_bert()
    calls = {"student": 0, "other": 0, "backward": 0}

    def count(key):
        calls[key] += 1

    model.register_forward_hook(lambda m, i, o: count("student" if m is model else "other"))
    model.classifier.weight.register_hook(lambda g: count("backward"))
    trainer = train(tmp_path, model, tiny_dataset(8), trainer_cls=CountingTrainer, max_steps=-1, num_train_epochs=2,
                    per_device_train_batch_size=2, gradient_accumulation_steps=2, sam_method=method,
                    saf_start_epoch=0.0)  # fmt: skip
    micro_batches = 8
    assert trainer.state.global_step == 4
    assert CountingTrainer.compute_loss_calls == calls["student"] == calls["backward"] == micro_batches
    # SAF: nothing else; MESA: one no-grad teacher forward per micro-batch (the copy keeps the hook).
    assert calls["other"] == (micro_batches if method == "mesa" else 0)
    assert trainer._sam.perturbation is None  # the SAM machinery never ran


class _OwnLossTrainer(SequentialSAMTrainer):
    """A subclass whose compute_loss computes the loss itself, never reaching SAMMixin.compute_loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits, labels)
        return (loss, outputs) if return_outputs else loss


# SAF and MESA add their term in SAMMixin.compute_loss: an override in front of it that does not call it would run
# MESA as the plain Trainer without a word, and feed SAF's index column to the model (a TypeError from its forward).
@pytest.mark.parametrize("method", ["saf", "mesa"])
def test_a_compute_loss_override_that_bypasses_the_term_is_refused_before_any_update(tmp_path, method):
    model = tiny_bert()
    before = state(model)
    with pytest.raises(ValueError, match=f"sam_method='{method}'.*_OwnLossTrainer.compute_loss.*super"):
        train(tmp_path, model, tiny_dataset(8), trainer_cls=_OwnLossTrainer, sam_method=method, max_steps=2)
    assert_same_weights(before, state(model))


# ---------------------------------------------------------------------- arguments


def test_presets_and_validation():
    def make(**kw):
        return SAMTrainingArguments(output_dir="/tmp/x", use_cpu=True, report_to="none", **kw)

    saf, mesa = make(sam_method="saf"), make(sam_method="mesa")
    assert (saf.sam_loss_term, saf.sam_rho, saf.sam_enabled) == ("saf", 0.0, False)
    assert (saf.saf_lambda, saf.saf_tau, saf.saf_lag_epochs, saf.saf_start_epoch) == (2.4, 5.0, 1, 1.0)
    assert (mesa.mesa_lambda, mesa.mesa_tau, mesa.mesa_ema_decay, mesa.mesa_start_epoch) == (2.4, 5.0, 0.999, 0.0)
    assert mesa.mesa_ema_warmup is None  # unset: on for causal LMs only (the token-level test)
    assert make(sam_method="sam").sam_loss_term == "none"
    bad = [
        ({"saf_lambda": 0.0}, "saf_lambda"),
        ({"saf_tau": math.inf}, "saf_tau"),
        ({"mesa_tau": -1.0}, "mesa_tau"),
        ({"saf_lag_epochs": 0}, "saf_lag_epochs"),
        ({"saf_lag_epochs": 1.5}, "saf_lag_epochs"),
        ({"mesa_ema_decay": 1.0}, "mesa_ema_decay"),
        ({"sam_method": "mesa", "mesa_ema_warmup": "yes"}, "mesa_ema_warmup"),
        ({"saf_start_epoch": -1.0}, "saf_start_epoch"),
        ({"sam_method": "saf", "sam_rho": 0.05}, "sam_rho"),
        ({"sam_method": "mesa", "sam_schedule": "constant"}, "sam_schedule"),
        ({"sam_method": "none", "sam_loss_term": "saf"}, "--sam_method saf"),
        ({"sam_method": "sam", "sam_loss_term": "mesa"}, "sam_rho"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            make(**kwargs)
    parser = HfArgumentParser(SAMTrainingArguments)
    (parsed,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "/tmp/x", "--sam_method", "saf", "--saf_lag_epochs", "2", "--saf_start_epoch", "2.5"]
    )
    assert (parsed.sam_loss_term, parsed.saf_lag_epochs, parsed.saf_start_epoch) == ("saf", 2, 2.5)
    assert "--mesa_ema_decay" in parser.format_help()


def test_logit_bank_state_round_trip():
    bank = LogitBank(5, lag=1, device=torch.device("cpu"))
    logits = torch.randn(2, 3)
    bank.record(logits, torch.tensor([4, 1]), epoch=0)
    target, found = bank.lookup(torch.zeros(3, 3), torch.tensor([1, 2, 4]), epoch=1)
    assert found.tolist() == [True, False, True] and torch.equal(target[[0, 2]], logits[[1, 0]])
    # Padding rows of an all-gather carry index N (= 5): recorded nowhere in the state.
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    bank.record(torch.randn(2, 3), torch.tensor([5, 5]), epoch=0)
    assert all(torch.equal(v, bank.state_dict()[k]) for k, v in before.items())
    other = LogitBank(5, lag=1, device=torch.device("cpu"))
    other.load_state_dict({k: v.clone() for k, v in bank.state_dict().items()})
    assert torch.equal(other.bank, bank.bank) and torch.equal(other.written, bank.written)
    with pytest.raises(ValueError, match="saf_lag_epochs"):
        LogitBank(5, lag=2, device=torch.device("cpu")).load_state_dict(bank.state_dict())
    # Another training-set size is refused too (docs/methods.md#saf), either way round.
    for examples in (4, 6):
        with pytest.raises(ValueError, match="training set"):
            LogitBank(examples, lag=1, device=torch.device("cpu")).load_state_dict(bank.state_dict())


def test_saf_bank_does_not_record_non_finite_logits():
    bank = LogitBank(4, lag=1, device=torch.device("cpu"))
    logits = torch.tensor([[1.0, 2.0], [math.inf, 0.0], [math.nan, 1.0], [0.5, 0.5]])
    bank.record(logits, torch.arange(4), epoch=0)
    assert bool(torch.isfinite(bank.bank).all())
    _, found = bank.lookup(torch.zeros(4, 2), torch.arange(4), epoch=1)
    assert found.tolist() == [True, False, False, True]  # the overflowed examples have no target yet


class ScalerSAF(SequentialSAMTrainer):
    """A real CPU GradScaler (as tests/test_trainer.py's ScalerTrainer), and the classifier's output overflowing at
    one step."""

    def __init__(self, *args, poison_step=1, **kwargs):
        super().__init__(*args, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        self.accelerator.scaler = scaler
        self.accelerator.unscale_gradients = lambda optimizer=None: [
            scaler.unscale_(opt.optimizer) for opt in self.accelerator._optimizers
        ]

        def overflow(module, inputs, output):
            if module.training and self.state.global_step == poison_step and torch.is_grad_enabled():
                return output * math.inf

        self.model.classifier.register_forward_hook(overflow)


def test_an_overflowed_batch_costs_saf_one_skipped_step_and_its_checkpoints_resume(tmp_path):
    common = dict(sam_method="saf", saf_start_epoch=0.0, max_steps=8, learning_rate=0.01)
    first = ScalerSAF(model=tiny_bert(), train_dataset=tiny_dataset(16),
                      args=sam_args(tmp_path, save_strategy="steps", save_steps=5, **common))  # fmt: skip
    first.train()
    assert first.accelerator.scaler.get_scale() == 2.0**9  # one skipped step, as the plain Trainer's
    assert bool(torch.isfinite(first._sam.loss_term.bank.bank).all())
    resumed = ScalerSAF(model=tiny_bert(), train_dataset=tiny_dataset(16), args=sam_args(tmp_path, **common))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    assert resumed.state.global_step == 8


# MESA's EMA teacher under bf16 weights: v <- 0.999 v + 0.001 w must not round away.
class Float32EMA(TrainerCallback):
    """The teacher's recursion by hand, in float32, on the student's (bf16) weights after each optimizer step."""

    def __init__(self, model, decay):
        self.decay = decay
        self.average = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for name, p in model.named_parameters():
            self.average[name].lerp_(p.detach().float(), 1 - self.decay)


def test_mesa_teacher_with_bf16_weights_follows_the_float32_average(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert().to(torch.bfloat16)
    trainer = SequentialSAMTrainer(
        model=model,
        args=sam_args(tmp_path, sam_method="mesa", bf16=True, max_steps=40, num_train_epochs=100,
                      learning_rate=1e-4, logging_steps=1000),
        train_dataset=tiny_dataset(),
    )  # fmt: skip
    reference = Float32EMA(model, trainer.args.mesa_ema_decay)
    trainer.add_callback(reference)
    trainer.train()
    teacher = trainer._sam.loss_term.teacher
    for name, v in zip(teacher.names, teacher.ema):
        assert v.dtype == torch.bfloat16  # the teacher model itself stays in the weights' dtype
        # Its weights are the float32 average rounded once to bf16, not a bf16 recursion that drops the updates.
        torch.testing.assert_close(v.float(), reference.average[name].to(torch.bfloat16).float(), atol=0, rtol=0)
    # The checkpointed state is the float32 average, so a resume continues it exactly.
    saved = trainer._sam.state_dict()
    for name in teacher.names:
        torch.testing.assert_close(saved[f"loss_term.mesa_ema.{name}"], reference.average[name], atol=1e-7, rtol=0)


def test_mesa_teacher_update_of_bf16_weights_holds_no_float32_copy_of_the_whole_model():
    # The float32 average follows bf16 weights upcast one tensor at a time, not a float32 copy of them all per step.
    from hf_sam.mesa import EMATeacher

    model = tiny_bert().to(torch.bfloat16)
    teacher = EMATeacher(model)
    with PeakNewTensorBytes() as counted:
        teacher.update(0.999)
    sizes = [4 * p.numel() for p in model.parameters()]
    assert counted.peak <= max(sizes) < sum(sizes) / 4


def test_sharded_mesa_teacher_keeps_a_float32_average_of_bf16_shards():
    # FSDP2's teacher (no second model: the EMA is copied into the model's own shards for the forward) on bf16
    # weights. On a model that is not sharded its shards are the weights themselves, so this runs its bf16 branch
    # in one process: the average follows the float32 recursion, and its forward is the model at that average
    # rounded once to bf16, after which the student's weights are back bit for bit.
    from hf_sam.mesa import EMATeacher, ShardedEMATeacher

    model = tiny_bert().to(torch.bfloat16)
    sharded, plain = ShardedEMATeacher(model), EMATeacher(model)
    reference = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    for _ in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype), alpha=1e-3)
        for teacher in (sharded, plain):
            teacher.update(0.999)
        for name, p in model.named_parameters():
            reference[name].lerp_(p.detach().float(), 1 - 0.999)
    for name, average in zip(sharded.names, sharded.average):
        assert average.dtype == torch.float32
        torch.testing.assert_close(average, reference[name], atol=1e-7, rtol=0)
    model.train()
    student = [p.detach().clone() for p in model.parameters()]
    inputs = {"input_ids": torch.randint(0, 50, (4, 8), generator=generator)}
    assert torch.equal(sharded(inputs).logits, plain(inputs).logits)
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), student))
    assert model.training  # the forward ran in eval mode and gave the student back its training mode


def test_mesa_on_a_prompt_tuned_causal_lm_compares_the_positions_peft_scores(tmp_path):
    # PEFT's prompt tuning puts its virtual tokens in front of the input, so student and teacher logits have that many
    # positions more than the batch's labels; PEFT scores them against the labels with as many -100 in front. MESA
    # compared them with the batch's labels and refused the run ("logits (4, 10, 19) do not match labels (4, 7)").
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    data = lm_dataset(4)
    args = sam_args(tmp_path, sam_method="mesa", mesa_lambda=0.8, mesa_tau=2.0)
    trainer = SequentialSAMTrainer(model=model, train_dataset=data, args=args)
    trainer._sam_loss_term_build()
    term = trainer._sam.loss_term
    with torch.no_grad():  # a teacher that differs from the student, so the term is not 0
        term.teacher.average[0].add_(torch.randn_like(term.teacher.average[0]))
    batch = {key: torch.tensor(data[key]) for key in ("input_ids", "labels")}
    teacher_logits = term.prepare(batch)
    with capture_pass(model, hidden_state=True) as captured:
        model(**batch)
    got = term.term(batch, captured, None, teacher_logits, None)
    labels = F.pad(batch["labels"], (3, 0), value=-100)[:, 1:]  # as PEFT's forward scores the logits
    per_token = kl(captured.output.logits[:, :-1], teacher_logits[:, :-1], 2.0)[labels.ne(-100)]
    assert per_token.numel() == int(batch["labels"].ne(-100).sum())
    torch.testing.assert_close(got, 0.8 * 2.0**2 * per_token.mean())
