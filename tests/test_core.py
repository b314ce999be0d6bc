"""The SAM core without Trainer: ascent rules, schedules, restore, non-finite handling, AdaSAM's optimizer."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_sam.components import ASCENT_RULES, build_ascent
from hf_sam.optim import AdaSAMOptimizer
from hf_sam.perturbation import Perturbation, select_perturbed
from hf_sam.schedules import SCHEDULES, is_sam_step, mean_sam_probability, sam_probability
from hf_sam.tensors import global_norm


def rule_args(**kw):
    base = {"sam_ascent": "sam", "sam_adaptive_eta": 0.01, "sam_adaptive_bias": False}
    base.update(fsam_sigma=1.0, fsam_lambda=0.9)
    return SimpleNamespace(**{**base, **kw})


def mlp(c: float = 1.0, bias: bool = False) -> nn.Sequential:
    """A ReLU MLP with its first unit scaled by c (weights and bias) and the next layer's weights by 1 / c."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8, bias=bias), nn.ReLU(), nn.Linear(8, 3, bias=bias))
    with torch.no_grad():
        model[0].weight.mul_(c)
        if bias:
            model[0].bias.mul_(c)
        model[2].weight.div_(c)
    return model


def grads_for(model):
    torch.manual_seed(1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def eps_of(model, rule, rho, **fields):
    """eps of `rule` (eta 0 unless `fields` say otherwise) by parameter name; the model is restored exactly."""
    named = select_perturbed(model, None, None)
    before = [p.detach().clone() for _, p in named]
    perturbation = Perturbation(named, build_ascent(rule_args(sam_ascent=rule, **{"sam_adaptive_eta": 0.0, **fields})))
    perturbation.ascend(rho)
    eps = {name: p.detach() - b for (name, p), b in zip(named, before)}
    perturbation.restore()
    assert all(torch.equal(p, b) for (_, p), b in zip(named, before))
    return eps


def test_sam_eps_has_norm_rho():
    model = mlp()
    grads_for(model)
    eps = eps_of(model, "sam", 0.05)
    assert math.isclose(torch.sqrt(sum((e**2).sum() for e in eps.values())).item(), 0.05, rel_tol=1e-5)


def test_asam_is_invariant_to_rescaling_between_relu_layers():
    # w1 -> c w1, w2 -> w2 / c leaves the ReLU network's function unchanged; with eta = 0 ASAM's perturbation
    # scales with the weights (eps1 -> c eps1, eps2 -> eps2 / c), so the perturbed function is unchanged too.
    c = 3.0
    base, scaled = mlp(), mlp(c)
    grads_for(base)
    grads_for(scaled)
    e_base, e_scaled = eps_of(base, "adaptive", 0.5), eps_of(scaled, "adaptive", 0.5)
    torch.testing.assert_close(e_scaled["0.weight"], c * e_base["0.weight"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(e_scaled["2.weight"], e_base["2.weight"] / c, rtol=1e-4, atol=1e-7)
    # plain SAM is not invariant: the same check fails for it
    s_base, s_scaled = eps_of(base, "sam", 0.5), eps_of(scaled, "sam", 0.5)
    assert not torch.allclose(s_scaled["0.weight"], c * s_base["0.weight"], rtol=1e-2)


@pytest.mark.parametrize("scale_biases", [True, False])
def test_asam_with_scaled_biases_is_invariant_to_rescaling_a_whole_relu_unit(scale_biases):
    # (w1, b1) -> c (w1, b1), w2 -> w2 / c leaves a ReLU network with biases unchanged. With T = |b| + eta on the
    # biases (sam_adaptive_bias) eps follows the rescaling on every tensor, the first bias included; the paper's
    # T = 1 on biases breaks it: then the perturbed function depends on c.
    c = 3.0
    base, scaled = mlp(bias=True), mlp(c, bias=True)
    grads_for(base)
    grads_for(scaled)
    e_base = eps_of(base, "adaptive", 0.5, sam_adaptive_bias=scale_biases)
    e_scaled = eps_of(scaled, "adaptive", 0.5, sam_adaptive_bias=scale_biases)
    expected = {"0.weight": c, "0.bias": c, "2.weight": 1 / c}
    matches = [torch.allclose(e_scaled[n], f * e_base[n], rtol=1e-4, atol=1e-7) for n, f in expected.items()]
    assert all(matches) == scale_biases, matches


def test_asam_with_scaled_biases_gives_eps_rho_t2_g_over_the_norm_of_t_g():
    model = mlp(bias=True)
    grads_for(model)
    params = dict(model.named_parameters())
    grads = {n: p.grad.clone() for n, p in params.items()}  # the rule turns .grad into eps in place
    eta, rho = 0.01, 0.3
    eps = eps_of(model, "adaptive", rho, sam_adaptive_eta=eta, sam_adaptive_bias=True)
    t = {n: p.detach().abs() + eta for n, p in params.items()}
    norm = torch.sqrt(sum(((t[n] * grads[n]) ** 2).sum() for n in params))
    for n in params:
        torch.testing.assert_close(eps[n], rho * t[n] ** 2 * grads[n] / norm, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("rule", list(ASCENT_RULES))
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_gradient_gives_zero_eps_and_exact_restore(rule, bad):
    model = mlp()
    grads_for(model)
    model[0].weight.grad[0, 0] = bad
    named = select_perturbed(model, None, None)
    before = [p.detach().clone() for _, p in named]
    perturbation = Perturbation(named, build_ascent(rule_args(sam_ascent=rule)))
    _, skipped = perturbation.ascend(0.05)
    assert skipped.item() == 1.0
    assert all(torch.equal(p, b) for (_, p), b in zip(named, before))  # eps = 0: nothing moved
    perturbation.restore()
    assert all(torch.equal(p, b) for (_, p), b in zip(named, before))


def test_bf16_weights_restore_bit_exactly():
    model = mlp().to(torch.bfloat16)
    grads_for_bf16 = [torch.randn_like(p) * 1e-6 for p in model.parameters()]  # eps below bf16 resolution
    for p, g in zip(model.parameters(), grads_for_bf16):
        p.grad = g
    named = select_perturbed(model, None, None)
    before = [p.detach().clone() for _, p in named]
    perturbation = Perturbation(named, build_ascent(rule_args()))
    perturbation.ascend(1e-4)
    perturbation.restore()
    assert all(torch.equal(p, b) for (_, p), b in zip(named, before))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_global_norm_of_half_precision_tensors_is_not_rounded_to_their_dtype(dtype):
    # The per-tensor norms of bf16/fp16 gradients must reach the sum in fp32: rounded to bf16 first, ‖g‖ (and with it
    # ‖ε‖ and Stable SAM's rescaling) was off by up to 0.4%.
    torch.manual_seed(0)
    tensors = [torch.randn(1000).to(dtype) for _ in range(5)]
    exact = torch.stack([t.double().norm() for t in tensors]).square().sum().sqrt()
    result = global_norm(tensors)
    assert result.dtype == torch.float32
    assert math.isclose(result.item(), exact.item(), rel_tol=1e-6), (result.item(), exact.item())


@pytest.mark.parametrize("rule", ["adaptive", "fsam"])
def test_an_ascent_rule_holds_one_tensors_worth_of_temporaries(rule):
    # ASAM's T = |w| + eta and F-SAM's new average were built for every tensor at once: one more copy of the
    # perturbed weights at every SAM step, beside the gradient and the backup. Built group by group, as much as the
    # largest tensor is held at a time.
    from tests.helpers import PeakNewTensorBytes

    generator = torch.Generator().manual_seed(0)
    shapes = [(32, 16)] * 6 + [(16,)] * 2
    names = [f"t{i}.weight" for i in range(len(shapes))]
    params = [torch.randn(s, generator=generator) for s in shapes]
    ascent = build_ascent(rule_args(sam_ascent=rule, sam_adaptive_bias=True))
    first = [torch.randn(s, generator=generator) for s in shapes]
    average = [g.clone() for g in first]  # F-SAM's, after its first step
    ascent(names, params, first, 0.05, 1.0, global_norm(first))
    grads = [torch.randn(s, generator=generator) for s in shapes]
    expected = [g.clone() for g in grads]
    if rule == "adaptive":
        t = [p.abs() + 0.01 for p in params]
        norm = global_norm([ti * g for ti, g in zip(t, expected)])
        expected = [0.05 * ti * ti * g / (norm + 1e-12) for ti, g in zip(t, expected)]
    else:
        d = [g - m for g, m in zip(expected, average)]  # sigma 1
        expected = [0.05 * x / (global_norm(d) + 1e-12) for x in d]
    with PeakNewTensorBytes() as counted:
        ascent(names, params, grads, 0.05, 1.0, global_norm(grads))
    assert counted.peak < sum(4 * math.prod(s) for s in shapes) / 4  # one (32, 16) tensor at a time
    torch.testing.assert_close(grads, expected)


def test_fsam_first_step_is_sam_then_subtracts_the_previous_ema():
    model = mlp()
    named = select_perturbed(model, None, None)
    rule = build_ascent(rule_args(sam_ascent="fsam", fsam_sigma=1.0, fsam_lambda=0.5))
    g1 = [torch.ones_like(p) for _, p in named]
    g2 = [torch.full_like(p, 3.0) for _, p in named]
    names, params = [n for n, _ in named], [p for _, p in named]
    eps1 = [g.clone() for g in g1]
    rule(names, params, eps1, 1.0, 1.0, global_norm(g1))
    n1 = math.sqrt(sum(g.numel() for g in g1))
    torch.testing.assert_close(eps1[0], g1[0] / n1)  # d = g on the first step
    eps2 = [g.clone() for g in g2]
    rule(names, params, eps2, 1.0, 1.0, global_norm(g2))
    # d = g2 - m1 with m1 = g1 (the EMA before this step's update): 3 - 1 = 2 everywhere, normalized
    torch.testing.assert_close(eps2[0], torch.full_like(eps2[0], 2.0) / (2.0 * n1))
    torch.testing.assert_close(rule.ema[names[0]], torch.full_like(eps2[0], 0.5 * 1 + 0.5 * 3))


def test_fsam_keeps_subtracting_the_ema_when_another_tensor_gets_its_first_gradient():
    # A tensor can first get a gradient after the first step (ESAM's SWP drops tensors from the clean pass, a routed
    # model uses an expert later): it starts its own EMA, d = g there, while the others keep d = g - sigma m_prev and
    # their EMA update. Its arrival used to make the whole step d = g, and skip every other tensor's EMA update.
    model = mlp()
    named = select_perturbed(model, None, None)
    names, params = [n for n, _ in named], [p for _, p in named]
    rule = build_ascent(rule_args(sam_ascent="fsam", fsam_sigma=1.0, fsam_lambda=0.5))
    first = [torch.ones_like(params[0])]  # step 1: only the first tensor has a gradient
    rule(names[:1], params[:1], first, 1.0, 1.0, global_norm(first))
    both = [torch.full_like(params[0], 3.0), torch.full_like(params[1], 2.0)]  # step 2: the second one arrives
    rule(names, params, both, 1.0, 1.0, global_norm(both))
    d = [torch.full_like(params[0], 3.0 - 1.0), torch.full_like(params[1], 2.0)]
    norm = global_norm(d)
    torch.testing.assert_close(both[0], d[0] / norm)
    torch.testing.assert_close(both[1], d[1] / norm)
    torch.testing.assert_close(rule.ema[names[0]], torch.full_like(params[0], 0.5 * 1 + 0.5 * 3))
    torch.testing.assert_close(rule.ema[names[1]], torch.full_like(params[1], 2.0))


def test_fsam_ema_skips_a_non_finite_gradient():
    # An fp16 overflow must not enter the EMA: with inf in m every later d would be inf - inf and SAM would
    # silently turn into the plain optimizer for the rest of training.
    model = mlp()
    grads_for(model)
    named = select_perturbed(model, None, None)
    perturbation = Perturbation(named, build_ascent(rule_args(sam_ascent="fsam", fsam_lambda=0.5)))
    perturbation.ascend(0.05)
    perturbation.restore()
    ema = {name: value.clone() for name, value in perturbation.rule.ema.items()}
    grads_for(model)
    model[0].weight.grad[0, 0] = math.inf
    _, skipped = perturbation.ascend(0.05)
    perturbation.restore()
    assert skipped.item() == 1.0
    assert all(torch.equal(perturbation.rule.ema[name], value) for name, value in ema.items())
    grads_for(model)  # the next finite step ascends normally
    _, skipped = perturbation.ascend(0.05)
    assert skipped.item() == 0.0
    assert all(torch.isfinite(p).all() for _, p in named)


def test_fsam_average_starts_at_the_first_finite_gradient():
    # Under fp16 the GradScaler's first steps often overflow (its scale starts high): the step after them is F-SAM's
    # first, so d = g and m starts as g, as the official code's first step, not as (1 - lambda) g from a zero start.
    model = mlp()
    named = select_perturbed(model, None, None)
    perturbation = Perturbation(named, build_ascent(rule_args(sam_ascent="fsam", fsam_lambda=0.9)))
    for _ in range(2):  # two overflowed clean passes
        grads_for(model)
        model[0].weight.grad[0, 0] = math.inf
        _, skipped = perturbation.ascend(0.05)
        perturbation.restore()
        assert skipped.item() == 1.0
    grads_for(model)
    g = {name: p.grad.clone() for name, p in named}
    perturbation.ascend(0.05)
    perturbation.restore()
    for name, value in perturbation.rule.ema.items():
        torch.testing.assert_close(value, g[name])
    # ... and the state says so across a checkpoint: the next step updates m as usual.
    reloaded = build_ascent(rule_args(sam_ascent="fsam", fsam_lambda=0.9))
    reloaded.load_state_dict(perturbation.rule.state_dict())
    assert bool(reloaded.started)


def test_fsam_average_of_bf16_gradients_is_kept_in_float32():
    # Gradients whose mean dominates their noise, F-SAM's case: in bf16, m's update (1 - lambda)(g - m) mostly fell
    # below half a unit in the last place of m and rounded away, and d = g - m, a tenth of g, inherited m's error
    # ten times over: eps was 8.7% off the one from the same bf16 gradients with m held exactly.
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(4000, generator=generator)
    rule = build_ascent(rule_args(sam_ascent="fsam", fsam_sigma=1.0, fsam_lambda=0.9))
    m = None
    for _ in range(60):
        g = (mean + 0.1 * torch.randn(4000, generator=generator)).to(torch.bfloat16)
        eps = [g.clone()]
        rule(["w"], [None], eps, 0.05, 1.0, global_norm(eps))
        d = g.double() if m is None else g.double() - m
        m = g.double() if m is None else 0.9 * m + 0.1 * g.double()
    # eps itself is bf16 (it sits in `.grad`): off by its own rounding only (0.18%).
    expected = 0.05 * d / d.norm()
    assert (eps[0].double() - expected).norm() / 0.05 < 5e-3
    torch.testing.assert_close(rule.ema["w"].double(), m, rtol=1e-5, atol=1e-6)
    assert rule.ema["w"].dtype == torch.float32


# ---------------------------------------------------------------- schedules (SS-SAM)


def schedule_args(schedule, p0=0.5, p1=0.5, boundary=0.5, interval=2, seed=0):
    return SimpleNamespace(sam_schedule=schedule, sam_probability=p0, sam_probability_end=p1,
                           sam_schedule_boundary=boundary, sam_interval=interval, seed=seed)  # fmt: skip


@pytest.mark.parametrize(
    "schedule, p0, p1",
    [
        ("constant", 0.5, 0.5),
        ("constant", 0.2, 0.2),
        ("piecewise", 0.2, 0.8),
        ("linear", 0.1, 0.9),
        ("cosine", 0.9, 0.1),
    ],  # fmt: skip
)
def test_sam_step_share_is_within_3_sigma_of_the_mean_probability(schedule, p0, p1):
    steps = 2000
    args = schedule_args(schedule, p0, p1)
    probabilities = [sam_probability(args, t / steps) for t in range(steps)]
    share = sum(is_sam_step(args, t, steps) for t in range(steps)) / steps
    mean = sum(probabilities) / steps
    sigma = math.sqrt(sum(p * (1 - p) for p in probabilities)) / steps
    assert abs(share - mean) < 3 * sigma
    assert math.isclose(mean_sam_probability(args), mean, abs_tol=1e-3)  # the closed form is the average of p(t)


def test_schedule_shapes():
    assert sam_probability(schedule_args("piecewise", 0.2, 0.8, boundary=0.3), 0.29) == 0.2
    assert sam_probability(schedule_args("piecewise", 0.2, 0.8, boundary=0.3), 0.31) == 0.8
    assert math.isclose(sam_probability(schedule_args("linear", 0.0, 1.0), 0.25), 0.25)
    assert math.isclose(sam_probability(schedule_args("cosine", 0.0, 1.0), 0.5), 0.5)
    assert [is_sam_step(schedule_args("every_k", interval=3), t, 10) for t in range(6)] == [1, 0, 0, 1, 0, 0]
    assert mean_sam_probability(schedule_args("every_k", interval=3)) == 1 / 3
    assert mean_sam_probability(schedule_args("always", 0.2, 0.2)) == 1.0
    assert set(SCHEDULES) == {"always", "constant", "piecewise", "linear", "cosine", "every_k"}


def test_draws_depend_only_on_seed_and_step():
    # Same answer whatever the global RNG does: identical on every rank and after a resume.
    args = schedule_args("constant")
    first = [is_sam_step(args, t, 100) for t in range(100)]
    torch.manual_seed(123)
    torch.rand(1000)
    assert [is_sam_step(args, t, 100) for t in range(100)] == first
    assert [is_sam_step(schedule_args("constant", seed=1), t, 100) for t in range(100)] != first


# ---------------------------------------------------------------- AdaSAM's optimizer


@pytest.mark.parametrize("bias_correction", [True, False])
def test_adasam_optimizer_is_amsgrad_with_or_without_bias_correction(bias_correction):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6))
    opt = AdaSAMOptimizer([w], lr=0.1, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1, bias_correction=bias_correction)
    ref_w, m, v, v_hat = w.detach().clone(), torch.zeros(6), torch.zeros(6), torch.full((6,), 1e-6)
    for t in range(1, 6):
        g = torch.randn(6)
        w.grad = g.clone()
        opt.step()
        ref_w = ref_w * (1 - 0.1 * 0.1)
        m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
        v_hat = torch.maximum(v_hat, v)
        if bias_correction:  # Adam's m / (1 - b1^t) over sqrt(v / (1 - b2^t)), with the running max of v
            ref_w = ref_w - 0.1 * (m / (1 - 0.9**t)) / (v_hat / (1 - 0.99**t)).sqrt()
        else:
            ref_w = ref_w - 0.1 * m / v_hat.sqrt()
        torch.testing.assert_close(w.detach(), ref_w)


def test_adasam_bias_correction_keeps_early_steps_at_the_learning_rate():
    # The defining property of the correction: a constant gradient moves each weight by lr per step from the first
    # step on, where the paper's uncorrected rule moves it by (1 - b1^t) / sqrt(1 - b2^t) lr: 3.2 lr at t = 1.
    for bias_correction, first_step in ((True, 0.1), (False, 0.1 * 0.1 / 0.001**0.5)):
        w = nn.Parameter(torch.zeros(3))
        opt = AdaSAMOptimizer([w], lr=0.1, eps=1e-12, bias_correction=bias_correction)
        w.grad = torch.ones(3)
        opt.step()
        torch.testing.assert_close(w.detach(), torch.full((3,), -first_step))


def test_adasam_step_count_survives_a_state_dict_round_trip():
    w = nn.Parameter(torch.zeros(2))
    opt = AdaSAMOptimizer([w], lr=0.1)
    for _ in range(3):
        w.grad = torch.ones(2)
        opt.step()
    fresh = AdaSAMOptimizer([w], lr=0.1)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["step"] == 3


def test_adasam_optimizer_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="AdaSAM"):
        AdaSAMOptimizer([nn.Parameter(torch.zeros(1))], lr=-1.0)


def test_looksam_keeps_g_v_in_the_steps_own_copy_of_g():
    # g_v = g~ - (<g~, g>/||g||^2) g is written into the step's copy of g, which the pipeline drops after the step: a
    # new buffer for it, while that copy and the previous g_v are still alive, was one more copy of the perturbed
    # parameters at every SAM step.
    from hf_sam.looksam import LookSAMReuse
    from tests.helpers import PeakNewTensorBytes

    generator = torch.Generator().manual_seed(0)
    shapes = [(32, 16)] * 6 + [(16,)] * 2
    names = [f"t{i}" for i in range(len(shapes))]
    grads = [torch.randn(s, generator=generator) for s in shapes]
    clean = [torch.randn(s, generator=generator) for s in shapes]
    g, g_tilde = torch.cat([c.reshape(-1) for c in clean]), torch.cat([x.reshape(-1) for x in grads])
    expected = g_tilde - (g_tilde @ g) / (g @ g + 1e-12) * g
    transform = LookSAMReuse(SimpleNamespace(looksam_alpha=0.7))
    transform.g_v = {name: torch.randn(s, generator=generator) for name, s in zip(names, shapes)}  # the previous g_v
    with PeakNewTensorBytes() as counted:
        transform.after_sam_step(names, grads, clean, global_norm(clean))
    assert counted.peak < sum(4 * math.prod(s) for s in shapes) / 4  # a product of one tensor at a time, in `dot`
    torch.testing.assert_close(torch.cat([transform.g_v[n].reshape(-1) for n in names]), expected)
