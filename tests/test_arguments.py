"""SAMTrainingArguments: presets, CLI parsing, --help, and clear errors before training starts."""

import math

import pytest
from transformers import HfArgumentParser

from hf_sam import METHODS, SAMSeq2SeqTrainingArguments, SAMTrainer, SAMTrainingArguments
from hf_sam.arguments import SAMArgumentsMixin
from tests.helpers import tiny_bert, tiny_dataset


def make(**kw):
    return SAMTrainingArguments(output_dir="unused", report_to="none", use_cpu=True, **kw)


def test_presets_fill_unset_fields():
    assert make().sam_method == "sam"
    assert make().sam_rho == 0.05 and make().sam_adaptive is False
    asam = make(sam_method="asam")
    assert asam.sam_rho == 0.5 and asam.sam_adaptive is True and asam.sam_adaptive_eta == 0.01
    assert make(sam_method="none").sam_rho == 0.0


def test_explicit_flag_wins_over_preset():
    args = make(sam_method="asam", sam_rho=1.0, sam_adaptive_eta=0.0)
    assert args.sam_rho == 1.0 and args.sam_adaptive_eta == 0.0 and args.sam_adaptive is True
    assert make(sam_method="sam", sam_adaptive=True).sam_adaptive is True


def test_every_sam_field_is_a_cli_flag_with_help(capsys):
    parser = HfArgumentParser(SAMTrainingArguments)
    sam_fields = [f for f in SAMArgumentsMixin.__dataclass_fields__.values()]
    prefixes = ("sam_", "esam_", "looksam_", "gsam_", "fsam_", "saf_", "mesa_")
    assert all(f.name.startswith(prefixes) and f.metadata.get("help") for f in sam_fields)
    help_text = parser.format_help()
    for f in sam_fields:
        assert f"--{f.name}" in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "sam_method" in capsys.readouterr().out


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
    assert args.sam_rho == 0.5 and hasattr(args, "predict_with_generate")


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
        ({"sam_adaptive": True, "sam_normalize_ascent": False}, "contradict"),
        ({"sam_method": "none", "sam_rho": 0.1}, "contradict"),
        ({"sam_include": "("}, "sam_include"),
        ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "DeepSpeed"),
        ({"optim": "lomo"}, "optim"),
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
        ({"sam_ascent": "fsam", "sam_adaptive": True}, "contradict"),
        ({"sam_ascent": "sideways"}, "sam_ascent"),
        ({"sam_method": "esam", **FSDP2}, "FSDP always syncs the ascent"),
        ({"sam_method": "sam", "sam_ascent_sync": False, **FSDP2}, "sam_ascent_sync"),
        ({"sam_method": "sam", "fsdp": True, "fsdp_config": {"version": 1}}, "FSDP2"),
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
    args = make(sam_method="esam", sam_mask="none", **FSDP2)  # SDS alone runs under FSDP (tested in DDP/FSDP runs)
    assert args.sam_ascent_sync is True and args.esam_gamma == 0.5


def test_every_registered_method_constructs():
    for name in METHODS:
        assert make(sam_method=name).sam_method == name


def test_axes_combine_freely():
    # any ascent rule with any schedule, renormalization and both accumulation modes (where SPEC allows)
    for ascent in ("sam", "adaptive", "unnormalized", "fsam"):
        for schedule in ("always", "constant", "every_k", "cosine"):
            args = make(sam_ascent=ascent, sam_adaptive=ascent == "adaptive", sam_schedule=schedule,
                        sam_renormalize=True)  # fmt: skip
            assert (args.sam_ascent, args.sam_schedule, args.sam_renormalize) == (ascent, schedule, True)
            assert make(sam_ascent=ascent, sam_adaptive=ascent == "adaptive", sam_micro_batches=2,
                        sam_accumulation="micro").sam_micro_batches == 2  # fmt: skip
