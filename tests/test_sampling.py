"""The six methods' semantics, proved numerically on a linear denoiser with a parameter per step.

The denoiser eps_n(x) = w[n] * x + c[n] has its own (w, c) for each chain position n, so the
gradient of w tells exactly which steps carried a parameter gradient.
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from rayreward import methods, sampling
from rayreward.config import MethodConfig
from rayreward.methods import StepPlan

from helpers import LinearDenoiser


def make_schedule(T: int, dtype=torch.float64) -> sampling.Schedule:
    sch = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)
    s = sampling.Schedule.from_scheduler(sch, T)
    return sampling.Schedule(s.timesteps, s.abar.to(dtype), s.abar_prev.to(dtype), s.prediction_type)


def run(plan: StepPlan, T: int, B: int = 2, seed: int = 0, x_T=None, **kw):
    sch = make_schedule(T)
    den = LinearDenoiser(sch)
    x_T = torch.randn(B, 4, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) if x_T is None else x_T
    res = sampling.sample(den, sch, x_T, plan, **kw)
    return res, den, sch, x_T


def grad_positions(den: LinearDenoiser) -> set[int]:
    return {i + 1 for i, g in enumerate(den.w.grad) if g != 0} if den.w.grad is not None else set()


@pytest.mark.parametrize("method,T,expected", [
    (MethodConfig(name="draft"), 6, {1, 2, 3, 4, 5, 6}),
    (MethodConfig(name="draft_k", k=2), 6, {5, 6}),
    (MethodConfig(name="draft_k", k=1), 8, {8}),
    (MethodConfig(name="draft_lv", lv_copies=2), 6, {6}),
])
def test_deterministic_methods_train_exactly_their_steps(method, T, expected):
    plan = methods.make_plan(method, T, batch=2)
    res, den, sch, _ = run(plan, T)
    res.latents.sum().backward()
    assert grad_positions(den) == expected
    grad_records = [r for r in res.trace if r.grad]
    assert {r.position for r in grad_records} == expected
    assert all(r.timestep == int(sch.timesteps[r.position - 1]) for r in res.trace)


def test_drtune_plan_equally_spaced_with_the_design_offset_range():
    for T, K, m in [(10, 2, 4), (10, 3, 4), (20, 3, 8), (50, 2, 20), (7, 7, 1)]:
        stride = T // K
        offsets, tmins = set(), set()
        for seed in range(400):
            p = methods.plan_drtune(T, K, m, torch.Generator().manual_seed(seed))
            steps = p.info["steps"]
            assert p.info["stride"] == stride and len(steps) == K
            assert all(b - a == stride for a, b in zip(steps, steps[1:]))
            assert 1 <= steps[0] and steps[-1] <= T
            offsets.add(steps[0])
            tmins.add(p.info["t_min"])
            assert p.stop == T - p.info["t_min"] + 1
            assert p.grad_steps == frozenset(n for n in steps if n <= p.stop)
            assert p.detach_input
        assert offsets == set(range(1, T - (K - 1) * stride + 1)), (T, K)  # s ~ U{1 .. T-(K-1)*stride}
        assert tmins == set(range(1, m + 1))


def test_drtune_gradient_flows_only_along_the_linear_path():
    """Autograd against a hand-computed gradient: with sg(x_t) at the UNet input,
    dL/dx_n = a_n * dL/dx_{n+1} and dL/dw_k = <dL/dx_{k+1}, b_k * x_k>."""
    T, stop, trained = 6, 5, {2, 4}
    plan = StepPlan(T, frozenset(trained), detach_input=True, stop=stop)
    x_T = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    res, den, sch, _ = run(plan, T, x_T=x_T)
    res.latents.sum().backward()

    a = (sch.abar_prev.sqrt() / sch.abar.sqrt())
    b = (1 - sch.abar_prev).sqrt() - sch.abar_prev.sqrt() * (1 - sch.abar).sqrt() / sch.abar.sqrt()
    # L = sum(x0_hat(x_stop)); eps_stop is a constant (not trained) -> dL/dx_stop = 1/sqrt(abar_stop)
    dx = {stop: 1 / sch.abar[stop - 1].sqrt()}
    for n in range(stop - 1, 0, -1):
        dx[n] = a[n - 1] * dx[n + 1]
    assert torch.allclose(x_T.grad, torch.full_like(x_T, float(dx[1])), rtol=1e-10)
    xs = {pos: x for pos, x, _ in den.inputs}
    for k in range(1, T + 1):
        expected = float((dx[k + 1] * b[k - 1] * xs[k]).sum()) if k in trained else 0.0
        assert math.isclose(float(den.w.grad[k - 1]), expected, rel_tol=1e-9, abs_tol=1e-12), k
    assert all(not req for _, _, req in den.inputs)  # the denoiser never saw a graph-carrying input
    assert res.latents.shape == x_T.shape and len(res.trace) == stop

    # the same plan without the detach lets gradient through the denoiser input: a different dL/dx_T
    x_T2 = x_T.detach().clone().requires_grad_(True)
    res2, _, _, _ = run(StepPlan(T, frozenset(trained), detach_input=False, stop=stop), T, x_T=x_T2)
    res2.latents.sum().backward()
    assert not torch.allclose(x_T2.grad, x_T.grad)


@pytest.mark.parametrize("method", [MethodConfig(name="draft"), MethodConfig(name="draft_k", k=2),
                                    MethodConfig(name="draft_lv", lv_copies=3),
                                    MethodConfig(name="drtune", k=2, early_stop_m=4),
                                    MethodConfig(name="refl", refl_window=[1, 5]), MethodConfig(name="alignprop")],
                         ids=lambda m: m.name)
def test_unet_calls_are_the_denoiser_evaluations_per_sample(method):
    """What train.max_unet_calls counts: every row the denoiser evaluates, divided by the batch."""
    T, B, seen = 8, 2, set()
    for seed in range(6):
        plan = methods.make_plan(method, T, B, torch.Generator().manual_seed(seed))
        res, den, _, _ = run(plan, T, B=B)
        assert res.unet_calls == sum(x.shape[0] for _, x, _ in den.inputs) / B
        seen.add(res.unet_calls)
    expected = {"draft": {8}, "draft_k": {8}, "draft_lv": {11}, "alignprop": {8}}
    if method.name in expected:
        assert seen == expected[method.name]
    else:  # an early stop runs fewer calls, varying with the step's draw
        assert max(seen) <= T and len(seen) > 1


def test_early_stop_returns_the_one_step_prediction():
    T, stop = 8, 5
    res, den, sch, _ = run(StepPlan(T, frozenset(), stop=stop), T)
    pos, x_stop, _ = den.inputs[-1]
    assert pos == stop and len(den.inputs) == stop
    eps = den.w[stop - 1] * x_stop + den.c[stop - 1]
    expected = (x_stop - (1 - sch.abar[stop - 1]).sqrt() * eps) / sch.abar[stop - 1].sqrt()
    assert torch.allclose(res.latents, expected.detach())


def test_refl_window_and_single_trained_step():
    T, window = 10, (1, 4)
    stops = set()
    for seed in range(200):
        p = methods.plan_refl(T, window, torch.Generator().manual_seed(seed))
        assert p.grad_steps == frozenset({p.stop}) and not p.detach_input
        stops.add(p.stop)
    assert stops == set(range(T - window[1] + 1, T - window[0] + 2))  # positions 7..10
    plan = methods.plan_refl(T, window, torch.Generator().manual_seed(3))
    res, den, sch, _ = run(plan, T)
    res.latents.sum().backward()
    assert grad_positions(den) == {plan.stop}
    # the chain stops at the trained step; only it carries gradient, on an input that is not
    # detached (DRTune's sg(x_t) would show as input_detached there)
    assert [(r.position, r.grad, r.input_detached) for r in res.trace] == (
        [(n, False, True) for n in range(1, plan.stop)] + [(plan.stop, True, False)])
    # and the gradient is exactly that of x0_hat at the stop through eps = w x + c:
    # d sum(x0_hat) / d w = -sqrt(1 - abar) / sqrt(abar) * sum(x), d / d c = the same * numel
    n, (_, x_stop, _) = plan.stop - 1, den.inputs[-1]
    k = -(1 - sch.abar[n]).sqrt() / sch.abar[n].sqrt()
    assert torch.allclose(den.w.grad[n], k * x_stop.sum()) and torch.allclose(den.c.grad[n], k * x_stop.numel())


def test_alignprop_per_sample_truncation():
    T, first = 6, (3, 5, 6)
    plan = StepPlan(T, frozenset(range(3, T + 1)), sample_grad_from=first)
    for i, f in enumerate(first):
        res, den, _, _ = run(plan, T, B=3)
        res.latents[i].sum().backward()  # the loss of sample i alone
        assert grad_positions(den) == set(range(f, T + 1)), i
    ks = set()
    for seed in range(200):
        p = methods.plan_alignprop(T, (2, 4), [torch.Generator().manual_seed(seed)] * 4)
        assert all(2 <= T - f + 1 <= 4 for f in p.sample_grad_from)
        assert p.grad_steps == frozenset(range(min(p.sample_grad_from), T + 1))
        ks.update(p.info["k"])
    assert ks == {2, 3, 4}


def test_draft_lv_renoises_the_detached_output_n_times():
    T, n, B = 6, 3, 2
    g = torch.Generator().manual_seed(7)
    res, den, sch, x_T = run(methods.plan_draft_lv(T, n), T, B=B, generator=g)
    assert res.latents.shape == (n * B, 4, 3, 3) and res.copies == n
    assert [r.grad for r in res.trace] == [False] * T + [True]
    # the anchor x0: the plain chain
    anchor, _, _, _ = run(methods.plan_inference(T), T, B=B, x_T=x_T)
    # invert x0_i = (x1_i - s1 * (w x1_i + c)) / a1 to get x1_i, then z_i = (x1_i - a1 * x0) / s1
    a1, s1 = sch.abar[-1].sqrt(), (1 - sch.abar[-1]).sqrt()
    w, c = den.w[-1].detach(), den.c[-1].detach()
    x1 = (a1 * res.latents.detach() + s1 * c) / (1 - s1 * w)
    z = (x1 - a1 * anchor.latents.repeat(n, 1, 1, 1)) / s1
    expected_z = torch.randn(z.shape, generator=torch.Generator().manual_seed(7), dtype=z.dtype)
    assert torch.allclose(z, expected_z, atol=1e-8)
    res.copy_mean(res.latents.flatten(1).sum(1)).sum().backward()
    assert grad_positions(den) == {T}
    # copy_mean averages copies of the same sample: rows i, B + i, 2B + i
    v = torch.arange(n * B, dtype=torch.float64)
    assert torch.equal(res.copy_mean(v), torch.tensor([2.0, 3.0], dtype=torch.float64))


def test_full_chain_matches_diffusers_ddim_step():
    T = 7
    sch = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)
    ours = sampling.Schedule.from_scheduler(sch, T)
    den = lambda x, t: 0.1 * x + 0.01 * t  # noqa: E731
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    res = sampling.sample(den, ours, x, methods.plan_inference(T))
    ref = x.clone()
    for t in sch.timesteps:
        ref = sch.step(den(ref, t), t, ref, eta=0.0).prev_sample
    assert torch.allclose(res.latents, ref, atol=1e-5)


def test_v_prediction_coefficients_are_exact():
    """A v-prediction step: x0_hat = c x + d v and x_{n+1} = a x + b v are DDIM's step written in v."""
    sch = sampling.Schedule(torch.tensor([500]), torch.tensor([0.3], dtype=torch.float64),
                            torch.tensor([0.6], dtype=torch.float64), "v_prediction")
    abar, abar_prev = 0.3, 0.6
    x0, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x_t = abar ** 0.5 * x0 + (1 - abar) ** 0.5 * eps
    v = abar ** 0.5 * eps - (1 - abar) ** 0.5 * x0
    st = sch.step(1)
    assert torch.allclose(st.c * x_t + st.d * v, x0)
    assert torch.allclose(st.a * x_t + st.b * v, abar_prev ** 0.5 * x0 + (1 - abar_prev) ** 0.5 * eps)


def test_no_grad_steps_do_not_build_a_graph_through_the_denoiser():
    """Memory: steps outside the trained set run under no_grad (their output has no grad_fn)."""
    seen = []
    T = 5
    sch = make_schedule(T)
    den_mod = LinearDenoiser(sch)

    def den(x, t):
        out = den_mod(x, t)
        seen.append(out.requires_grad)
        return out

    sampling.sample(den, sch, torch.randn(1, 4, 3, 3, dtype=torch.float64), StepPlan(T, frozenset({2}), detach_input=True))
    assert seen == [False, True, False, False, False]


@pytest.mark.parametrize("plan", [methods.plan_draft(5), methods.plan_draft_lv(5, 2)], ids=["draft", "draft_lv"])
def test_per_sample_generators_make_a_sample_independent_of_its_batch(plan):
    """Step noise (eta > 0) and DRaFT-LV's re-noising come from each sample's own generator: a
    batch of 4 is the two batches of 2 side by side (what 2 data-parallel workers compute)."""
    x_T = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    whole, *_ = run(plan, 5, x_T=x_T, eta=0.5, generator=gens(range(4)))
    lo, *_ = run(plan, 5, x_T=x_T[:2], eta=0.5, generator=gens(range(2)))
    hi, *_ = run(plan, 5, x_T=x_T[2:], eta=0.5, generator=gens(range(2, 4)))
    n = whole.copies
    split = torch.cat([torch.cat([lo.latents.view(n, 2, -1)[c], hi.latents.view(n, 2, -1)[c]]) for c in range(n)])
    assert torch.equal(whole.latents.flatten(1), split)
    # one shared generator (the old behaviour) does depend on the split
    shared, *_ = run(plan, 5, x_T=x_T, eta=0.5, generator=torch.Generator().manual_seed(0))
    lo_shared, *_ = run(plan, 5, x_T=x_T[:2], eta=0.5, generator=torch.Generator().manual_seed(0))
    hi_shared, *_ = run(plan, 5, x_T=x_T[2:], eta=0.5, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(shared.latents.view(n, 4, -1)[0, 2:], hi_shared.latents.view(n, 2, -1)[0])


@pytest.mark.parametrize("method", [MethodConfig(name="drtune", k=2), MethodConfig(name="draft_lv", lv_copies=2),
                                    MethodConfig(name="alignprop"), MethodConfig(name="refl")])
def test_the_sampling_loop_never_reads_a_device_value_on_the_host(method):
    """On a GPU, int(t), float(abar) or .item() in the loop makes the host wait for the device at
    every step. On the meta device such a read raises, so a chain that runs there has none."""
    T, B = 8, 2
    cpu = make_schedule(T, torch.float32)
    sch = cpu.to("meta")
    plan = methods.make_plan(method, T, B, torch.Generator().manual_seed(0),
                             sample_gens=[torch.Generator().manual_seed(i) for i in range(B)])
    w = torch.nn.Parameter(torch.ones((), device="meta"))
    x_T = torch.empty(B, 4, 3, 3, device="meta")
    res = sampling.sample(lambda x, t: w * x, sch, x_T, plan, eta=0.5,
                          generator=[torch.Generator().manual_seed(i) for i in range(B)])
    assert res.latents.device.type == "meta" and res.latents.requires_grad
    ts = cpu.timesteps.tolist()
    assert res.trace and all(r.timestep == ts[r.position - 1] for r in res.trace)
