"""One row per registered method: drives the shared feature tests. A method without a row fails
`test_registry_has_a_test_row_for_every_method`.

- `args`: the SAMTrainingArguments fields of the case.
- `reference`: keyword arguments of `tests.reference.Reference` that compute the same method by hand
  (None: the plain optimizer).
- `accumulation`: the accumulation modes the method runs in with GA > 1 (descent transforms act on the whole
  window; mSAM perturbs per shard).
- `reference["mask"] == "from_trainer"`: Sparse SAM; the hand loop takes the trainer's mask (checked on its own
  in test_masks) and must reproduce the masked steps.
- `rho_zero_plain` / `window_invariant` (default True): False for ESAM, whose data selection changes which
  examples the descent sees (at rho 0 every rise is 0 and the pick is arbitrary; windows select per micro-batch).
- `optimizer`: "own" when the method brings its optimizer (AdaSAM), so the tests must not pass one.
- `fsdp`: overrides for the FSDP2-equals-DDP check (`tests/distributed/fsdp_trainer_check.py`), or a string saying
  where else the method is checked under FSDP2 or why it is refused there. Every row has one (a test checks it).
- `ddp_resume`: True where resume under 2-process DDP is checked (`tests/distributed/ddp_methods.py`);
  `fsdp_resume`: True where resume under FSDP2 with sharded state dicts is checked (one per kind of state: masks,
  an ascent rule's average, a loss term's teacher).
- `errors`: bad inputs of the method, each (field overrides, text the `ValueError` must contain), checked when the
  arguments are built (`tests/test_arguments.py`). Every row has at least one.
- `kind: "loss_term"`: the one-pass loss-term methods (SAF, MESA). They never perturb, so the SAM-only tests
  (reference loop, rho 0) skip them; their hand-written loops are in tests/test_loss_terms.py (`reference`
  names it). The feature tests (window invariance, fp16, bf16, LoRA, resume, DDP) run them.
"""

from types import SimpleNamespace

from hf_sam.schedules import is_sam_step


def _ramp_draws(step: int) -> bool:
    # The reference uses the same (seed, global_step) draws as the ramp p = t / 4 of the ss-sam and asam presets
    # over these 4-step runs (docs/methods.md#ss-sam); their statistics are checked on their own.
    args = SimpleNamespace(sam_schedule="linear", sam_probability=0.0, sam_probability_end=1.0, seed=0)
    return is_sam_step(args, step, 4)


BOTH = ("window", "micro")

METHOD_CASES = {
    "none": {
        "args": {"sam_method": "none"},
        "reference": None,
        "accumulation": BOTH,
        "fsdp": "checked against a full-batch single-process reference under FSDP2 (CONFIGS)",
        "errors": [({"sam_rho": 0.1}, "contradict")],
    },
    "sam": {
        "args": {"sam_method": "sam", "sam_rho": 0.05},
        "reference": {"rho": 0.05},
        "accumulation": BOTH,
        "fsdp": "checked against a full-batch single-process reference under FSDP2 (CONFIGS)",
        "errors": [({"sam_rho": -1.0}, "sam_rho")],
    },
    "asam": {
        "args": {"sam_method": "asam", "sam_rho": 0.5},
        "reference": {"rho": 0.5, "ascent": "adaptive", "eta": 0.01, "scale_biases": True, "sam_step": _ramp_draws},
        "accumulation": BOTH,
        "fsdp": {},
        "errors": [({"sam_adaptive_eta": -1.0}, "sam_adaptive_eta")],
    },
    "ss-sam": {
        "args": {"sam_method": "ss-sam"},
        "reference": {"rho": 0.1, "sam_step": _ramp_draws},
        "accumulation": BOTH,
        "fsdp": {},
        "ddp_resume": True,
        "errors": [({"sam_probability": 1.5}, "sam_probability")],
    },
    "momentum-sam": {  # eps from the optimizer's first moment: plain first step (no moment yet), then perturbed
        "args": {"sam_method": "momentum-sam", "sam_rho": 0.2},
        "reference": {"rho": 0.2, "direction": "momentum"},
        "accumulation": ("window",),
        "fsdp": {"optim_args": "momentum=0.9"},  # the check's SGD, with a first moment to perturb along
        "errors": [
            ({"sam_mask": "fisher"}, "sam_direction='momentum'"),
            ({"sam_accumulation": "micro"}, "nothing to act on"),
            ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "DeepSpeed ZeRO"),
        ],
    },
    "late-sam": {  # the switch moved to the middle of these 4-step runs: plain steps 0-1, SAM steps 2-3
        "args": {"sam_method": "late-sam", "sam_schedule_boundary": 0.5},
        "reference": {"rho": 0.1, "sam_step": lambda t: t >= 2},
        "accumulation": BOTH,
        "fsdp": {},
        "errors": [({"sam_schedule_boundary": 2.0}, "sam_schedule_boundary")],
    },
    "stable-sam": {
        # The paper's USAM ascent (eps = rho g, whose fp16 loss scale must be divided out) with the renormalized
        # descent; the preset's normalized ascent is `sam`'s, tested in its row.
        "args": {"sam_method": "stable-sam", "sam_ascent": "unnormalized"},
        "reference": {"rho": 0.05, "ascent": "unnormalized", "renormalize": True},
        "accumulation": ("window",),
        "fsdp": "checked against a full-batch single-process reference under FSDP2 (CONFIGS)",
        "errors": [({"sam_accumulation": "micro", "gradient_accumulation_steps": 2}, "window")],
    },
    "adasam": {
        # v_hat starts at eps^2: with eps = 1e-8 a 1e-8 rounding difference in a tiny gradient entry moves the
        # step by ~5e-3, so the comparison with the hand loop uses eps = 1e-3 on both sides.
        "args": {"sam_method": "adasam", "adam_epsilon": 1e-3},
        "reference": {"rho": 0.05},
        "accumulation": BOTH,
        "optimizer": "own",
        "optimizer_eps": 1e-3,
        "fsdp": {},
        "ddp_resume": True,
        "errors": [({"optim": "sgd"}, "own optimizer")],
    },
    "msam": {
        "args": {"sam_method": "msam", "sam_micro_batches": 2},
        "reference": {"rho": 0.05, "shards": 2, "accumulation": "micro"},
        "accumulation": ("micro",),
        "fsdp": {},
        "errors": [({"sam_accumulation": "window"}, "contradicts"), ({"sam_renormalize": True}, "descent transform")],
    },
    "looksam": {
        # The preset reuses nothing (alpha 0); the row sets the paper's alpha so the reuse is tested.
        "args": {"sam_method": "looksam", "looksam_k": 3, "looksam_alpha": 0.7},
        "reference": {"rho": 0.1, "rho_warmup": 1.0, "descent": "looksam", "sam_step": lambda t: t % 3 == 0},
        "accumulation": ("window",),
        "fsdp": {"looksam_k": 2},
        "ddp_resume": True,
        "errors": [
            ({"sam_schedule": "constant"}, "LookSAM"),
            ({"sam_interval": 4}, "looksam_k"),
            ({"looksam_k": 0}, "looksam_k=0"),
        ],
    },
    "gsam": {
        "args": {"sam_method": "gsam"},
        "reference": {"rho": 0.05, "descent": "gsam"},
        "accumulation": ("window",),
        "fsdp": {},
        "ddp_resume": True,
        "errors": [
            ({"sam_accumulation": "micro", "gradient_accumulation_steps": 2}, "window"),
            ({"sam_rho_min": 1.0}, "sam_rho_min"),
        ],
    },
    "fsam": {
        "args": {"sam_method": "fsam"},
        "reference": {"rho": 0.05, "ascent": "fsam"},
        "accumulation": BOTH,
        "fsdp": {},
        "ddp_resume": True,
        "errors": [({"fsam_lambda": 1.0}, "fsam_lambda")],
        "fsdp_resume": True,
    },
    "ssam-f": {
        "args": {"sam_method": "ssam-f", "sam_fisher_samples": 16},
        "reference": {"rho": 0.05, "mask": "from_trainer"},
        "accumulation": BOTH,
        "fsdp": {"sam_mask_interval": 1, "sam_fisher_samples": 4},
        "ddp_resume": True,
        "errors": [({"sam_sparsity": 1.0}, "sam_sparsity")],
    },
    "ssam-d": {
        "args": {"sam_method": "ssam-d"},
        "reference": {"rho": 0.07071, "mask": "from_trainer"},
        "accumulation": BOTH,
        "fsdp": {"sam_mask_interval": 1},
        "ddp_resume": True,
        "errors": [({"sam_mask_drop_rate": 1.5}, "sam_mask_drop_rate")],
        "fsdp_resume": True,
    },
    "esam": {
        # The preset is SWP alone; the row adds the data selection (per class, the default ranking) to test both.
        "args": {"sam_method": "esam", "esam_gamma": 0.5},
        "reference": {"rho": 0.03, "esam_beta": 0.6, "esam_gamma": 0.5},
        "accumulation": BOTH,
        "rho_zero_plain": False,
        "window_invariant": False,
        "fsdp": "SWP needs each rank's own ascent, which FSDP2 cannot give: refused; SDS alone runs as esam-sds",
        "errors": [
            ({"fsdp": True, "fsdp_config": {"version": 2}}, "FSDP always syncs the ascent"),
            ({"esam_beta": 0.0}, "esam_beta"),
        ],
    },
    # In these short runs SAF's bank fills (its term starts an epoch later); MESA's term is on from step 0.
    "saf": {
        "args": {"sam_method": "saf"},
        "kind": "loss_term",
        "reference": "tests/test_loss_terms.py",
        "accumulation": ("window",),
        "fsdp": {"saf_start_epoch": 0.0, "train_size": 8},
        "ddp_resume": True,
        "errors": [({"sam_rho": 0.1}, "nothing to act on"), ({"saf_tau": 0.0}, "saf_tau")],
    },
    "mesa": {
        "args": {"sam_method": "mesa", "mesa_ema_decay": 0.9},
        "kind": "loss_term",
        "reference": "tests/test_loss_terms.py",
        "accumulation": ("window",),
        "fsdp": {"mesa_ema_decay": 0.5, "learning_rate": 3.0},
        "ddp_resume": True,
        "errors": [({"mesa_ema_decay": 1.0}, "mesa_ema_decay"), ({"sam_mask": "fisher"}, "nothing to act on")],
        "fsdp_resume": True,
    },
}
