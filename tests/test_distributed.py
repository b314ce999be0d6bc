"""SAM across processes: DDP through the Trainer, and the FSDP2 shard-aware core, on CPU with gloo.

Each script runs under `torch.distributed.run` with two processes and writes its measurements to JSON; the
asserts are here. `tests/distributed/ddp_check.py` trains the tiny BERT three ways (plain, SAM with per-rank
ascent, SAM with all-reduced ascent) and compares with plain-PyTorch references built from the batches each rank
saw; `tests/distributed/fsdp_core_check.py` runs `Perturbation` and `global_norm` on `fully_shard` DTensor shards;
`tests/distributed/zero_check.py` runs SAMTrainer under DeepSpeed ZeRO-1/2 against the same runs under DDP.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.distributed.fsdp_eval_check import CASES as FSDP_EVAL_CASES
from tests.distributed.fsdp_trainer_check import PARTS as FSDP_TRAINER_PARTS
from tests.distributed.fsdp_trainer_check import same_as_ddp_in
from tests.method_cases import METHOD_CASES


pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "distributed"
TOL = 1e-6

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCH_TIMEOUT_S = 600
# Each rank prints every thread's stack and exits this long after joining the group, so that a launch that hangs
# says where before `LAUNCH_TIMEOUT_S` ends it (`process_group.start_gloo` reads it).
HANG_REPORT_S = LAUNCH_TIMEOUT_S - 60


def _launch(script: str, out: Path, *extra: str, launcher: tuple[str, ...] | None = None) -> dict:
    """Run `script` in two processes and read the JSON it writes.

    torchrun's standalone mode binds its rendezvous to a port the system picks (a port chosen here and freed
    before torchrun binds it could be taken in between by another launch); `launcher` is a command that ends with
    its port flag, for launchers that need a port named.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_DISABLED="true",
        HF_SAM_CHECK_HANG_REPORT_S=str(HANG_REPORT_S),
    )
    if launcher is None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        command = [*launcher, str(_free_port())]
    command += [str(SCRIPTS / script), str(out), *extra]
    try:
        proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(
            f"{script} {' '.join(extra)} ran past {LAUNCH_TIMEOUT_S} s\n--- stdout (tail) ---\n"
            f"{(timeout.stdout or '')[-4000:]}\n--- stderr (tail) ---\n{(timeout.stderr or '')[-8000:]}",
            pytrace=False,
        )
    if proc.returncode != 0 or not out.exists():
        pytest.fail(
            f"{script} {' '.join(extra)} exited with {proc.returncode}\n--- stdout (tail) ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr (tail) ---\n{proc.stderr[-8000:]}",
            pytrace=False,
        )
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict:
    return _launch("ddp_check.py", tmp_path_factory.mktemp("ddp") / "ddp.json")


def _require_fsdp2() -> None:
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed.fsdp")
    from torch.distributed import fsdp as fsdp_module

    if not hasattr(fsdp_module, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> dict:
    _require_fsdp2()
    return _launch("fsdp_core_check.py", tmp_path_factory.mktemp("fsdp") / "fsdp.json")


CONFIGS = ("none", "sam_local", "sam_sync")


# ---------------------------------------------------------------------- DDP through the Trainer


def test_ddp_ranks_see_different_data_and_end_identical(ddp):
    for name in CONFIGS:
        result = ddp[name]
        assert result["world_size"] == 2
        assert result["steps_per_rank"] == [3, 3], name
        assert result["batch_sizes"] == [2], name
        # The sampler is sharded: 2 ranks x 3 steps = 6 different batches, so per-rank ascents really differ.
        assert result["distinct_batches_across_ranks"] == 6, name
        assert result["ranks_identical"], f"{name}: ranks diverged by {result['rank_max_diff']}"
        assert result["moved_from_init"] > 1e-3, f"{name}: training did not move the weights"


def test_ddp_effective_gradient_matches_the_loss_scaling_model(ddp):
    # The synced gradient of the first step, read just before optimizer.step(), equals loss_scale * the mean
    # over ranks of the per-rank gradients (descent gradients for SAM): this pins the Trainer's loss scaling
    # (num_items_in_batch / average_tokens_across_devices) that every reference below relies on.
    for name in CONFIGS:
        result = ddp[name]
        assert result["first_step_grad_max_diff"] < TOL, (
            name,
            result["first_step_grad_max_diff"],
            result["loss_scale"],
        )
        assert result["first_step_grad_abs_max"] > 1e-3, name


def test_ddp_plain_trainer_matches_sgd_on_the_mean_gradient(ddp):
    result = ddp["none"]
    assert result["ref_max_diff"] < TOL, result["ref_max_diff"]


def test_ddp_local_ascent_is_the_mean_of_per_rank_sam_descents(ddp):
    result = ddp["sam_local"]
    assert result["sam_ascent_sync"] is False
    assert result["ref_max_diff"] < TOL, result["ref_max_diff"]


def test_ddp_synced_ascent_is_full_batch_sam(ddp):
    result = ddp["sam_sync"]
    assert result["sam_ascent_sync"] is True
    assert result["ref_max_diff"] < TOL, result["ref_max_diff"]


def test_ddp_modes_are_distinguishable(ddp):
    # Far above the matching tolerance: the references above could not both pass with the modes swapped.
    assert ddp["max_diff_sam_local_vs_sync"] > 100 * TOL
    assert ddp["max_diff_sam_local_vs_none"] > 100 * TOL


def test_ddp_allreduce_counts(ddp):
    counts = {name: ddp[name]["allreduces_per_rank"] for name in CONFIGS}
    for name, per_rank in counts.items():
        assert len(set(per_rank)) == 1, f"{name}: ranks issued different all-reduces {per_rank}"
    plain, local_ascent, synced = (counts[name][0] for name in CONFIGS)
    assert plain > 0
    # Per-rank ascent adds no communication; the synced ascent all-reduces the clean gradient too.
    assert local_ascent == plain, counts
    assert synced > plain, counts
    assert synced == 2 * plain, counts


def test_ddp_sam_metrics_are_logged(ddp):
    expected = {"sam/grad_norm", "sam/perturbed_loss", "sam/sharpness", "sam/rho", "sam/skipped"}
    assert ddp["none"]["sam_log_keys"] == []
    for name in ("sam_local", "sam_sync"):
        result = ddp[name]
        assert expected <= set(result["sam_log_keys"]), result["sam_log_keys"]
        assert result["sam_log_count"] == 3
        # sam/grad_norm is the rank mean of the clean-gradient norm the ascent used: per-rank ||g_r|| for the
        # local ascent, ||mean_r g_r|| for the synced one (both times the Trainer's loss scale).
        logged, reference = result["logged_grad_norms"], result["ref_grad_norms"]
        assert len(logged) == len(reference) == 3
        for got, want in zip(logged, reference):
            assert math.isclose(got, want, rel_tol=1e-5, abs_tol=2e-6), (name, logged, reference)


# ---------------------------------------------------------------------- FSDP2 shards


def _rules(fsdp):
    assert fsdp["world_size"] == 2
    for rank, per_rank in enumerate(fsdp["per_rank"]):
        for rule in ("sam", "adaptive"):
            yield rank, rule, per_rank[rule]


def test_fsdp_parameters_are_unevenly_sharded_dtensors(fsdp):
    shapes = []
    for _, _, result in _rules(fsdp):
        assert result["param_and_grad_types"] == ["DTensor"]
        shapes.append(result["local_shapes"]["2.weight"][0])
    assert sorted(set(shapes)) == [2, 3], "the 5-row layer should be split 3 + 2 across the ranks"
    assert fsdp["ranks_agree"]


def test_fsdp_global_norm_matches_the_unsharded_model(fsdp):
    for rank, rule, result in _rules(fsdp):
        where = (rank, rule)
        assert result["grad_vs_reference_max_diff"] < TOL, where
        ref = result["ref_grad_norm"]
        assert ref > 1e-3, where
        assert math.isclose(result["global_norm_grads"], ref, rel_tol=TOL), (where, result["global_norm_grads"], ref)
        assert math.isclose(result["ascend_grad_norm"], ref, rel_tol=TOL), (where, result["ascend_grad_norm"], ref)
        assert math.isclose(result["global_norm_weights"], result["ref_weight_norm"], rel_tol=TOL), where
        assert math.isclose(result["dot_grads"], ref**2, rel_tol=2 * TOL), where
        assert result["skipped"] == 0.0, where


def test_fsdp_perturbed_weights_equal_w_plus_eps(fsdp):
    for rank, rule, result in _rules(fsdp):
        assert result["eps_abs_max"] > 1e-3, (rank, rule)  # a real perturbation, far above the tolerance
        assert result["perturbed_max_diff"] < TOL, (rank, rule, result["perturbed_max_diff"])
        assert result["active_after_ascend"] is True, (rank, rule)


def test_fsdp_descent_pass_sees_the_perturbed_weights(fsdp):
    # Forward+backward after ascend must run at w + eps: FSDP2 all-gathers the shards that ascend moved in place.
    for rank, rule, result in _rules(fsdp):
        assert result["descent_grad_vs_clean_grad_max_diff"] > 100 * TOL, (rank, rule)  # eps changes the gradient
        assert result["descent_grad_max_diff"] < TOL, (rank, rule, result["descent_grad_max_diff"])


def test_fsdp_restore_is_bit_exact(fsdp):
    for rank, rule, result in _rules(fsdp):
        assert result["restore_exact"] is True, (rank, rule)
        assert result["restore_vs_reference_max_diff"] == 0.0, (rank, rule)
        assert result["active_after_restore"] is False, (rank, rule)


def test_fsdp_sparse_masks_equal_the_unsharded_masks(fsdp):
    # Each rank holds its shards' masks; put together they are the masks of the unsharded model, for the random
    # starting mask, a drop-and-grow update and a Fisher mask (global top-k over both ranks' shards).
    masks = fsdp["masks"]
    assert masks["initial_equal"] and masks["drop_and_grow_equal"] and masks["fisher_equal"], masks
    assert masks["density"] == masks["ref_density"] and 0.3 < masks["density"] < 0.5
    assert masks["drop_and_grow_density"] == masks["drop_and_grow_ref_density"]


def test_fsdp_sharded_top_k_takes_exactly_k_entries_through_ties(fsdp):
    masks = fsdp["masks"]
    assert masks["ties_count"] == masks["ties_k"] and masks["ties_ordered"], masks


# ---------------------------------------------------------------------- SAMTrainer under FSDP2


def _fsdp_trainer_part(part: str):
    """A module fixture `fsdp_<part>`: the results of one part of `fsdp_trainer_check.py`, launched once."""

    @pytest.fixture(scope="module", name=f"fsdp_{part}")
    def results(tmp_path_factory) -> dict:
        _require_fsdp2()
        return _launch("fsdp_trainer_check.py", tmp_path_factory.mktemp(f"fsdp_{part}") / "fsdp_trainer.json", part)

    return results


# One fixture per part: each is one launch, and the two test workers share them out.
fsdp_reference, fsdp_table, fsdp_features, fsdp_resume = map(_fsdp_trainer_part, FSDP_TRAINER_PARTS)


@pytest.mark.parametrize("name", ["none", "sam", "stable-sam"])
def test_trainer_under_fsdp2_equals_full_batch_training(fsdp_reference, name):
    result = fsdp_reference[name]
    assert fsdp_reference["world_size"] == 2
    # The Trainer really sharded the model and built its optimizer over the shards.
    assert result["sharded_dtensor_params"] and result["optimizer_params_are_dtensors"], name
    assert result["steps_per_rank"] == [3, 3] and result["ranks_identical"], name
    assert result["moved_from_init"] > 1e-3, name
    assert result["ref_max_diff"] < 1e-5, (name, result["ref_max_diff"])
    if name != "none":
        assert result["sam_ascent_sync"] is True
        assert result["sam_passes_logged"] == [2.0, 2.0, 2.0], name


def test_gradient_accumulation_under_fsdp2_equals_the_full_batch_reference(fsdp_reference):
    # GA 2 on two ranks: one perturbation from the whole window's gradient, as the hand-written full-batch SAM step.
    result = fsdp_reference["sam-ga2"]
    assert result["ranks_identical"] and result["sam_ascent_sync"] is True
    assert result["ref_max_diff"] is not None and result["ref_max_diff"] < 1e-5, result["ref_max_diff"]


def test_sam_under_fsdp2_is_not_the_plain_run(fsdp_reference):
    assert fsdp_reference["max_diff_sam_vs_none"] > 1e-4


def test_every_method_says_how_it_runs_under_fsdp2():
    for name, case in METHOD_CASES.items():
        assert isinstance(case.get("fsdp"), (dict, str)), f"{name}: add an `fsdp` entry to its row in method_cases"


def check_same_as_ddp(results: dict, name: str) -> None:
    # The same SAM step on both (synced ascent, global norms and top-k masks); only the sharding differs. DDP's
    # runs are checked against hand-written loops elsewhere. AdaSAM's normalized steps amplify rounding.
    sharded, replicated = results[name], results[f"{name}-ddp"]
    assert sharded["sharded_dtensor_params"] and not replicated["sharded_dtensor_params"]
    # Trainer itself runs FSDP2 (as accelerate sets it up on GPUs): it defers the reduce-scatter inside a window.
    assert sharded["accelerate_fsdp2"] and not replicated["accelerate_fsdp2"]
    assert sharded["ranks_identical"] and replicated["ranks_identical"]
    tolerance = 1e-5 if name == "adasam" else 1e-6
    assert results[f"{name}_fsdp_vs_ddp_max_diff"] < tolerance, results[f"{name}_fsdp_vs_ddp_max_diff"]
    if name == "lora-sam":  # only the adapters (and the head) train; the sharded frozen base stays bit-identical
        assert sharded["frozen_count"] > 0 and sharded["frozen_unchanged"] and replicated["frozen_unchanged"]
        assert sharded["moved_from_init"] > 1e-3
    elif name == "checkpointed-sam":  # recomputing activations changes nothing: the SAM run without it
        assert sharded["gradient_checkpointing"] and replicated["gradient_checkpointing"]
        assert results[f"{name}_vs_sam_max_diff"] < 1e-6
    else:
        assert results[f"{name}_vs_sam_max_diff"] > 1e-5  # a different method really ran
    assert sharded["sam_passes_logged"] == replicated["sam_passes_logged"]


# Every method of the test table that has FSDP2 overrides (the others say in their row where they are checked).
@pytest.mark.parametrize("name", same_as_ddp_in("table"))
def test_every_method_under_fsdp2_equals_it_under_ddp_with_synced_ascent(fsdp_table, name):
    check_same_as_ddp(fsdp_table, name)


# Features on top of SAM: accumulation, an epoch cut mid-window, LoRA, activation checkpointing, ESAM's SDS alone.
@pytest.mark.parametrize("name", same_as_ddp_in("features"))
def test_every_feature_under_fsdp2_equals_it_under_ddp_with_synced_ascent(fsdp_features, name):
    check_same_as_ddp(fsdp_features, name)


@pytest.mark.parametrize("name", [name for name, case in METHOD_CASES.items() if case.get("fsdp_resume")])
def test_resume_under_fsdp2_equals_the_uninterrupted_run(fsdp_resume, name):
    # Trainer's FSDP checkpoint (model, optimizer) plus hf_sam's per-rank state: the shard masks, F-SAM's EMA shards.
    straight, resumed = fsdp_resume[f"{name}-straight"], fsdp_resume[f"{name}-resumed"]
    assert straight["sharded_dtensor_params"] and resumed["sharded_dtensor_params"]
    assert straight["steps_per_rank"] == [4, 4] and resumed["steps_per_rank"] == [2, 2]  # steps 3-4 after resuming
    assert fsdp_resume[f"{name}_resume_max_diff"] == 0.0, fsdp_resume[f"{name}_resume_max_diff"]
    assert fsdp_resume[f"{name}_saved_settings"]["fsdp_processes"] == "2"


def test_mesa_under_fsdp2_runs_its_teacher_on_the_ema_shards(fsdp_table):
    # Under FSDP2 the teacher borrows the model's shards (no copy of the model). Were it the student, the KL would
    # be 0; were it stale gathered weights, the run would leave the DDP run (a real copy of the model).
    sharded, replicated = fsdp_table["mesa"], fsdp_table["mesa-ddp"]
    # (The logged KLs keep 7 significant digits: reduce-scatter and all-reduce may round their last one apart.)
    assert sharded["mesa_kl_logged"] == pytest.approx(replicated["mesa_kl_logged"], rel=1e-5)
    assert max(sharded["mesa_kl_logged"]) > 1e-4, sharded["mesa_kl_logged"]
    assert fsdp_table["mesa_fsdp_vs_ddp_max_diff"] < 1e-6


def test_bf16_under_fsdp2_rho_zero_is_the_plain_run_and_sam_moves_elsewhere(fsdp_reference):
    # accelerate's FSDP2 mixed precision gathers bf16 copies of the fp32 shards: SAM perturbs and restores the fp32
    # shards, so rho 0 gives the plain run bit for bit.
    for name in ("bf16-none", "bf16-sam-rho0", "bf16-sam"):
        run = fsdp_reference[name]
        assert run["sharded_dtensor_params"] and run["finite"] and run["param_dtypes"] == ["torch.float32"], name
    assert fsdp_reference["bf16_rho0_vs_none_max_diff"] == 0.0
    assert fsdp_reference["bf16_sam_vs_none_max_diff"] > 1e-3
    assert 0 < fsdp_reference["bf16_sam_vs_fp32_sam_max_diff"] < 1e-2  # bf16 compute, the same SAM step


def test_saf_under_fsdp2_finds_its_targets_in_the_second_epoch(fsdp_table):
    # Steps 1-2 are epoch 0 (no earlier logits yet), step 3 is epoch 1: every example of its batch has a target.
    for run in (fsdp_table["saf"], fsdp_table["saf-ddp"]):
        assert run["saf_coverage_logged"] == [0.0, 0.0, 1.0], run["saf_coverage_logged"]
        assert run["saf_kl_logged"][-1] > 0
    assert fsdp_table["saf"]["saf_kl_logged"] == pytest.approx(fsdp_table["saf-ddp"]["saf_kl_logged"])


@pytest.mark.parametrize("name", ["ssam-f", "ssam-d"])
def test_sparse_sam_masks_under_fsdp2_have_the_density_they_have_under_ddp(fsdp_table, name):
    sharded, replicated = fsdp_table[name], fsdp_table[f"{name}-ddp"]
    assert sharded["mask_density_logged"] == pytest.approx(replicated["mask_density_logged"])
    assert all(0.4 < d <= 0.5 for d in sharded["mask_density_logged"]), sharded["mask_density_logged"]


# ---------------------------------------------------------------------- every method under DDP


@pytest.fixture(scope="module")
def ddp_methods(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("ddp_methods")
    return _launch("ddp_methods.py", work / "methods.json", str(work))


def test_every_method_runs_under_ddp_with_identical_ranks(ddp_methods):

    assert set(ddp_methods) == set(METHOD_CASES)
    for method, entry in ddp_methods.items():
        assert entry["ranks_identical"] and entry["finite"], method


def test_saf_bank_under_ddp_is_complete_and_identical_on_every_rank(ddp_methods):
    # The shuffled sampler moves examples between ranks each epoch: without the all-gather a rank would find
    # about half of its lookups missing (the official code reads zeros there).
    saf = ddp_methods["saf"]
    assert saf["saf_steps"] == 12
    assert saf["saf_bank_identical"] and saf["saf_bank_complete"]
    assert saf["saf_coverage"] == [1.0] * 8  # every lookup of epochs 1 and 2 found its example
    assert saf["saf_resume_max_diff"] == 0.0


# A branch unused on one rank (`ddp_find_unused_parameters=True`) leaves its tensors without a clean gradient there:
# GSAM's and LookSAM's clean copy, all-reduced under per-rank ascent, held different tensors on each rank, and the
# mismatched all-reduce aborted gloo ("Received data size doesn't match expected size"; NCCL would hang or mix them).
def test_descent_transforms_under_ddp_with_a_branch_unused_on_one_rank(tmp_path):
    results = _launch("ddp_unused_check.py", tmp_path / "unused.json", str(tmp_path))
    for method in ("gsam", "looksam"):
        assert results[method]["ranks_identical"] and results[method]["finite"], method


@pytest.fixture(scope="module")
def ddp_options(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("ddp_options")
    return _launch("ddp_options_check.py", work / "options.json", str(work))


def _ddp_option(results: dict, part: str) -> dict:
    result = results[part]
    assert "error" not in result, result["error"]  # the part raised (on every rank alike)
    return result


def test_per_rank_ascent_under_ddp_static_graph_is_refused_when_the_trainer_is_built(ddp_options):
    # DDP's static graph takes the run's first backward for its first iteration and all-reduces it; the per-rank
    # ascent's clean pass syncs nothing, and training failed there on "expect_autograd_hooks_ INTERNAL ASSERT FAILED".
    message = _ddp_option(ddp_options, "static")["local_ascent_refused"]
    assert message is not None and "ddp_static_graph" in message and "--sam_ascent_sync true" in message


def test_ssam_f_under_ddp_static_graph_equals_the_run_without_it(ddp_options):
    # SSAM-F's Fisher passes ran a backward before the step's first synced one: DDP took it for the static graph's
    # first iteration and all-reduced nothing after it (the ranks ended 0.28 apart from the run without it).
    result = _ddp_option(ddp_options, "static")
    assert result["ranks_identical"] and result["moved"] > 1e-3
    assert result["static_vs_dynamic"] == 0.0, result


def test_a_model_routed_by_its_weights_trains_under_ddp_as_the_mean_of_per_rank_sam_steps(ddp_options):
    # Expert b at w, expert c at w + eps: the unsynced clean pass marked b used on each rank, its gradient was then
    # dropped, and DDP's reduction failed ("Encountered gradient which is undefined, but still allreduced").
    result = _ddp_option(ddp_options, "routed")
    assert result["ranks_identical"] and result["moved"] > 1e-3
    assert result["ref_max_diff"] < TOL, result


def test_synced_ascent_per_micro_batch_under_ddp_averages_what_earlier_descents_reached(ddp_options):
    # A head used by some micro-batches only: a synced clean pass in the middle of the window ended DDP's iteration,
    # and a tensor only an earlier micro-batch's (or shard's) descent reached was left out of the window's reduction.
    result = _ddp_option(ddp_options, "branch")
    assert result["plain_moved"] > 1e-3
    assert result["micro_ranks_identical"] and result["micro_vs_plain"] == 0.0, result  # rho 0: the plain Trainer
    assert result["msam_ranks_identical"] and result["msam_sync_vs_local"] == 0.0, result  # rho 0: sync is moot


def test_resume_under_ddp_matches_uninterrupted_run(ddp_methods):
    resumed = {m: e["resume_max_diff"] for m, e in ddp_methods.items() if "resume_max_diff" in e}
    assert resumed, "no stateful method was resumed"
    for method, diff in resumed.items():
        assert diff == 0.0, f"{method}: resumed run differs by {diff}"


# ---------------------------------------------------------------------- DeepSpeed ZeRO-1 and ZeRO-2


def _zero_results(tmp_path_factory, mode: str) -> dict:
    pytest.importorskip("deepspeed", reason="the DeepSpeed checks need deepspeed (the test extra installs it)")
    results = _launch("zero_check.py", tmp_path_factory.mktemp(f"zero_{mode}") / "zero.json", mode)
    assert results["world_size"] == 2
    return results


@pytest.fixture(scope="module")
def zero(tmp_path_factory) -> dict:
    return _zero_results(tmp_path_factory, "default")


@pytest.fixture(scope="module")
def zero_full(tmp_path_factory) -> dict:
    return _zero_results(tmp_path_factory, "full")


def _zero_diff(results: dict, a: str, b: str) -> float:
    diffs = results["finals_max_diff"]
    return diffs[f"{a}|{b}"] if f"{a}|{b}" in diffs else diffs[f"{b}|{a}"]


def _zero_runs(results: dict) -> dict:
    return {name: run for name, run in results.items() if isinstance(run, dict) and "wrapper" in run}


def _assert_under_zero_equals_ddp(results: dict, name: str, stage: int) -> None:
    sharded, replicated = results[f"{name}-z{stage}"], results[f"{name}-ddp"]
    assert sharded["wrapper"] == "DeepSpeedEngine" and sharded["stage"] == stage
    assert replicated["wrapper"] == "DistributedDataParallel"  # not a DeepSpeed run left over in the environment
    assert sharded["sam_ascent_sync"] == replicated["sam_ascent_sync"]
    assert sharded["ranks_identical"] and replicated["ranks_identical"] and sharded["finite"]
    assert sharded["sam_passes_logged"] == replicated["sam_passes_logged"]
    # The same SAM step on replicated weights: only where the gradient is reduced differs. AdaSAM's normalized steps
    # amplify rounding (as under FSDP2).
    tolerance = 1e-5 if name == "adasam" else 1e-6
    assert _zero_diff(results, f"{name}-z{stage}", f"{name}-ddp") < tolerance, (name, stage)


@pytest.mark.parametrize("sync", ["local", "sync"])
def test_sam_under_zero_1_and_2_equals_ddp_with_the_same_ascent_sync(zero, sync):
    for stage in (1, 2):
        _assert_under_zero_equals_ddp(zero, f"sam-{sync}", stage)
        assert zero[f"sam-{sync}-z{stage}"]["sam_ascent_sync"] is (sync == "sync")
    # Each rank's own ascent is not the synced one: the two comparisons above could not both pass with them swapped.
    assert _zero_diff(zero, "sam-local-z2", "sam-sync-z2") > 1e-4


def test_every_method_family_under_zero_equals_it_under_ddp(zero):
    from tests.distributed.zero_check import DEFAULT_FAMILIES, FAMILIES

    for name in DEFAULT_FAMILIES:
        stage = FAMILIES[name]
        _assert_under_zero_equals_ddp(zero, name, stage)
        assert _zero_diff(zero, f"{name}-z{stage}", f"sam-sync-z{stage}") > 1e-4, name  # another method really ran
    assert {FAMILIES[name] for name in DEFAULT_FAMILIES} == {1, 2}


def test_gradient_clipping_under_zero_is_deepspeeds_and_equals_ddp(zero):
    _assert_under_zero_equals_ddp(zero, "sam-clip", 2)
    assert _zero_diff(zero, "sam-clip-z2", "sam-sync-z2") > 1e-3  # max_grad_norm=0.05 really clipped


def test_deepspeed_fp16_overflow_skips_and_loss_scale_behave_as_its_own_path(zero):
    if not zero["fp16_supported"]:
        pytest.skip("DeepSpeed's CPU accelerator has no fp16 on this CPU (oneDNN fp16 needs AVX512-FP16 or AMX-FP16)")
    plain, rho0 = zero["fp16-none-z2"], zero["fp16-sam-rho0-z2"]
    assert plain["param_dtypes"] == rho0["param_dtypes"] == ["torch.float16"]
    # A loss scale of 2 ** 18 overflows: DeepSpeed skips those steps and halves the scale, the same steps at rho 0
    # (whose clean passes overflow too: their ascent is skipped, sam/skipped), and the later steps train.
    assert plain["skipped_steps"] == rho0["skipped_steps"] >= 1 and plain["moved_from_init"] > 1e-3
    assert sum(rho0["sam_skipped_logged"]) >= 1
    assert _zero_diff(zero, "fp16-none-z2", "fp16-sam-rho0-z2") == 0.0
    # Stable SAM's ascent is unnormalized (eps = rho g): it matches fp32 only if the loss scale (2 ** 8) that the
    # held gradient carries is divided out.
    scaled = zero["fp16-stable-sam-z2"]
    assert scaled["skipped_steps"] == 0 and scaled["finite"] and scaled["step_diffs"] == [0.0, 0.0, 0.0]
    assert _zero_diff(zero, "fp16-stable-sam-z2", "fp16-stable-sam-fp32-z2") < 2e-3


def test_faults_under_zero_drop_the_update_skip_the_ascent_and_restore_w(zero):
    faults = zero["faults"]
    for name, fault in faults.items():
        assert fault["hit_step"] == 1 and fault["finite"] and fault["grads_left"] == 0, name
        assert not fault["engine_holding"] and fault["accelerate_wrapper"] == "DeepSpeedEngineWrapper", name
    # NaN at w + eps: that step's update is dropped through DeepSpeed's overflow skip, and training goes on.
    dropped = faults["nan-perturbed"]
    assert dropped["hit_step_update_max"] == 0.0 and dropped["skipped_steps"] == 1
    assert dropped["sam_skipped_updates"] == 1.0 and dropped["moved_after_hit"] > 1e-3 and dropped["steps"] == 4
    # NaN at w: the ascent is skipped (eps = 0), the step still updates.
    skipped = faults["nan-clean"]
    assert skipped["sam_skipped"] == 1.0 and skipped["skipped_steps"] == 0 and skipped["hit_step_update_max"] > 1e-3
    # An interrupt between the passes: w back bit for bit, the engine no longer holding its reduction.
    assert faults["interrupt"]["hit_step_update_max"] == 0.0 and faults["interrupt"]["steps"] == 1


def test_a_window_cut_short_under_zero_releases_the_engine(zero):
    # A callback that stops training at a step's start cuts the window after its first micro-batch. Where w is back
    # by then (SAM's micro mode, a plain window of a schedule) the step must still let go of the engine's held
    # reduction and of accelerate's wrapper, and drop the partial gradient, as after an interrupt.
    for name, stopped in zero["stopped"].items():
        assert stopped["steps"] == 1 and stopped["micro_batches"] == 3, (name, stopped)  # 2 + the cut window's first
        assert stopped["moved_in_cut_window"] == 0.0, (name, stopped)
        assert not stopped["engine_holding"], (name, stopped)
        assert stopped["accelerate_wrapper"] == "DeepSpeedEngineWrapper", (name, stopped)
        assert stopped["grads_left"] == 0, (name, stopped)


def test_zero_covers_every_method_of_the_table():
    pytest.importorskip("deepspeed")
    from hf_sam import METHODS
    from tests.distributed.zero_check import FAMILIES

    # Every method that claims DeepSpeed runs against DDP there; the others are refused under DeepSpeed with the
    # error their row lists (test_each_method_entry_states_its_capabilities_truthfully).
    claimed = {name for name in METHOD_CASES if METHODS[name].capabilities.deepspeed}
    assert {"none", "sam", *FAMILIES} == claimed


def test_rho_zero_under_zero_is_the_plain_deepspeed_trainer_bit_for_bit(zero):
    # The held passes, the one reduction of the held gradient and engine.step(): at rho 0 exactly Trainer's own path.
    for prefix, stages in (("", (1, 2)), ("bf16-", (2,))):
        for stage in stages:
            assert zero[f"{prefix}none-z{stage}"]["wrapper"] == "DeepSpeedEngine"
            assert _zero_diff(zero, f"{prefix}none-z{stage}", f"{prefix}sam-rho0-z{stage}") == 0.0, (prefix, stage)
    assert _zero_diff(zero, "none-z1", "none-z2") == 0.0


def test_weights_are_restored_before_every_engine_step_and_no_ascent_gradient_reaches_the_descent(zero):
    # Under ZeRO-1/2 the final weights cannot show a missing restore (engine.step() copies the fp32 master partitions
    # back into the module), nor a missing zero_grad: the probe reads them on the engine itself.
    checked = 0
    for name, run in _zero_runs(zero).items():
        if run["wrapper"] != "DeepSpeedEngine":
            continue
        # One engine.step() per optimizer step of this train() call (a resumed run starts at its checkpoint's step).
        assert len(run["step_diffs"]) == run["steps"] - run["first_step"], name
        assert all(diff == 0.0 for diff in run["step_diffs"]), (name, run["step_diffs"])
        perturbed = [(step, grad) for distance, grad, step in run["backwards"] if distance > 0]
        if name.startswith(("none", "saf", "mesa", "bf16-none", "fp16-none")) or "rho0" in name:
            assert not perturbed, name  # one pass at w
            continue
        assert perturbed, f"{name}: no backward ran at w + eps"
        # The first backward at w + eps of each step starts from no gradient: the ascent's gradient became eps and was
        # dropped. (Later ones in the step add to the descent gradient.)
        firsts = {}
        for step, grad in perturbed:
            firsts.setdefault(step, grad)
        assert all(grad == 0.0 for grad in firsts.values()), (name, firsts)
        checked += 1
    assert checked >= 20


def test_gradient_accumulation_window_under_zero_equals_the_doubled_batch(zero):
    for stage in (1, 2):
        run = zero[f"sam-ga2-z{stage}"]
        assert run["ranks_identical"] and run["steps"] == 3
        # GA 2 x batch 1 sees the same examples per step as GA 1 x batch 2 (across both ranks): one SAM step.
        assert _zero_diff(zero, f"sam-ga2-z{stage}", f"sam-sync-z{stage}") < 1e-6
    _assert_under_zero_equals_ddp(zero, "sam-micro-ga2", 2)


def test_bf16_under_zero_runs_and_stage_1_equals_stage_2(zero):
    for name in ("bf16-none-z2", "bf16-sam-rho0-z2", "bf16-sam-sync-z1", "bf16-sam-sync-z2"):
        run = zero[name]
        assert run["param_dtypes"] == ["torch.bfloat16"] and run["finite"] and run["ranks_identical"], name
    assert _zero_diff(zero, "bf16-sam-sync-z1", "bf16-sam-sync-z2") == 0.0
    assert 0 < _zero_diff(zero, "bf16-sam-sync-z2", "sam-sync-z2") < 1e-2  # bf16 compute, the same SAM step
    assert _zero_diff(zero, "bf16-sam-sync-z2", "bf16-none-z2") > 1e-4


def _assert_resumed(results: dict, name: str) -> None:
    straight, resumed = results[f"{name}-straight"], results[f"{name}-resumed"]
    assert straight["wrapper"] == resumed["wrapper"] == "DeepSpeedEngine"
    assert straight["steps"] == resumed["steps"] == 4 and len(resumed["step_diffs"]) == 2  # steps 3-4 after resuming
    assert _zero_diff(results, f"{name}-straight", f"{name}-resumed") == 0.0, name


@pytest.mark.parametrize("name", ["fsam", "mesa", "weight-ema"])
def test_resume_from_a_deepspeed_checkpoint_equals_the_uninterrupted_run(zero, name):
    _assert_resumed(zero, name)


def test_the_weight_average_under_zero_is_built_from_the_stepped_weights_and_equals_ddp(zero):
    # engine.step() copies DeepSpeed's fp32 master partitions into the module: the average is built from those
    # weights after every step, on both ranks, scored by the evaluations and left in the model, as under DDP.
    _assert_under_zero_equals_ddp(zero, "weight-ema", 1)
    sharded, replicated = zero["weight-ema-z1"], zero["weight-ema-ddp"]
    for run in (sharded, replicated):
        assert run["unchanged_steps"] == [] and run["ema_vs_iterates"] < 1e-6, run
        assert run["ema_vs_last_iterate"] > 1e-3  # the model holds the average, not the last trained weights
    assert len(sharded["eval_losses"]) == 4
    assert sharded["eval_losses"] == pytest.approx(replicated["eval_losses"], rel=1e-6)


def test_a_step_deepspeed_skips_is_not_folded_into_the_weight_average(zero):
    # DeepSpeed skips a step whose gradient overflowed (under fp16 the first steps, while its initial loss scale is too
    # large; here a NaN loss at step 0) and says so in its optimizer's `overflow`: that step changed no weight. The
    # average built at it started at the weights before training and kept a tenth of them after the next update: it
    # ended 1.9e-4 from the average of the iterates.
    run = zero["none-weight-ema-skip-z2"]
    assert run["wrapper"] == "DeepSpeedEngine" and run["skipped_steps"] == 1 and run["unchanged_steps"] == [0]
    assert run["ranks_identical"] and run["ema_vs_iterates"] < 1e-6, run


def test_resuming_adasam_under_zero_with_another_method_is_refused_before_deepspeed_reads_its_optimizer(zero):
    # DeepSpeed's engine reads the checkpoint's optimizer state (AdaSAMOptimizer's) right after building the optimizer,
    # before Trainer's _load_optimizer_and_scheduler, where hf_sam refuses it under DDP: it failed with a bare
    # KeyError('step') from torch's AdamW.
    for other, outcome in zero["refused_resumes"].items():
        assert outcome.startswith("ValueError:"), (other, outcome)
        assert "sam_method='adasam'" in outcome and "AdaSAMOptimizer" in outcome, (other, outcome)


def test_auto_find_batch_size_under_zero_retries_on_the_new_engine(tmp_path):
    # The retry after an out-of-memory error rebuilds the DeepSpeed engine: the SAM step held the released one (its
    # optimizer and scheduler stepped, the new engine's never did), so the retried run trained off the fresh one.
    pytest.importorskip("deepspeed", reason="the DeepSpeed checks need deepspeed (the test extra installs it)")
    results = _launch("zero_retry_check.py", tmp_path / "retry.json")
    assert results["batch"] == 7 and results["current_engine"] == [True] * 3
    assert results["max_diff"] == 0.0
    assert results["logs_retried"] == results["logs_fresh"]


@pytest.mark.slow
def test_every_method_under_both_zero_stages_equals_it_under_ddp(zero_full):
    from tests.distributed.zero_check import FAMILIES, RESUMED_FULL

    for name in ("sam-local", "sam-sync", "sam-micro-ga2", *FAMILIES):
        for stage in (1, 2):
            _assert_under_zero_equals_ddp(zero_full, name, stage)
    assert _zero_diff(zero_full, "bf16-none-z1", "bf16-sam-rho0-z1") == 0.0
    for name in RESUMED_FULL:
        _assert_resumed(zero_full, name)


def test_the_shipped_zero2_config_as_a_file_path_equals_ddp(zero):
    run = zero["sam-sync-shipped-json"]
    assert run["wrapper"] == "DeepSpeedEngine" and run["stage"].endswith("deepspeed_zero2.json")
    assert run["ranks_identical"] and run["step_diffs"] == [0.0, 0.0, 0.0]
    assert _zero_diff(zero, "sam-sync-shipped-json", "sam-sync-ddp") < 1e-6


@pytest.mark.slow
def test_accelerate_launch_with_the_shipped_zero2_config_equals_ddp(zero, tmp_path):
    # The config comes from accelerate (examples/accelerate_configs/deepspeed_zero2.yaml and its JSON: ZeRO-2 with
    # overlap_comm and contiguous_gradients), not from `deepspeed=`: the same SAM step as under DDP.
    config = ROOT / "examples" / "accelerate_configs" / "deepspeed_zero2.yaml"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
                "2", "--main_process_port")  # fmt: skip
    launched = _launch("zero_launch_check.py", tmp_path / "launched.json", launcher=launcher)
    assert launched["world_size"] == 2 and launched["args_deepspeed"] is None
    assert launched["wrapper"] == "DeepSpeedEngine" and launched["zero"]["stage"] == 2
    assert launched["zero"]["overlap_comm"] and launched["zero"]["contiguous_gradients"]
    assert launched["ranks_identical"] and launched["steps"] == 3
    from_file = launched["from_file"]  # the same JSON as `deepspeed=` a file path
    assert from_file["args_deepspeed"].endswith("deepspeed_zero2.json") and from_file["zero"]["stage"] == 2
    assert from_file["wrapper"] == "DeepSpeedEngine" and from_file["ranks_identical"]
    assert launched["from_file_max_diff"] == 0.0
    final, ddp = launched["final"], zero["sam-sync-ddp-final"]
    assert len(final) == len(ddp)
    assert max(abs(a - b) for a, b in zip(final, ddp)) < 1e-6


# ---------------------------------------------------------------- evaluation during training under FSDP2


@pytest.fixture(scope="module")
def fsdp_eval(tmp_path_factory) -> dict:
    _require_fsdp2()
    return _launch("fsdp_eval_check.py", tmp_path_factory.mktemp("fsdp_eval") / "fsdp_eval.json")


@pytest.mark.parametrize("name", list(FSDP_EVAL_CASES))
def test_evaluating_during_training_under_fsdp2_changes_no_weight(fsdp_eval, name):
    # FSDP2 keeps the root's parameters gathered after an evaluation's forward; what hf_sam writes into the shards
    # next (Momentum-SAM's shift, the weight average's restore, MESA's teacher) must reach the next forward.
    result = fsdp_eval[name]
    assert result["fsdp_eval_vs_fsdp"] < 1e-6, result
    assert result["fsdp_eval_vs_ddp_eval"] < 1e-6, result


# ---------------------------------------------------------------- a step dropped on one rank's NaN: the logged means


@pytest.fixture(scope="module")
def dropped(tmp_path_factory) -> dict:
    return _launch("ddp_dropped_metrics_check.py", tmp_path_factory.mktemp("dropped") / "dropped.json")


@pytest.mark.parametrize("name", ["window-log1", "window-log4", "micro-log1", "micro-log4"])
def test_a_step_dropped_on_one_ranks_nan_is_left_out_of_the_logged_losses_on_every_rank(dropped, name):
    result = dropped[name]
    assert result["rank1_hit_is_nan"]
    for logged, expected in zip(result["logged"], result["expected"]):
        if expected is None:  # the log's window held only the dropped step: no sample on any rank, no key
            assert logged is None, result
            continue
        assert math.isfinite(logged), result
        assert logged == pytest.approx(expected, abs=2e-6), result


def test_every_ranks_state_file_is_written_before_the_trainer_state(tmp_path):
    # last_complete_checkpoint takes a readable trainer_state.json (which Trainer writes last, on rank 0) for a whole
    # checkpoint; a rank slow to write its sam_state-rank{i}.safetensors left a checkpoint that a kill at that moment
    # made look whole without it.
    result = _launch("ddp_checkpoint_order_check.py", tmp_path / "order.json")
    assert result["rank1_file_there_when_the_state_was_written"] == [True, True]


def test_the_own_mean_check_decides_on_every_rank_at_the_same_call(tmp_path):
    # A rank whose probed loss was exactly 0 stayed undecided and probed again alone at its next step (4 probe
    # forwards on rank 1, 2 on rank 0), scaling that step's loss term otherwise than the other rank did.
    result = _launch("ddp_item_count_probe_check.py", tmp_path / "probe.json")
    assert result["per_rank"] == [{"probes": [0, 0], "decision": False}] * 2  # both probes at step 0, on each rank
