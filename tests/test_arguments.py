"""SAMTrainingArguments: presets, CLI parsing, --help, and clear errors before training starts."""

import dataclasses
import json
import math

import pytest
from transformers import HfArgumentParser

from hf_sam import METHODS, SAMSeq2SeqTrainingArguments, SAMTrainer, SAMTrainingArguments
from hf_sam.arguments import SAMArgumentsMixin
from tests.helpers import tiny_bert, tiny_dataset
from tests.method_cases import METHOD_CASES


def make(**kw):
    return SAMTrainingArguments(output_dir="unused", report_to="none", use_cpu=True, **kw)


def test_presets_fill_unset_fields():
    assert make().sam_method == "sam"
    assert make().sam_rho == 0.05 and make().sam_ascent == "sam"
    asam = make(sam_method="asam")
    assert asam.sam_rho == 1.0 and asam.sam_ascent == "adaptive" and asam.sam_adaptive_eta == 0.01
    assert asam.sam_adaptive_bias and (asam.sam_schedule, asam.sam_probability, asam.sam_probability_end) == (
        "linear",
        0.0,
        1.0,
    )
    assert make(sam_method="none").sam_rho == 0.0


def test_explicit_flag_wins_over_preset():
    args = make(sam_method="asam", sam_rho=1.0, sam_adaptive_eta=0.0)
    assert args.sam_rho == 1.0 and args.sam_adaptive_eta == 0.0 and args.sam_ascent == "adaptive"
    assert make(sam_method="sam", sam_ascent="adaptive").sam_ascent == "adaptive"
    assert make(sam_method="gsam").gsam_alpha == 0.1
    stable = make(sam_method="stable-sam")
    assert stable.sam_ascent == "sam" and stable.sam_renormalize is True and stable.sam_rho == 0.05
    assert make(sam_method="esam").sam_rho == 0.03  # eps of norm rho / beta = 0.05 on the kept tensors
    assert make(sam_method="esam").esam_swp is True and make(sam_method="esam", esam_swp=False).esam_swp is False


def test_every_sam_field_is_a_cli_flag_with_help(capsys):
    parser = HfArgumentParser(SAMTrainingArguments)
    sam_fields = [f for f in SAMArgumentsMixin.__dataclass_fields__.values()]
    prefixes = ("sam_", "esam_", "looksam_", "gsam_", "fsam_", "adasam_", "saf_", "mesa_", "weight_ema_")
    assert all(f.name.startswith(prefixes) and f.metadata.get("help") for f in sam_fields)
    help_text = parser.format_help()
    for f in sam_fields:
        assert f"--{f.name}" in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "sam_method" in capsys.readouterr().out


def test_help_gives_each_presets_value_of_a_field():
    # `--help` said "Default 0.5." for --sam_probability (ss-sam, asam and late-sam start at 0), "Default always." for
    # --sam_schedule, "Default 1." for --sam_micro_batches (msam: 4), "Default False." for --sam_renormalize
    # (stable-sam: True), with "(default: None)" from argparse: nothing told what a method sets.
    helps = {f.name: " ".join(f.metadata["help"].split()) for f in dataclasses.fields(SAMTrainingArguments)}
    for method, info in METHODS.items():
        for name, value in info.preset.items():
            assert f"{method} {value}" in helps[name].split("Presets: ", 1)[-1], (name, method, helps[name])
    assert helps["sam_probability"].endswith("Default 0.5. Presets: asam 0.0, ss-sam 0.0, late-sam 0.0.")
    assert "Presets" not in helps["gsam_alpha"]  # no preset sets it


def test_cli_round_trip():
    parser = HfArgumentParser(SAMTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            "x",
            "--use_cpu",
            "--report_to",
            "none",
            "--sam_method",
            "asam",
            "--sam_rho",
            "0.3",
            "--sam_accumulation",
            "micro",
            "--no_sam_same_dropout",
            "--sam_ascent_sync",
            "true",
            "--sam_exclude",
            "bias",
        ]
    )
    assert (args.sam_method, args.sam_rho, args.sam_accumulation) == ("asam", 0.3, "micro")
    assert args.sam_same_dropout is False and args.sam_ascent_sync is True and args.sam_exclude == "bias"


def test_seq2seq_arguments_have_sam_fields():
    args = SAMSeq2SeqTrainingArguments(output_dir="x", report_to="none", use_cpu=True, sam_method="asam")
    assert args.sam_rho == 1.0 and hasattr(args, "predict_with_generate")


FSDP2 = {"fsdp": True, "fsdp_config": {"version": 2}}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sam_rho": -0.1}, "sam_rho"),
        ({"sam_rho": math.inf}, "sam_rho"),
        ({"sam_rho": math.nan}, "sam_rho"),
        ({"sam_adaptive_eta": -1.0}, "sam_adaptive_eta"),
        ({"sam_method": "sharpness"}, "sam_method.*none, sam, asam, ss-sam"),
        ({"sam_accumulation": "sometimes"}, "sam_accumulation"),
        ({"sam_method": "none", "sam_rho": 0.1}, "contradict"),
        ({"sam_include": "("}, "sam_include"),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "zero_optimization.stage=3.*stage=2.*FSDP2"),
        (
            {"deepspeed": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}},
            "zero_optimization.offload_optimizer.device='cpu'",
        ),  # fmt: skip
        ({"deepspeed": {"zero_optimization": {"stage": 1, "offload_param": {"device": "nvme"}}}}, "offload_param"),
        ({"sam_method": "mesa", "deepspeed": {"zero_optimization": {"stage": 3}}}, "zero_optimization.stage=3"),
        ({"deepspeed": {"train_batch_size": "auto"}}, r"zero_optimization.stage=0 \(0 when absent\)"),
        ({"deepspeed": {"zero_optimization": {"stage": 0}}}, "zero_optimization.stage to 2"),
        ({"optim": "lomo"}, "optim"),
        ({"optim": "galore_adamw_layerwise", "optim_target_modules": ["attention"]}, "inside backward"),
        ({"optim": "apollo_adamw_layerwise", "optim_target_modules": ["attention"]}, "inside backward"),
        ({"sam_schedule": "sometimes"}, "sam_schedule"),
        ({"sam_probability": 1.5}, "sam_probability"),
        ({"sam_interval": 0}, "sam_interval"),
        ({"looksam_k": 0}, "looksam_k"),
        ({"fsam_lambda": 1.0}, "fsam_lambda"),
        ({"gsam_alpha": math.nan}, "gsam_alpha"),
        ({"sam_micro_batches": 0}, "sam_micro_batches"),
        ({"sam_micro_batches": 4, "sam_accumulation": "window"}, "contradicts"),
        ({"sam_method": "msam", "sam_renormalize": True}, "descent transform"),
        ({"sam_method": "gsam", "sam_accumulation": "micro", "gradient_accumulation_steps": 2}, "window"),
        ({"sam_method": "looksam", "sam_schedule": "constant"}, "LookSAM"),
        ({"sam_rho": 0.05, "sam_rho_min": 0.1}, "sam_rho_min"),
        ({"sam_rho_warmup": 1.5}, r"sam_rho_warmup=1.5 must lie in \[0, 1\]"),
        ({"sam_rho_warmup": -0.1}, "sam_rho_warmup"),
        ({"sam_ascent": "sideways"}, "sam_ascent"),
        ({"sam_method": "esam", **FSDP2}, "FSDP always syncs the ascent"),
        ({"sam_mask": "random_tensor"}, "sam_mask='random_tensor' is unknown"),  # ESAM's SWP is esam_swp
        ({"sam_method": "saf", "esam_swp": True}, "esam_swp=True has nothing to act on"),
        ({"sam_method": "sam", "sam_ascent_sync": False, **FSDP2}, "sam_ascent_sync"),
        ({"sam_method": "sam", "fsdp": True, "fsdp_config": {"version": 1}}, "FSDP2"),
        # Choice fields are checked from Python too, not only by the CLI parser's choices.
        ({"sam_mask": "Fisher"}, "sam_mask='Fisher' is unknown"),
        ({"sam_mask": "bogus"}, "sam_mask='bogus' is unknown"),
        ({"sam_method": "looksam", "looksam_k": 0}, "looksam_k=0"),
        ({"sam_method": "looksam", "sam_interval": 3}, "looksam_k 3"),
        ({"sam_method": "adasam", "optim": "sgd"}, "adasam.*own optimizer"),
        # ESAM's SWP leaves the dropped tensors without a clean gradient, which the descent transforms need whole.
        ({"sam_method": "esam", "sam_descent": "gsam"}, "esam_swp=True.*descent transform"),
        ({"sam_method": "esam", "sam_descent": "looksam"}, "esam_swp=True.*descent transform"),
        ({"sam_method": "esam", "sam_renormalize": True}, "esam_swp=True.*descent transform"),
        ({"sam_method": "gsam", "esam_swp": True}, "esam_swp=True.*descent transform"),
        # docs/methods.md#refused-combinations, rows no other case covered.
        ({"optim": "adalomo"}, "optim='adalomo'.*inside backward"),
        ({"sam_method": "sam", "sam_descent": "gsam", "sam_micro_batches": 2, "sam_accumulation": "micro"}, "descent"),
        ({"sam_method": "momentum-sam", "sam_ascent": "adaptive"}, "sam_direction='momentum'"),
        ({"sam_method": "momentum-sam", "esam_swp": True}, "sam_direction='momentum'"),
        ({"sam_method": "momentum-sam", "esam_gamma": 0.5}, "sam_direction='momentum'"),
        ({"sam_method": "momentum-sam", "sam_descent": "gsam"}, "sam_direction='momentum'"),
        ({"sam_method": "momentum-sam", "sam_micro_batches": 2, "sam_accumulation": "micro"}, "sam_direction"),
        ({"sam_method": "none", "sam_loss_term": "saf"}, "contradict"),
        ({"sam_method": "saf", "sam_descent": "gsam"}, "nothing to act on"),
        ({"sam_method": "mesa", "sam_schedule": "every_k"}, "nothing to act on"),
        ({"sam_method": "mesa", "sam_micro_batches": 2, "sam_accumulation": "micro"}, "nothing to act on"),
        ({"sam_method": "ss-sam", "sam_probability_end": 1.5}, "sam_probability_end"),
        ({"sam_method": "ssam-f", "sam_sparsity": -0.1}, "sam_sparsity"),
        ({"sam_method": "esam", "esam_gamma": 0.0}, "esam_gamma"),
        ({"sam_method": "esam", "esam_gamma": 1.5}, "esam_gamma"),
        ({"sam_method": "ssam-f", "sam_fisher_samples": 0}, "sam_fisher_samples"),
    ],
)
def test_bad_input_raises_value_error_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_plain_training_arguments_are_refused_with_the_fix(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="SAMTrainingArguments"):
        SAMTrainer(model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


def test_regex_matching_nothing_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="sam_include"):
        SAMTrainer(model=tiny_bert(), args=make(sam_include="no_such_layer"), train_dataset=tiny_dataset())


def test_fsdp2_forces_the_synced_ascent_and_keeps_esam_data_selection():
    assert make(sam_method="sam", **FSDP2).sam_ascent_sync is True
    # SDS alone runs under FSDP (tested in DDP/FSDP runs)
    args = make(sam_method="esam", esam_swp=False, esam_gamma=0.5, **FSDP2)
    assert args.sam_ascent_sync is True and args.esam_gamma == 0.5


def test_every_registered_method_constructs():
    for name in METHODS:
        assert make(sam_method=name).sam_method == name


def test_axes_combine_freely():
    # any ascent rule with any schedule, renormalization and both accumulation modes
    # (where docs/methods.md#refused-combinations allows)
    for ascent in ("sam", "adaptive", "unnormalized", "fsam"):
        for schedule in ("always", "constant", "every_k", "cosine"):
            args = make(sam_ascent=ascent, sam_schedule=schedule, sam_renormalize=True)
            assert (args.sam_ascent, args.sam_schedule, args.sam_renormalize) == (ascent, schedule, True)
            assert make(sam_ascent=ascent, sam_micro_batches=2, sam_accumulation="micro").sam_micro_batches == 2


@pytest.mark.parametrize(
    "typed, meant", [("SAM", "sam"), ("ssam_d", "ssam-d"), ("SS_SAM", "ss-sam"), ("Stable SAM", "stable-sam")]
)
def test_a_method_name_in_other_case_or_separators_gets_a_suggestion(typed, meant):
    with pytest.raises(ValueError, match=f"Did you mean '{meant}'"):
        make(sam_method=typed)


def test_looksam_period_is_looksam_k_and_an_equal_sam_interval_is_accepted():
    assert make(sam_method="looksam").sam_interval == 2
    assert make(sam_method="looksam", looksam_k=3).sam_interval == 3
    assert make(sam_method="looksam", looksam_k=3, sam_interval=3).sam_interval == 3
    assert make(sam_schedule="every_k").sam_interval == 2


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"sam_method": "sam", "sam_sparsity": 0.9}, ["sam_sparsity"]),
        ({"sam_method": "saf", "sam_include": "classifier"}, ["sam_include"]),
        ({"sam_method": "gsam", "looksam_alpha": 0.5, "fsam_sigma": 0.5}, ["looksam_alpha", "fsam_sigma"]),
        ({"sam_method": "none", "esam_gamma": 0.5}, ["esam_gamma"]),
        ({"sam_method": "mesa", "saf_tau": 2.0}, ["saf_tau"]),
        ({"sam_method": "none", "esam_swp": True, "sam_ascent": "fsam"}, ["esam_swp", "sam_ascent"]),
        ({"sam_method": "none", "sam_mask": "fisher", "sam_schedule": "every_k"}, ["sam_mask", "sam_schedule"]),
        ({"sam_method": "none", "sam_descent": "gsam", "sam_renormalize": True}, ["sam_descent", "sam_renormalize"]),
        ({"sam_method": "none", "sam_direction": "momentum"}, ["sam_direction"]),
        ({"sam_method": "none", "sam_micro_batches": 2, "sam_accumulation": "micro"}, ["sam_micro_batches"]),
        ({"sam_method": "ssam-f", "sam_sparsity": 0.9}, []),
        ({"sam_method": "ss-sam", "sam_probability": 0.3}, []),
        ({"sam_method": "msam"}, []),
        ({"sam_method": "sam", "sam_adaptive_bias": True}, ["sam_adaptive_bias"]),
        ({"sam_method": "asam", "sam_adaptive_bias": True}, []),
        ({"sam_method": "mesa", "sam_rho_warmup": 0.5}, ["sam_rho_warmup"]),
        ({"sam_method": "sam", "sam_rho_warmup": 0.5}, []),
        ({"sam_method": "esam", "esam_beta": 0.5}, []),
    ],
)
def test_a_field_the_method_ignores_is_warned_about_once_by_name(kwargs, named):
    from transformers.testing_utils import CaptureLogger

    from hf_sam import arguments

    with CaptureLogger(arguments.logger) as captured:
        make(**kwargs)
    assert captured.out.count("ignores") == (1 if named else 0)
    for name in named:
        assert name in captured.out and repr(kwargs["sam_method"]) in captured.out


@pytest.mark.parametrize(
    "kwargs, warned",
    [
        ({"sam_rho": 50.0}, True),
        ({"sam_rho": 1e30}, True),
        ({"sam_rho": 0.05}, False),
        ({"sam_method": "asam"}, False),
    ],
)
def test_a_radius_far_above_the_usual_range_is_warned_about(kwargs, warned):
    from transformers.testing_utils import CaptureLogger

    from hf_sam import arguments

    with CaptureLogger(arguments.logger) as captured:
        make(**kwargs)
    assert ("far above" in captured.out) == warned


@pytest.mark.parametrize(
    "kwargs, mean",
    [
        ({"sam_method": "ss-sam", "sam_probability": 0.3}, "65%"),  # the preset's ramp then runs 0.3 -> 1
        ({"sam_method": "late-sam", "sam_probability": 0.2}, "30%"),  # 0.2 until 7/8 of training, then 1
        ({"sam_method": "ss-sam"}, None),
        ({"sam_method": "ss-sam", "sam_schedule": "constant", "sam_probability": 0.3}, None),
        ({"sam_method": "ss-sam", "sam_probability": 0.2, "sam_probability_end": 0.6}, None),
        ({"sam_method": "sam", "sam_schedule": "linear", "sam_probability": 0.3}, None),
    ],
)
def test_one_end_of_a_preset_schedule_is_warned_about_with_the_share_it_gives(kwargs, mean):
    from transformers.testing_utils import CaptureLogger

    from hf_sam import arguments

    with CaptureLogger(arguments.logger) as captured:
        make(**kwargs)
    if mean is None:
        assert "sam_schedule constant" not in captured.out
    else:
        assert f"SAM on {mean} of the steps" in captured.out and "--sam_schedule constant" in captured.out


def test_a_model_without_trainable_parameters_is_refused_as_such(tmp_path):
    model = tiny_bert()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter") as raised:
        SAMTrainer(model=model, args=make(), train_dataset=tiny_dataset())
    assert "sam_include" not in str(raised.value)  # no regex was given: the message must not blame one


def test_adasam_refuses_an_optimizer_passed_to_the_trainer():
    import torch

    model = tiny_bert()
    with pytest.raises(ValueError, match="adasam.*SGD"):
        SAMTrainer(model=model, args=make(sam_method="adasam"), train_dataset=tiny_dataset(),
                   optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))  # fmt: skip
    with pytest.raises(ValueError, match="adasam.*optimizer_cls_and_kwargs"):
        SAMTrainer(model=model, args=make(sam_method="adasam"), train_dataset=tiny_dataset(),
                   optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))  # fmt: skip


class _TrainerWithItsOwnOptimizer(SAMTrainer):
    def create_optimizer(self):
        if self.optimizer is None:
            import torch

            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        return self.optimizer


def test_adasam_refuses_an_optimizer_from_a_create_optimizer_override_before_any_update(tmp_path):
    # The override never reads optimizer_cls_and_kwargs: adasam would silently be plain SAM over SGD.
    model = tiny_bert()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = SAMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, sam_method="adasam",
                                max_steps=2, save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = _TrainerWithItsOwnOptimizer(model=model, args=args, train_dataset=tiny_dataset())
    with pytest.raises(ValueError, match="adasam.*AdaSAMOptimizer.*SGD"):
        trainer.train()
    assert all(p.equal(before[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("method", ["saf", "mesa"])
def test_saf_and_mesa_refuse_a_one_output_head(method):
    import torch

    from hf_sam.loss_term import kl_to_target

    with pytest.raises(ValueError, match="one output per example"):
        SAMTrainer(model=tiny_bert(num_labels=1), args=make(sam_method=method), train_dataset=tiny_dataset())
    # A model without a config is caught at its first logits.
    with pytest.raises(ValueError, match=f"sam_method='{method}'.*one output per example"):
        kl_to_target(torch.zeros(4, 1), torch.zeros(4, 1), 5.0, method)


# A question-answering head returns start and end logits. Its ModelOutput has no `.logits` (refused at the first
# step), but its return_dict=False tuple (loss, start_logits, end_logits) was read as (loss, logits, ...): SAF and
# MESA trained, without a word, a KL over the start positions alone, taken as classes.
@pytest.mark.parametrize("method", ["saf", "mesa"])
@pytest.mark.parametrize("return_dict", [True, False])
def test_saf_and_mesa_refuse_a_question_answering_head(method, return_dict):
    from transformers import BertConfig, BertForQuestionAnswering

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16, return_dict=return_dict)  # fmt: skip
    with pytest.raises(ValueError, match=f"sam_method='{method}'.*start and end logits"):
        SAMTrainer(model=BertForQuestionAnswering(config), args=make(sam_method=method), train_dataset=tiny_dataset())


def test_presets_only_set_fields_a_user_can_override():
    # A preset fills a field only while it is None (unset): a field with another default could not tell the user's
    # value from its own, and the preset would silently win or lose.
    defaults = {f.name: f.default for f in SAMArgumentsMixin.__dataclass_fields__.values()}
    for name, info in METHODS.items():
        for field_name in info.preset:
            assert field_name in defaults, f"{name}: {field_name} is not a field"
            assert defaults[field_name] is None, (
                f"{name}: preset field {field_name} defaults to {defaults[field_name]}"
            )
    late = make(sam_method="late-sam")
    assert (late.sam_schedule, late.sam_probability, late.sam_probability_end) == ("piecewise", 0.0, 1.0)
    assert (
        late.sam_schedule_boundary == 0.875
        and make(sam_method="late-sam", sam_schedule_boundary=0.5).sam_schedule_boundary == 0.5
    )


@pytest.mark.parametrize(
    "method, overrides, match",
    [(name, overrides, match) for name, case in METHOD_CASES.items() for overrides, match in case["errors"]],
)
def test_each_method_refuses_its_bad_inputs_naming_the_field(method, overrides, match):
    with pytest.raises(ValueError, match=match):
        make(**{**METHOD_CASES[method]["args"], **overrides})


def test_every_method_row_lists_its_bad_inputs():
    assert all(case.get("errors") for case in METHOD_CASES.values())


def test_a_zero_3_config_file_is_refused_before_deepspeed_is_set_up(tmp_path):
    import json

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": "auto"}))
    with pytest.raises(ValueError, match="zero_optimization.stage=3"):
        make(deepspeed=str(config))


def test_a_deepspeed_config_as_base64_or_a_path_object_is_read_as_transformers_reads_it(tmp_path):
    # transformers (accelerate's HfDeepSpeedConfig) takes a base64-encoded JSON string and an os.PathLike too. hf_sam
    # read neither: it took them for a config without zero_optimization and refused a ZeRO-2 config as stage 0
    # (and let a ZeRO-3 one through to the trainer).
    import base64
    import json

    def encoded(stage: int) -> str:
        return base64.urlsafe_b64encode(json.dumps({"zero_optimization": {"stage": stage}}).encode()).decode()

    def path(stage: int):
        config = tmp_path / f"ds{stage}.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
        return config

    for stage2 in (encoded(2), path(2)):
        assert make(deepspeed=stage2).hf_deepspeed_config.config["zero_optimization"]["stage"] == 2
    for stage3 in (encoded(3), path(3)):
        with pytest.raises(ValueError, match="zero_optimization.stage=3"):
            make(deepspeed=stage3)
    # Not readable as a config at all: transformers says which forms it takes.
    with pytest.raises(ValueError, match="base64 encoded string"):
        make(deepspeed=str(tmp_path / "missing.json"))


def test_a_deepspeed_optimizer_block_is_refused_for_adasam_before_deepspeed_is_set_up():
    # With an `optimizer` block DeepSpeed builds that optimizer instead of the Trainer's, so AdaSAM would be plain SAM
    # over it. The first step refused it, after the engine was built, blaming "a create_optimizer override?".
    from types import SimpleNamespace

    from hf_sam.setup_checks import check_sam_setup

    config = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    with pytest.raises(ValueError, match="sam_method='adasam'.*`optimizer` block.*'AdamW'.*Remove the `optimizer`"):
        make(sam_method="adasam", deepspeed=config)
    make(sam_method="sam", deepspeed=config)  # DeepSpeed's optimizer is the one SAM steps with
    # From `accelerate launch`: the Trainer's accelerator holds the config.
    plugin = SimpleNamespace(deepspeed_config=config)
    args = make(sam_method="adasam")
    trainer = SimpleNamespace(args=args, is_deepspeed_enabled=True, is_fsdp_enabled=False,
                              accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))  # fmt: skip
    with pytest.raises(ValueError, match="`optimizer` block"):
        check_sam_setup(trainer)


def test_a_zero_3_config_from_accelerate_launch_is_refused_by_the_trainer():
    # `accelerate launch --use_deepspeed` hands the config to the Trainer's accelerator, not to the arguments.
    from types import SimpleNamespace

    from hf_sam.setup_checks import check_loss_term_setup, check_sam_setup

    refused = (
        ({"stage": 3}, "stage=3"),
        ({"stage": 2, "offload_param": {"device": "cpu"}}, "offload"),
        ({}, "stage=0"),
    )
    for zero, match in refused:
        plugin = SimpleNamespace(deepspeed_config={"zero_optimization": zero})
        state = SimpleNamespace(deepspeed_plugin=plugin)
        args = SimpleNamespace(sam_enabled=True)
        trainer = SimpleNamespace(args=args, is_deepspeed_enabled=True, accelerator=SimpleNamespace(state=state))
        for check in (check_sam_setup, check_loss_term_setup):
            with pytest.raises(ValueError, match=match):
                check(trainer)


def test_fsdp1_from_accelerate_launch_is_refused_for_the_loss_terms_too():
    # README: FSDP1 is refused with a clear error. SAF and MESA skip the SAM-step check, so an FSDP1 config from
    # `accelerate launch` reached training unchecked.
    from types import SimpleNamespace

    from hf_sam.setup_checks import check_loss_term_setup, check_sam_setup

    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1))
    for method, check in (("sam", check_sam_setup), ("mesa", check_loss_term_setup), ("saf", check_loss_term_setup)):
        args = make(sam_method=method)
        trainer = SimpleNamespace(args=args, is_deepspeed_enabled=False, is_fsdp_enabled=True, model=tiny_bert(),
                                  accelerator=SimpleNamespace(state=state, num_processes=2))  # fmt: skip
        with pytest.raises(ValueError, match="FSDP2 only"):
            check(trainer)


def test_an_explicit_local_ascent_under_fsdp_from_accelerate_launch_is_refused():
    # With `fsdp=` in the arguments sam_ascent_sync=False is refused; from an `accelerate launch` FSDP2 config it was
    # only warned about and switched to True. Left unset it is set to True, as documented.
    from types import SimpleNamespace

    from hf_sam.setup_checks import check_sam_setup

    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2))

    def fsdp_trainer(args):
        return SimpleNamespace(args=args, is_deepspeed_enabled=False, is_fsdp_enabled=True, model=tiny_bert(),
                               accelerator=SimpleNamespace(state=state, num_processes=2))  # fmt: skip

    with pytest.raises(ValueError, match="sam_ascent_sync=False is not possible under FSDP"):
        check_sam_setup(fsdp_trainer(make(sam_method="sam", sam_ascent_sync=False)))
    args = make(sam_method="sam")
    check_sam_setup(fsdp_trainer(args))
    assert args.sam_ascent_sync is True


def test_bf16_zero_1_with_fp32_gradient_accumulation_is_refused_before_training():
    # DeepSpeed runs bf16 weights with fp32 gradient accumulation under ZeRO-1 through its BF16_Optimizer, whose
    # engine has no `coalesce_grad_reduction`: without this check the first SAM step failed with DeepSpeed's
    # NotImplementedError, after the engine was built. The loss terms and ZeRO-2 run there (refused neither).
    from types import SimpleNamespace

    from hf_sam.setup_checks import check_sam_setup

    fp32_accumulation = {"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}
    with pytest.raises(ValueError, match="data_types.grad_accum_dtype='fp32'.*stage=1.*BF16_Optimizer"):
        make(bf16=True, deepspeed={**fp32_accumulation, "bf16": {"enabled": "auto"}})
    for deepspeed in (
        {**fp32_accumulation, "bf16": {"enabled": False}},  # fp32 weights
        {**fp32_accumulation, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
    ):
        make(deepspeed=deepspeed)
    make(sam_method="mesa", bf16=True, deepspeed={**fp32_accumulation, "bf16": {"enabled": "auto"}})
    # From `accelerate launch`: the Trainer's accelerator holds the config, with "auto" filled from the arguments.
    for bf16 in (True, "auto"):
        plugin = SimpleNamespace(deepspeed_config={**fp32_accumulation, "bf16": {"enabled": bf16}})
        trainer = SimpleNamespace(
            args=SimpleNamespace(sam_enabled=True, bf16=True),
            is_deepspeed_enabled=True,
            accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
        )
        with pytest.raises(ValueError, match="grad_accum_dtype"):
            check_sam_setup(trainer)


def test_deepspeed_cpu_op_build_is_skipped_only_inside_the_block(monkeypatch):
    # DeepSpeed JIT-builds its shared-memory all-reduce op (a compiler, about a minute) when it starts its process
    # group on CPU; hf_sam's set-up calls skip it, and nowhere else is it touched.
    pytest.importorskip("deepspeed")
    import importlib

    from hf_sam.zero import SHM_ENV, without_shm_comm_build

    module = importlib.import_module("deepspeed.comm.torch")
    original = module.build_shm_op
    monkeypatch.delenv(SHM_ENV, raising=False)
    with without_shm_comm_build():
        assert module.build_shm_op is not original and module.build_shm_op() is None
    assert module.build_shm_op is original
    monkeypatch.setenv(SHM_ENV, "1")
    with without_shm_comm_build():
        assert module.build_shm_op is original


def test_a_deepspeed_without_the_held_backward_api_is_refused_with_the_version_to_install(monkeypatch):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.engine import DeepSpeedEngine

    from hf_sam.zero import check_deepspeed_version

    check_deepspeed_version()  # the installed one has it
    monkeypatch.delattr(DeepSpeedEngine, "coalesce_grad_reduction")
    with pytest.raises(ValueError, match=r"deepspeed>=0.19.8"):
        check_deepspeed_version()


def args_of(**kw):
    return SAMTrainingArguments(output_dir="unused", report_to="none", use_cpu=True, **kw)


@pytest.mark.parametrize("method", ["ss-sam", "late-sam", "asam"])
def test_a_schedule_that_never_runs_sam_with_the_presets_probability_is_refused(method):
    with pytest.raises(ValueError, match="sam_probability.*--sam_probability"):
        args_of(sam_method=method, sam_schedule="constant")


def test_the_documented_forms_still_construct():
    assert args_of(sam_method="ss-sam", sam_schedule="constant", sam_probability=0.5).sam_probability == 0.5
    assert args_of(sam_method="ss-sam").sam_schedule == "linear"  # the ramp: p from 0 to 1
    assert args_of(sam_method="late-sam").sam_schedule == "piecewise"
    assert args_of(sam_method="ss-sam", sam_schedule="cosine").sam_probability_end == 1.0
    # An explicit probability of 0 is the user's own choice: it wins, as every explicit flag does.
    assert args_of(sam_method="sam", sam_schedule="constant", sam_probability=0.0).sam_probability == 0.0


@pytest.mark.parametrize("name", ["sam_renormalize", "esam_swp", "sam_adaptive_bias", "sam_same_dropout"])
def test_a_bool_field_given_a_string_is_refused(name):
    # "false" is truthy: read as given, it would turn the setting on.
    with pytest.raises(ValueError, match=rf"{name}='false' must be True or False"):
        args_of(sam_method="sam", **{name: "false"})


def test_arguments_rebuilt_from_to_dict_are_the_same_run_without_a_warning():
    # `to_dict()` / `to_json_string()` hold the resolved fields, so a rebuild (an argument file written from a run,
    # `SAMTrainingArguments(**args.to_dict())`) gives every field explicitly. The run was the same, but the values
    # the preset and the axis defaults had filled were named as ignored flags to drop (16 of them under `none`).
    from transformers.testing_utils import CaptureLogger

    from hf_sam import arguments

    parser = HfArgumentParser(SAMTrainingArguments)
    names = [f.name for f in dataclasses.fields(SAMArgumentsMixin)]
    for method in METHODS:
        args = make(sam_method=method)
        with CaptureLogger(arguments.logger) as captured:
            (rebuilt,) = parser.parse_dict(json.loads(args.to_json_string()))
        assert "ignores" not in captured.out, (method, captured.out)
        assert {n: getattr(rebuilt, n) for n in names} == {n: getattr(args, n) for n in names}
    # A field the user gave, at a value the method ignores, is still named after the round trip.
    args = make(sam_method="sam", sam_sparsity=0.9)
    with CaptureLogger(arguments.logger) as captured:
        parser.parse_dict(json.loads(args.to_json_string()))
    assert "ignores sam_sparsity" in captured.out and captured.out.count("(acts only") == 1


@pytest.mark.parametrize(
    "values, name",
    [
        ({"sam_method": "fsam", "fsam_lambda": "0.5"}, "fsam_lambda"),  # a quoted number
        ({"sam_method": "sam", "fsam_lambda": None}, "fsam_lambda"),  # null for "the default"
        ({"sam_method": "momentum-sam", "sam_micro_batches": "2"}, "sam_micro_batches"),
        ({"sam_exclude": ["bias", "LayerNorm"]}, "sam_exclude"),  # a list of patterns
        ({"sam_include": True}, "sam_include"),
    ],
)
def test_a_value_of_the_wrong_type_in_an_argument_file_is_refused_naming_the_field(tmp_path, values, name):
    # JSON and YAML files and dicts reach the dataclass without the parser's type conversion; these values raised a
    # TypeError from a comparison or from `re`, which named no field.
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, **values}))
    with pytest.raises(ValueError, match=rf"^{name}="):
        HfArgumentParser(SAMTrainingArguments).parse_json_file(path)


def test_the_looksam_descent_brings_its_schedule_to_any_method():
    args = args_of(sam_method="sam", sam_descent="looksam", looksam_k=3)
    assert (args.sam_schedule, args.sam_interval) == ("every_k", 3)
    with pytest.raises(ValueError, match="sam_schedule='linear' contradicts it. Drop --sam_schedule, or use"):
        args_of(sam_method="ss-sam", sam_descent="looksam")


def test_bool_fields_are_found_before_and_after_the_parser_resolves_their_annotations():
    from hf_sam.arguments import _bool_field_kind

    assert [_bool_field_kind(t) for t in ("bool", "bool | None", "float | None")] == ["required", "optional", None]
    assert [_bool_field_kind(t) for t in (bool, bool | None, float | None)] == ["required", "optional", None]
    HfArgumentParser(SAMTrainingArguments)  # resolves the dataclass annotations in place
    with pytest.raises(ValueError, match="sam_renormalize='no' must be True or False"):
        args_of(sam_method="sam", sam_renormalize="no")


def _radii(tmp_path, args) -> list[float]:
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(32))
    trainer.train()
    return [round(h["sam/rho"], 6) for h in trainer.state.log_history if "sam/rho" in h]


def test_a_radius_changed_after_construction_stays_constant(tmp_path):
    # sam_rho_min used to be filled with the radius at construction, so a radius set afterwards (a hyperparameter
    # search trial's setattr, dataclasses.replace) turned on GSAM's lr-following schedule down to the old radius.
    from tests.helpers import sam_args

    common = dict(max_steps=4, lr_scheduler_type="linear", sam_method="sam")
    assert _radii(tmp_path, sam_args(tmp_path, sam_rho=0.1, **common)) == [0.1] * 4
    args = sam_args(tmp_path, **common)
    args.sam_rho = 0.1
    assert _radii(tmp_path, args) == [0.1] * 4
    assert _radii(tmp_path, dataclasses.replace(sam_args(tmp_path, **common), sam_rho=0.1)) == [0.1] * 4
    assert dataclasses.replace(sam_args(tmp_path, **common), sam_rho=0.01).sam_rho == 0.01  # was a ValueError
    assert make(sam_method="gsam", sam_rho=0.1, sam_rho_min=0.02).sam_rho_min == 0.02  # the schedule, when given


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.set_optimizer(name="sgd"), "adasam.*own optimizer"),  # AdaSAM's optimizer silently won
        (lambda a: setattr(a, "sam_rho", -0.05), "sam_rho=-0.05"),  # trained with a negative radius
        (lambda a: setattr(a, "sam_method", "asam"), "sam_method was changed from 'adasam' to 'asam'"),
    ],
)
def test_the_trainer_checks_arguments_changed_after_construction(tmp_path, change, match):
    # TrainingArguments' set_* helpers and plain attribute writes skip __post_init__: SAMTrainer checks again.
    args = make(sam_method="adasam")
    change(args)
    with pytest.raises(ValueError, match=match):
        SAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(8))


def test_the_trainer_checks_training_fields_changed_by_the_set_helpers(tmp_path):
    args = make(sam_method="stable-sam", sam_accumulation="micro")
    args.set_training(gradient_accumulation_steps=2)  # ran Stable SAM's whole-window rescale per micro-batch
    with pytest.raises(ValueError, match="with gradient_accumulation_steps > 1 use --sam_accumulation window"):
        SAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(8))
    args = make(sam_method="looksam")
    args.looksam_k = 5  # sam_interval was set from looksam_k at construction: SAM every 2 steps, not 5
    with pytest.raises(ValueError, match="looksam_k=5.*sam_interval=2"):
        SAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset(8))


def test_a_trial_that_changes_the_method_leaves_arguments_a_new_trainer_accepts(tmp_path):
    # The trial resolves the new method's preset, so the fields are that method's: building another trainer from the
    # same arguments must not see it as a method changed after construction.
    args = make(sam_method="sam")
    args._sam_apply_trial({"sam_method": "asam"})
    assert args.sam_ascent == "adaptive"
    args.check_after_changes()


def test_a_probability_changed_after_construction_moves_the_unset_end_too():
    # sam_probability_end was filled with sam_probability at construction, so a probability set afterwards (a
    # hyperparameter search trial's setattr, dataclasses.replace) ran a ramp back down to the old value.
    from hf_sam.schedules import mean_sam_probability, sam_probability

    args = make(sam_method="sam", sam_schedule="linear", sam_probability=0.2)
    args.sam_probability = 0.6
    assert [sam_probability(args, u) for u in (0.0, 0.5, 1.0)] == [0.6, 0.6, 0.6]
    assert mean_sam_probability(args) == 0.6
    replaced = dataclasses.replace(
        make(sam_method="sam", sam_schedule="cosine", sam_probability=0.2), sam_probability=0.6
    )
    assert sam_probability(replaced, 1.0) == 0.6
    # Given, or set by the preset, the end stays what it is.
    assert sam_probability(make(sam_method="ss-sam", sam_probability=0.2), 1.0) == 1.0
    assert (
        make(sam_method="sam", sam_schedule="linear", sam_probability=0.2, sam_probability_end=0.4).sam_probability_end
        == 0.4
    )
