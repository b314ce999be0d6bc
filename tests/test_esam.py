"""ESAM: the SWP draw, real skipping of weight gradients, the SDS selection (per class, or k = max(1, ceil(gamma
|B|)) over the batch), per-example losses."""

import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_sam.esam import ESAM, frozen_tensors, kept_tensors, per_example_loss, selected_count, top_rise_per_class
from tests.helpers import SequentialSAMTrainer, assert_same_weights, sam_args, state, tiny_bert, tiny_dataset


def test_swp_keeps_each_tensor_with_probability_beta_and_the_same_draw_everywhere():
    draws = [kept_tensors(40, 0.6, seed=0, step=t) for t in range(500)]
    share = sum(sum(d) for d in draws) / (40 * 500)
    assert abs(share - 0.6) < 3 * math.sqrt(0.6 * 0.4 / (40 * 500))
    torch.manual_seed(99)  # the global RNG plays no part: every rank draws the same
    assert kept_tensors(40, 0.6, seed=0, step=3) == draws[3]
    assert all(any(kept_tensors(3, 0.01, seed=0, step=t)) for t in range(50))  # never an empty ascent


def test_dropped_tensors_get_no_weight_gradient():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    params = list(model.parameters())
    keep = [True, False, False, True]
    with frozen_tensors(params, keep):
        model(torch.randn(5, 4)).sum().backward()
    assert [p.grad is not None for p in params] == keep
    assert all(p.requires_grad for p in params)  # put back after the block


@pytest.mark.parametrize("batch, gamma, k", [(1, 0.5, 1), (3, 0.5, 2), (4, 0.5, 2), (5, 0.1, 1), (8, 1.0, 8)])
def test_selected_count_is_ceil_of_gamma_batch(batch, gamma, k):
    assert selected_count(batch, gamma) == k


def test_descent_runs_on_the_selected_examples_only(tmp_path):
    sizes = []

    class Recording(SequentialSAMTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            sizes.append((len(inputs["labels"]), torch.is_grad_enabled()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    trainer = Recording(model=tiny_bert(), train_dataset=tiny_dataset(), args=sam_args(
        tmp_path, sam_method="esam", esam_gamma=0.3, esam_selection="batch", per_device_train_batch_size=5,
        max_steps=2))  # fmt: skip
    trainer.train()
    # per step: the clean pass on all 5 examples, the no-grad scoring forward at w + eps (through the trainer's own
    # loss, as the clean pass), then the descent on ceil(0.3 * 5) = 2
    assert sizes == [(5, True), (5, False), (2, True)] * 2


def test_per_class_selection_keeps_each_class_share():
    # Hand loop: for each class, its ceil(gamma n_c) examples of largest rise. Class ids of any size.
    torch.manual_seed(0)
    rise, labels = torch.randn(40), torch.tensor([7, -3, 1000, 7, 7] * 8)
    chosen = top_rise_per_class(rise, labels, 0.3)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        expected = members[torch.topk(rise[members], math.ceil(0.3 * len(members))).indices]
        assert set(chosen[labels[chosen] == c].tolist()) == set(expected.tolist())
    assert len(chosen) == len(set(chosen.tolist())) == 3 + 3 + 8


def test_per_class_selection_reads_only_its_size_on_the_host():
    # The subset's size depends on the labels, so reading it is the selection's one host sync per micro-batch on an
    # accelerator; torch.unique and torch.bincount each added another (docs/methods.md#esam).
    from tests.helpers import HostSyncs

    rise, labels = torch.randn(40), torch.tensor([7, -3, 1000, 7, 7] * 8)
    with HostSyncs(lambda: "select") as syncs:
        top_rise_per_class(rise, labels, 0.3)
    assert dict(syncs.counts) == {("select", "esam.py:top_rise_per_class"): 1}


def test_batch_ranking_drops_a_class_that_per_class_ranking_keeps():
    # The failure this guards against (docs/methods.md#esam): the rise is mostly first order, so one class can sit
    # below every other; ranked over the batch it never reaches the descent.
    rise, labels = torch.tensor([3.0, 2.5, 2.0, 1.5, 0.2, 0.1]), torch.tensor([0, 0, 1, 1, 2, 2])
    args = SimpleNamespace(esam_gamma=0.5, esam_selection="batch", esam_swp=False)
    assert set(labels[ESAM(args, []).select(rise, labels)].tolist()) == {0, 1}
    args.esam_selection = "per_class"
    assert set(labels[ESAM(args, []).select(rise, labels)].tolist()) == {0, 1, 2}
    # Token labels (one row per example) are not class ids: ranked over the batch.
    tokens = torch.zeros(6, 4, dtype=torch.long)
    assert len(ESAM(args, []).select(rise, tokens)) == 3


def test_batch_selection_matches_reference(tmp_path):
    from tests.test_trainer import train_with_reference

    trainer, reference_model, _ = train_with_reference(
        tmp_path, "sgd", 2, "window", {"sam_method": "esam", "esam_gamma": 0.5, "esam_selection": "batch"},
        {"rho": 0.03, "esam_beta": 0.6, "esam_gamma": 0.5, "esam_selection": "batch"},
    )  # fmt: skip
    assert_same_weights(state(trainer.model), state(reference_model), exact=False, atol=1e-6)


def test_per_example_losses_by_head():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 0])
    torch.testing.assert_close(
        per_example_loss(logits, labels, False), F.cross_entropy(logits, labels, reduction="none")
    )
    reg = torch.randn(4, 1)
    torch.testing.assert_close(per_example_loss(reg, torch.randn(4), False).shape, torch.Size([4]))
    tokens = torch.randn(2, 5, 7)
    token_labels = torch.tensor([[1, 2, -100, 3, -100], [4, -100, -100, -100, 5]])
    expected = torch.stack([
        F.cross_entropy(tokens[i][token_labels[i] != -100], token_labels[i][token_labels[i] != -100]) for i in range(2)
    ])  # fmt: skip
    torch.testing.assert_close(per_example_loss(tokens, token_labels, False), expected)
    shifted = per_example_loss(tokens, token_labels, True)  # causal LM: logits t predict labels t + 1
    torch.testing.assert_close(shifted, per_example_loss(tokens[:, :-1], token_labels[:, 1:], False))
    with pytest.raises(ValueError, match="per_example_loss"):
        per_example_loss(torch.randn(2, 3, 4, 5), torch.zeros(2, 3), False)


# transformers' classification heads train float targets of more than one output with BCEWithLogitsLoss (multi-label,
# also an unset problem_type) and with MSE only for problem_type="regression". Multi-label examples used to be scored
# by MSE on the raw logits: their mean was not the model's loss (0.670 against 0.694), a logit moving towards its
# 0/1 target could count as a rise, and sam/sharpness mixed a BCE clean loss with an MSE rise.
@pytest.mark.parametrize("problem_type", [None, "multi_label_classification", "regression"])
def test_per_example_losses_of_multi_output_heads_average_to_the_models_loss(tmp_path, problem_type):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    targets = torch.rand(16, 3, generator=generator)
    targets = targets.round() if problem_type != "regression" else targets * 4 - 2
    data = Dataset.from_dict({"input_ids": torch.randint(1, 30, (16, 8), generator=generator).tolist(),
                              "labels": targets.tolist()})  # fmt: skip
    model = tiny_bert(num_labels=3)
    model.config.problem_type = problem_type
    gaps = []

    class Recording(SequentialSAMTrainer):
        def per_example_loss(self, outputs, inputs):
            losses = super().per_example_loss(outputs, inputs)
            gaps.append(float((losses.mean() - outputs.loss).abs()))
            return losses

    trainer = Recording(model=model, train_dataset=data,
                        args=sam_args(tmp_path, sam_method="sam", esam_gamma=0.5, max_steps=2))  # fmt: skip
    trainer.train()
    assert len(gaps) == 4 and max(gaps) < 1e-5, gaps  # at w and at w + eps, each step


# With label smoothing Trainer trains (and logs) the smoothed loss, but examples were scored by plain cross-entropy:
# the selection ranked another loss's rise, and sam/perturbed_loss added a cross-entropy rise to a smoothed clean
# loss (1.270 where the smoothed loss at w + eps was 1.228, factor 0.3, rho 0.5).
@pytest.mark.parametrize("architecture", ["classifier", "causal_lm"])
def test_per_example_losses_under_label_smoothing_average_to_the_trainers_loss(tmp_path, architecture):
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    data, model = tiny_dataset(16), tiny_bert()
    if architecture == "causal_lm":
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(2, 40, (16, 6), generator=generator)
        labels = ids.clone()
        for i, row in enumerate(labels):  # a different number of scored tokens per example
            row[2 + i % 4 :] = -100
        data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16))
        model.accepts_loss_kwargs = False
    gaps = []

    class Recording(SequentialSAMTrainer):
        def per_example_loss(self, outputs, inputs):
            losses = super().per_example_loss(outputs, inputs)
            trainers = self.label_smoother(outputs, inputs["labels"], shift_labels=architecture == "causal_lm")
            # Trainer's loss is the mean over scored tokens: each example's mean counts by its number of them.
            weights = torch.ones_like(losses)
            if architecture == "causal_lm":
                weights = (inputs["labels"][:, 1:] != -100).sum(-1).float()
            gaps.append(float(((losses * weights).sum() / weights.sum() - trainers).abs()))
            return losses

    trainer = Recording(model=model, train_dataset=data, args=sam_args(
        tmp_path, sam_method="sam", esam_gamma=0.5, label_smoothing_factor=0.3, max_steps=2))  # fmt: skip
    trainer.train()
    assert len(gaps) == 4 and max(gaps) < 1e-5, gaps  # at w and at w + eps, each step


def test_trainer_per_example_loss_reads_logits_from_any_output_form(tmp_path):
    # A tuple (loss, logits) from return_dict=False: the logits, not the scalar loss, are scored.
    trainer = SequentialSAMTrainer(model=tiny_bert(), train_dataset=tiny_dataset(),
                                   args=sam_args(tmp_path, sam_method="esam"))  # fmt: skip
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    expected = F.cross_entropy(logits, labels, reduction="none")
    for outputs in ({"logits": logits}, (torch.tensor(1.0), logits), (logits,)):
        torch.testing.assert_close(trainer.per_example_loss(outputs, {"labels": labels}), expected)
    assert trainer._sam_loss_shifts_labels() is False  # a sequence classifier scores unshifted labels


def test_per_example_losses_of_another_shape_than_the_batch_are_refused(tmp_path):
    # A host whose loss is not per example (DPO's preference pairs: chosen and rejected stacked) would otherwise
    # select rows of nothing and silently run the descent on the whole batch.
    class PairLosses(SequentialSAMTrainer):
        def per_example_loss(self, outputs, inputs):
            return super().per_example_loss(outputs, inputs).repeat(2)

    trainer = PairLosses(model=tiny_bert(), train_dataset=tiny_dataset(), args=sam_args(
        tmp_path, sam_method="esam", esam_gamma=0.5, per_device_train_batch_size=4, max_steps=1))  # fmt: skip
    with pytest.raises(ValueError, match="one loss per example"):
        trainer.train()


# Trainer does not divide a compute_loss_func's loss by GA: the subset pass, whose loss is its own mean, must
# still be divided, or the same loss gives GA times the gradient.
def ce_window(outputs, labels, num_items_in_batch=None):
    loss = F.cross_entropy(outputs.logits, labels, reduction="sum")
    return loss / num_items_in_batch if num_items_in_batch is not None else loss / labels.numel()


@pytest.mark.parametrize("ga", [1, 2])
def test_esam_selection_with_a_compute_loss_func_matches_the_models_loss(tmp_path, ga):
    runs = []
    for name, kwargs in (("model", {}), ("func", {"compute_loss_func": ce_window})):
        trainer = SequentialSAMTrainer(
            model=tiny_bert(),
            args=sam_args(
                tmp_path / name,
                sam_method="esam",
                esam_gamma=0.5,
                esam_selection="batch",
                gradient_accumulation_steps=ga,
                per_device_train_batch_size=4 // ga,
                max_steps=3,
                optim="sgd",
                learning_rate=0.5,
            ),
            train_dataset=tiny_dataset(),
            **kwargs,
        )
        trainer.train()
        runs.append(trainer)
    norms = [[h["grad_norm"] for h in t.state.log_history if "grad_norm" in h] for t in runs]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    assert_same_weights(state(runs[0].model), state(runs[1].model), exact=False, atol=1e-5)
    assert "loss_is_scaled_for_ga" not in vars(runs[1])


def ce_mean(outputs, labels, num_items_in_batch=None):
    return F.cross_entropy(outputs.logits, labels)


# A compute_loss_func that returns its own mean, ignoring the count: Trainer skips its 1/GA for it and sums the
# micro-batch means, twice the loss of the same model loss that it divides by GA. The rise was scaled as a share of the
# window's items: sam/sharpness read 0.0084 where the loss's scale gives 0.0167.
def test_esam_selection_with_a_compute_loss_func_that_returns_its_own_mean(tmp_path):
    runs = []
    # Half the learning rate for twice the loss: the same SGD steps.
    for name, kwargs, lr in (("model", {}, 0.5), ("func", {"compute_loss_func": ce_mean}, 0.25)):
        args = sam_args(tmp_path / name, sam_method="esam", esam_gamma=0.5, esam_selection="batch",
                        gradient_accumulation_steps=2, per_device_train_batch_size=2, max_steps=3, optim="sgd",
                        learning_rate=lr)  # fmt: skip
        trainer = SequentialSAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(), **kwargs)
        trainer.train()
        runs.append(trainer)
    assert_same_weights(state(runs[0].model), state(runs[1].model), exact=False, atol=1e-5)
    model_logs, func_logs = ([h for h in t.state.log_history if "loss" in h] for t in runs)
    for key in ("loss", "sam/sharpness"):
        assert [2 * h[key] for h in model_logs] == pytest.approx([h[key] for h in func_logs], rel=1e-4), key


@pytest.mark.parametrize("accumulation", ["window", "micro"])
def test_data_selection_leaves_the_rng_stream_as_the_plain_trainers(tmp_path, accumulation):
    # The subset's descent pass draws dropout masks for fewer examples than the clean pass: the global RNG, which
    # later dropout and a sampler without a generator of its own (group_by_length) draw from, ended every step
    # elsewhere than Trainer's, and from the second epoch on the data came in another order.
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_sam import SAMTrainer

    class RNGAtStepEnd(TrainerCallback):
        def __init__(self):
            self.states = []

        def on_step_end(self, args, state, control, **kwargs):
            self.states.append(torch.get_rng_state())

    common = dict(
        report_to="none", use_cpu=True, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_train_epochs=2, save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    plain, sam = RNGAtStepEnd(), RNGAtStepEnd()
    Trainer(model=tiny_bert(dropout=0.1), args=TrainingArguments(output_dir=str(tmp_path / "p"), **common),
            train_dataset=tiny_dataset(16), callbacks=[plain]).train()  # fmt: skip
    args = sam_args(tmp_path / "s", **common, max_steps=-1, sam_method="sam", esam_gamma=0.5,
                    sam_accumulation=accumulation)  # fmt: skip
    SAMTrainer(model=tiny_bert(dropout=0.1), args=args, train_dataset=tiny_dataset(16), callbacks=[sam]).train()
    assert len(plain.states) == len(sam.states) == 4
    assert all(torch.equal(a, b) for a, b in zip(plain.states, sam.states))


@pytest.mark.parametrize("same_dropout", [True, False])
def test_data_selection_descent_draws_the_dropout_masks_sam_same_dropout_asks_for(tmp_path, same_dropout):
    # The scoring forward always replays the clean pass's masks (the rise must measure eps, not dropout noise), but
    # the subset's descent pass replayed them too with sam_same_dropout=False: the flag did nothing under data
    # selection (weights bit for bit those of sam_same_dropout=True, 0.35 apart without selection).
    forwards = []  # (grad enabled, RNG state at the forward's start, at its end), in order

    def start(module, args):
        forwards.append([torch.is_grad_enabled(), torch.get_rng_state(), None])

    def end(module, args, output):
        forwards[-1][2] = torch.get_rng_state()

    model = tiny_bert(dropout=0.1)
    model.register_forward_pre_hook(start)
    model.register_forward_hook(end)
    args = sam_args(tmp_path, sam_method="sam", esam_gamma=0.5, sam_same_dropout=same_dropout, max_steps=2)
    SequentialSAMTrainer(model=model, args=args, train_dataset=tiny_dataset()).train()
    assert [grad for grad, _, _ in forwards] == [True, False, True] * 2  # clean, scoring, subset's descent
    for clean, scoring, descent in zip(forwards[0::3], forwards[1::3], forwards[2::3]):
        assert torch.equal(scoring[1], clean[1])  # the clean pass's masks, whatever the flag
        # True: the clean pass's draws again; False: fresh masks, from where the clean pass left the RNG.
        assert torch.equal(descent[1], clean[1] if same_dropout else clean[2])


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's inductor needs a C++ compiler on CPU")
def test_selection_under_torch_compile_scores_with_the_clean_pass_dropout_masks(tmp_path):
    # Inductor draws its own dropout masks (from a seed it takes from the torch generator): the no-grad forward that
    # scores the rise must run the compiled module as the clean pass did, or at rho 0 each example's "rise" is the
    # difference between two dropout masks instead of 0, and the selection picks by that noise.
    trainer = SequentialSAMTrainer(
        model=tiny_bert(dropout=0.1),
        args=sam_args(
            tmp_path, sam_method="esam", esam_swp=False, esam_gamma=0.5, sam_rho=0.0, max_steps=2, torch_compile=True
        ),
        train_dataset=tiny_dataset(),
    )
    trainer.train()
    assert [h["sam/sharpness"] for h in trainer.state.log_history if "sam/sharpness" in h] == [0.0, 0.0]


# T5 and BART take **kwargs (Trainer passes num_items_in_batch on and skips its 1/GA) but return their own mean: the
# clean pass is the micro-batch's mean, not divided by GA. The subset's pass, run without the count, was divided by
# GA: with every example selected its descent was 1/GA of the plain Seq2SeqTrainer's (1/(GA x processes) under DDP,
# where Trainer also multiplies the loss by the processes), and sam/sharpness 1/GA of SAM's.
def test_selection_on_a_model_that_returns_its_own_mean_keeps_trainers_scale(tmp_path):
    from datasets import Dataset
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from hf_sam import SAMSeq2SeqTrainer, SAMSeq2SeqTrainingArguments
    from tests.test_trainer import tiny_t5

    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(2, 40, (16, 6), generator=generator).tolist(),
                              "labels": torch.randint(2, 40, (16, 4), generator=generator).tolist()})  # fmt: skip
    common = dict(report_to="none", use_cpu=True, max_steps=2, per_device_train_batch_size=4, save_strategy="no",
                  disable_tqdm=True, seed=0, gradient_accumulation_steps=2, logging_steps=1, optim="sgd",
                  learning_rate=0.05, lr_scheduler_type="constant", max_grad_norm=0.0)  # fmt: skip

    def run(name, **sam):
        if not sam:
            args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / name), **common)
            trainer = Seq2SeqTrainer(model=tiny_t5(dropout=0.0), args=args, train_dataset=data)
        else:
            args = SAMSeq2SeqTrainingArguments(output_dir=str(tmp_path / name), sam_method="sam", **sam, **common)
            trainer = SAMSeq2SeqTrainer(model=tiny_t5(dropout=0.0), args=args, train_dataset=data)
        trainer.train()
        return trainer

    plain, every = run("p"), run("e", sam_rho=0.0, esam_gamma=0.99)  # ceil(0.99 x 4): every example selected
    assert_same_weights(state(plain.model), state(every.model), exact=False, atol=1e-6)
    assert every._sam.loss_ignores_item_count is True
    sam, selected = run("s", sam_rho=0.5), run("d", sam_rho=0.5, esam_gamma=0.99)
    assert_same_weights(state(sam.model), state(selected.model), exact=False, atol=1e-6)
    sharpness = [[h["sam/sharpness"] for h in t.state.log_history if "loss" in h] for t in (sam, selected)]
    assert sharpness[0] == pytest.approx(sharpness[1], rel=1e-4)


# A loss Trainer normalizes by the window's `num_items_in_batch` (a causal LM's token mean, or any model under label
# smoothing) weighs each micro-batch by its share of the window's tokens. The subset's pass ran as its own mean over
# GA instead: with every example selected at rho 0 a micro-batch of 14 of the window's 16 tokens counted as one of
# 2, and the weights ended off the plain Trainer's.
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_selection_of_a_token_normalized_loss_weighs_micro_batches_by_their_tokens(tmp_path, smoothing):
    from tests.helpers import tiny_gpt2, uneven_token_lm_data

    _, _, data = uneven_token_lm_data()  # micro-batches of 14 and 2 scored tokens
    model = tiny_gpt2

    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, optim="sgd",
                  learning_rate=0.5, label_smoothing_factor=smoothing)  # fmt: skip

    def run(name, **sam):
        trainer = SequentialSAMTrainer(
            model=model(), train_dataset=data, args=sam_args(tmp_path / name, **common, **sam)
        )
        trainer.train()
        return trainer

    plain = run("p", sam_method="none")
    every = run("e", sam_method="sam", sam_rho=0.0, esam_gamma=0.99)  # ceil(0.99 x 2): every example selected
    assert every._sam.loss_ignores_item_count is False
    assert_same_weights(state(plain.model), state(every.model), exact=False, atol=1e-6)
    sam, selected = run("s", sam_method="sam", sam_rho=0.5), run("d", sam_method="sam", sam_rho=0.5, esam_gamma=0.99)
    assert_same_weights(state(sam.model), state(selected.model), exact=False, atol=1e-6)


def test_per_example_losses_of_a_prompt_tuned_causal_lm_are_each_examples_own_loss(tmp_path):
    # PEFT's prompt tuning puts its virtual tokens in front of the input: the logits have that many positions more
    # than the batch's labels, which PEFT scores with as many -100 in front (the last virtual token predicts the
    # first input token). Scored against the batch's labels alone, the selection raised torch's "Expected target
    # size [4, 10], got [4, 7]".
    peft = pytest.importorskip("peft")
    from tests.test_loss_terms import lm_dataset, tiny_llama

    model = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    data = lm_dataset(4)
    trainer = SequentialSAMTrainer(model=model, train_dataset=data,
                                   args=sam_args(tmp_path, sam_method="esam", esam_gamma=0.5))  # fmt: skip
    batch = {key: torch.tensor(data[key]) for key in ("input_ids", "labels")}
    with torch.no_grad():
        losses = trainer.per_example_loss(model(**batch), batch)
        alone = [model(**{key: value[i : i + 1] for key, value in batch.items()}).loss for i in range(4)]
    torch.testing.assert_close(losses, torch.stack(alone))


# A question-answering head returns start and end logits, no `.logits`. The data selection's refusal said
# "sam_method='sam' needs the model to return logits" (SAM does not; the selection does) and named no way out.
def test_data_selection_on_a_head_without_logits_is_refused_naming_the_selection(tmp_path):
    from datasets import Dataset
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16)  # fmt: skip
    model = BertForQuestionAnswering(config)
    before = state(model)
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(1, 50, (8, 8), generator=generator).tolist(),
                              "start_positions": torch.randint(0, 8, (8,), generator=generator).tolist(),
                              "end_positions": torch.randint(0, 8, (8,), generator=generator).tolist()})  # fmt: skip
    trainer = SequentialSAMTrainer(model=model, train_dataset=data,
                                   args=sam_args(tmp_path, sam_method="sam", esam_gamma=0.5, max_steps=1))  # fmt: skip
    expected = r"(?s)data selection.*QuestionAnsweringModelOutput.*per_example_loss.*esam_gamma 1"
    with pytest.raises(ValueError, match=expected):
        trainer.train()
    assert_same_weights(before, state(model))  # refused before the update


def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=40, num_mel_bins=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, d_model=16, max_source_positions=8,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None,
    )  # fmt: skip
    return WhisperForConditionalGeneration(config)


def test_swp_under_reentrant_checkpointing_perturbs_every_kept_tensor(tmp_path):
    # Reentrant checkpointing gives a layer none of whose inputs requires grad an output without gradient. On a model
    # that does not read input_ids (transformers makes only the input embeddings' output require grad), SWP's dropped
    # tensors can be all that made them require grad: with every encoder convolution dropped, the kept encoder layers
    # got no clean gradient and no eps (8 tensors here; 15 of the 50 kept ones of a 2-layer Whisper encoder, whose
    # weights ended 0.011 apart from the run without checkpointing after one AdamW step).
    from datasets import Dataset

    from hf_sam import SAMSeq2SeqTrainer, SAMSeq2SeqTrainingArguments
    from hf_sam.perturbation import select_perturbed

    names = [name for name, _ in select_perturbed(tiny_whisper(), None, None)]
    convs = [i for i, name in enumerate(names) if name.startswith("model.encoder.conv")]
    seed = next(s for s in range(500) if not any(kept_tensors(len(names), 0.6, s, 0)[i] for i in convs))
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {
            "input_features": torch.randn(4, 8, 16, generator=generator).tolist(),
            "labels": torch.randint(3, 40, (4, 5), generator=generator).tolist(),
        }
    )

    class RecordsEps(SAMSeq2SeqTrainer):
        def _sam_ascend(self, grad_factor):
            super()._sam_ascend(grad_factor)  # eps now sits in `.grad`
            perturbation = self._sam.perturbation
            pairs = zip(perturbation.names, perturbation.params)
            self.eps = {name: p.grad.clone() for name, p in pairs if p.grad is not None}

    eps = {}
    for reentrant in (None, True):
        checkpointing = {}
        if reentrant is not None:
            kwargs = {"use_reentrant": reentrant}
            checkpointing = {"activation_checkpointing": True, "activation_checkpointing_kwargs": kwargs}
        args = SAMSeq2SeqTrainingArguments(
            output_dir=str(tmp_path / str(reentrant)), report_to="none", use_cpu=True, max_steps=1, seed=seed,
            per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True, sam_method="esam", **checkpointing,
        )  # fmt: skip
        trainer = RecordsEps(model=tiny_whisper(), args=args, train_dataset=data)
        trainer.train()
        eps[reentrant] = trainer.eps
    assert any(name.startswith("model.encoder.layers") for name in eps[None])
    missing = sorted(set(eps[None]) - set(eps[True]))
    assert not missing, f"kept tensors without eps under reentrant checkpointing: {missing}"
    assert_same_weights(eps[None], eps[True], exact=False)
