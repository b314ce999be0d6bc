"""Sparse SAM: exact live counts, Fisher = top-k of a hand-computed Fisher, eps zero off the mask."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hf_sam import SAMTrainer
from hf_sam.components import build_ascent
from hf_sam.masks import SparseMask, top_k_mask
from hf_sam.perturbation import Perturbation, select_perturbed
from tests.helpers import VOCAB, SequentialSAMTrainer, batches, copy_model, sam_args, tiny_bert, tiny_dataset


def mask_args(kind, sparsity=0.5, drop=0.5, seed=0):
    return SimpleNamespace(sam_mask=kind, sam_sparsity=sparsity, sam_mask_drop_rate=drop, seed=seed,
                           sam_ascent="sam", sam_adaptive_eta=0.01)  # fmt: skip


def test_top_k_mask_marks_exactly_the_k_largest_entries_over_all_tensors():
    torch.manual_seed(0)
    scores = [torch.rand(7, 3), torch.rand(11), torch.rand(2, 2, 2)]
    masks = top_k_mask(scores, 10)
    flat = torch.cat([s.reshape(-1) for s in scores])
    chosen = torch.cat([m.reshape(-1) for m in masks])
    assert int(chosen.sum()) == 10
    assert flat[chosen].min() > flat[~chosen].max()


def test_order_keys_sort_like_the_floats_they_come_from():
    # The sharded top-k (FSDP2) bisects on these integer keys; their order must be the floats' order exactly.
    from hf_sam.masks import _order_keys

    torch.manual_seed(0)
    values = torch.cat([torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,)), torch.tensor(
        [0.0, -0.0, -1.0, 1.0, 1e-45, -1e-45, 3.0e38, -3.0e38, float("inf"), float("-inf")])])  # fmt: skip
    keys = _order_keys(values)
    assert keys.dtype == torch.int32
    by_key, by_value = values[torch.argsort(keys, stable=True)], torch.sort(values, stable=True).values
    assert torch.equal(by_key, by_value)
    distinct = values.unique()
    assert _order_keys(distinct).unique().numel() >= distinct.numel()  # distinct floats keep distinct keys


def test_dynamic_mask_keeps_the_live_count_through_updates():
    model = tiny_bert()
    named = select_perturbed(model, None, None)
    params = [p for _, p in named]
    mask = SparseMask(mask_args("dynamic", sparsity=0.7), [n for n, _ in named], params)
    live = int(0.3 * sum(p.numel() for p in params))
    assert sum(int(m.sum()) for m in mask.masks.values()) == live
    for step in range(1, 6):
        grads = [torch.randn_like(p) for p in params]
        before = {n: m.clone() for n, m in mask.masks.items()}
        mask.drop_and_grow(grads, params, step, progress=step / 10)
        count = sum(int(m.sum()) for m in mask.masks.values())
        assert live - 1 <= count <= live
        assert any(not torch.equal(before[n], m) for n, m in mask.masks.items())  # the mask really moves


def test_masked_eps_is_zero_off_mask_and_normalized_by_the_full_norm():
    model = tiny_bert()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    named = select_perturbed(model, None, None)
    names, params = [n for n, _ in named], [p for _, p in named]
    mask = SparseMask(mask_args("dynamic"), names, params)
    full_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item()
    expected = {n: 0.05 * p.grad / full_norm * mask.masks[n] for n, p in named}
    before = [p.detach().clone() for p in params]
    Perturbation(named, build_ascent(mask_args("dynamic")), mask).ascend(0.05)
    eps = {n: p.detach() - b for (n, p), b in zip(named, before)}
    for n in names:
        assert torch.all(eps[n][~mask.masks[n]] == 0)
        torch.testing.assert_close(eps[n], expected[n], atol=1e-7, rtol=1e-4)
    eps_norm = math.sqrt(sum(float((e.double() ** 2).sum()) for e in eps.values()))
    assert eps_norm < 0.05 * 0.9  # ||eps|| < rho: the norm of the full gradient, as the official code


def test_fisher_mask_is_the_top_k_of_a_hand_computed_fisher(tmp_path):
    data = tiny_dataset()
    model = tiny_bert()
    reference = copy_model(model)
    trainer = SequentialSAMTrainer(model=model, train_dataset=data, args=sam_args(
        tmp_path, sam_method="ssam-f", sam_fisher_samples=16, sam_sparsity=0.6, max_steps=1))  # fmt: skip
    trainer.train()
    # Hand loop: the same 16 examples, one per pass, eval mode, true labels, squared per-example gradients.
    reference.eval()
    fisher = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    rows = batches(data.select(trainer._sam.perturbation.mask.fisher_indices), 1)
    for row in rows:
        reference.zero_grad()
        F.cross_entropy(reference(input_ids=row["input_ids"]).logits, row["labels"]).backward()
        for n, p in reference.named_parameters():
            fisher[n] += p.grad**2
    names = trainer._sam.perturbation.names
    flat = torch.cat([fisher[n].reshape(-1) for n in names])
    k = int(0.4 * flat.numel())
    threshold = flat.topk(k).values.min()
    assert threshold > 0 and (flat == threshold).sum() == 1  # no tie at the cut: the top-k is unique
    expected = {n: fisher[n] >= threshold for n in names}
    got = trainer._sam.perturbation.mask.masks
    assert sum(int(m.sum()) for m in got.values()) == k
    for n in names:
        assert torch.equal(got[n], expected[n]), n


def _masked_lm_collator(seed):
    """transformers' masked-LM collator over the tiny vocabulary: it draws each batch's masks at random."""
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                        pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")  # fmt: skip
    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3, seed=seed)


@pytest.mark.parametrize("seed", [None, 7])
def test_fisher_passes_leave_the_training_batches_and_dropout_as_the_plain_trainer_has_them(tmp_path, seed):
    # The Fisher examples go through the training collator between two steps: a masked-LM collator drew their masks
    # from the global RNG (moving the next dropout masks) or from its own seeded generator (moving the next batches'
    # masks). At rho 0 SSAM-F's weights ended 0.29 (global RNG) and 0.08 (seeded collator) away from Trainer's.
    from transformers import BertConfig, BertForMaskedLM, Trainer

    def model():
        torch.manual_seed(0)
        config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=24, max_position_embeddings=16)  # fmt: skip
        return BertForMaskedLM(config)  # dropout 0.1

    data = tiny_dataset().remove_columns("labels")
    args = dict(max_steps=3)
    plain = Trainer(model=model(), args=sam_args(tmp_path / "p", **args), train_dataset=data,
                    data_collator=_masked_lm_collator(seed))  # fmt: skip
    plain.train()
    ssam_f = dict(sam_method="ssam-f", sam_rho=0.0, sam_fisher_samples=4, sam_mask_interval=1)
    sam = SAMTrainer(model=model(), args=sam_args(tmp_path / "s", **ssam_f, **args), train_dataset=data,
                     data_collator=_masked_lm_collator(seed))  # fmt: skip
    sam.train()
    assert len(sam._sam.perturbation.mask.fisher_indices) == 4  # a refresh at every step
    for name, p in plain.model.named_parameters():
        assert torch.equal(p, sam.model.get_parameter(name)), name


def test_fisher_mask_on_an_iterable_dataset_is_a_clear_error_before_training(tmp_path):
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SAMTrainer(model=model, args=sam_args(tmp_path, sam_method="ssam-f"),
                         train_dataset=tiny_dataset().to_iterable_dataset())  # fmt: skip
    with pytest.raises(ValueError, match="sam_mask='fisher'.*map-style.*ssam-d"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # The dynamic mask needs no data: it trains on the same iterable dataset, given its refresh interval.
    dynamic = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, sam_method="ssam-d", max_steps=2,
                         sam_mask_interval=1), train_dataset=tiny_dataset().to_iterable_dataset())  # fmt: skip
    dynamic.train()
    assert dynamic.state.global_step == 2


def test_fisher_mask_without_a_train_dataset_is_a_clear_error_before_training(tmp_path):
    # A get_train_dataloader override feeds the steps and the trainer got no train_dataset: the first Fisher refresh
    # failed with "TypeError: object of type 'NoneType' has no len()".
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    data = tiny_dataset().with_format("torch")

    class OwnLoader(SAMTrainer):
        def get_train_dataloader(self):
            return DataLoader(data, batch_size=4, collate_fn=default_data_collator)

    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = OwnLoader(model=model, args=sam_args(tmp_path, sam_method="ssam-f"))
    with pytest.raises(ValueError, match="sam_mask='fisher'.*train_dataset=.*ssam-d"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_dynamic_mask_on_an_iterable_dataset_needs_its_refresh_interval(tmp_path):
    # The default interval is one epoch's optimizer steps, which an iterable dataset does not have: it used to become
    # 1 (max_steps over Trainer's sys.maxsize epochs), a mask redrawn at every step.
    trainer = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, sam_method="ssam-d"),
                         train_dataset=tiny_dataset().to_iterable_dataset())  # fmt: skip
    with pytest.raises(ValueError, match="sam_mask_interval"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("sparsity", [0.5, 0.2, 0.1, 0.0])
def test_drop_and_grow_keeps_the_live_count_when_few_entries_are_dead(tmp_path, sparsity):
    # Under s < d / (1 + d) (the official code's s 0.2 with d 0.5) fewer entries are dead than the grow step revives:
    # the rest must come from the entries just dropped, never from kept ones, or the mask shrinks.
    args = sam_args(tmp_path, sam_method="ssam-d", sam_sparsity=sparsity)
    torch.manual_seed(0)
    params = [torch.randn(40, 30), torch.randn(50)]
    mask = SparseMask(args, ["a", "b"], params)
    grads = [torch.randn_like(p) for p in params]
    for step, progress in ((1, 0.0), (2, 0.25), (3, 0.5)):
        mask.drop_and_grow(grads, params, step, progress)
        live = sum(int(m.sum()) for m in mask.masks.values())
        drop = args.sam_mask_drop_rate * (1 + math.cos(math.pi * progress)) / 2
        assert live == math.floor(mask.live * (1 - drop)) + math.floor(mask.live * drop)
        assert mask.live - 1 <= live <= mask.live


def test_with_enough_dead_entries_drop_and_grow_revives_only_dead_ones(tmp_path):
    args = sam_args(tmp_path, sam_method="ssam-d", sam_sparsity=0.5)
    params = [torch.randn(40, 30)]
    mask = SparseMask(args, ["a"], params)
    old = mask.masks["a"].clone()
    mask.drop_and_grow([torch.randn_like(params[0])], params, 1, 0.0)
    revived = mask.masks["a"] & ~old
    assert int(revived.sum()) == math.floor(mask.live * args.sam_mask_drop_rate)


def dynamic_refreshes(tmp_path, monkeypatch, resume_at=None, **overrides):
    """The steps at which SSAM-D's mask was redrawn, and the trained weights."""
    steps = []
    original = SparseMask.drop_and_grow

    def spy(self, grads, params, step, progress):
        steps.append(step)
        return original(self, grads, params, step, progress)

    monkeypatch.setattr(SparseMask, "drop_and_grow", spy)
    data = tiny_dataset(64)
    if resume_at is None:
        trainer = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, sam_method="ssam-d", **overrides),
                             train_dataset=data)  # fmt: skip
        trainer.train()
        return list(steps), trainer.model
    save = dict(save_strategy="steps", save_steps=resume_at)
    SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, sam_method="ssam-d", **save, **overrides),
               train_dataset=data).train()  # fmt: skip
    steps.clear()
    resumed = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, sam_method="ssam-d", **overrides),
                         train_dataset=data)  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{resume_at}"))
    return list(steps), resumed.model


def test_dynamic_mask_refreshes_at_the_first_sam_step_of_each_interval(tmp_path, monkeypatch):
    # SAM on even steps, a refresh due every 3: intervals [3, 6), [6, 9), [9, 12), [12, 13). The refresh reads the
    # clean gradient, which a plain step does not compute; it used to be dropped when the interval began on one.
    every_other = dict(sam_schedule="every_k", sam_interval=2, sam_mask_interval=3, max_steps=13)
    assert dynamic_refreshes(tmp_path / "a", monkeypatch, **every_other)[0] == [4, 6, 10, 12]
    assert dynamic_refreshes(tmp_path / "b", monkeypatch, sam_mask_interval=3, max_steps=10)[0] == [3, 6, 9]


@pytest.mark.parametrize("resume_at", [5, 7])
def test_dynamic_mask_refreshes_the_same_after_a_resume(tmp_path, monkeypatch, resume_at):
    # Checkpoint 5 falls after interval [3, 6)'s refresh at step 4; checkpoint 7 before interval [6, 9)'s at 8.
    every_other = dict(sam_schedule="every_k", sam_interval=2, sam_mask_interval=3, max_steps=13, learning_rate=0.01)
    straight, model = dynamic_refreshes(tmp_path / "a", monkeypatch, **every_other)
    after, resumed = dynamic_refreshes(tmp_path / "b", monkeypatch, resume_at=resume_at, **every_other)
    assert after == [s for s in straight if s >= resume_at]
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # 32 examples in batches of 4: 8 optimizer steps per epoch (4 with GA 2). The interval used to be max_steps
        # over Trainer's rounded-up epoch count: 6, 3 and 7 steps here.
        ({"max_steps": 18}, [0, 8, 16]),
        ({"max_steps": 9, "gradient_accumulation_steps": 2}, [0, 4, 8]),
        ({"max_steps": -1, "num_train_epochs": 2.5}, [0, 8, 16]),
    ],
)
def test_mask_refresh_interval_defaults_to_one_epoch_of_optimizer_steps(tmp_path, monkeypatch, overrides, expected):
    refreshed = []
    original = SparseMask.before_step

    def spy(self, trainer, params):
        before = self.updated_at
        flops = original(self, trainer, params)
        if self.updated_at != before:
            refreshed.append(trainer.state.global_step)
        return flops

    monkeypatch.setattr(SparseMask, "before_step", spy)
    args = sam_args(tmp_path, sam_method="ssam-f", sam_fisher_samples=2, **overrides)
    SAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset()).train()
    assert refreshed == expected
