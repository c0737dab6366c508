"""The flow-matching chain (SD3/SD3.5, FLUX): parity with diffusers' Euler scheduler, and every
method's gradient against a reference written from the formulas, not from the sampler.

The velocity model v_n(x) = w[n] * x + c[n] (helpers.LinearDenoiser) has its own (w, c) for each chain position n, so the
gradients of w and c say exactly which steps carried a parameter gradient, and with what value.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rayreward import methods, sampling
from rayreward.config import MethodConfig
from rayreward.methods import StepPlan

from helpers import LinearDenoiser  # here v = w[n] x + c[n]: a toy velocity model

SD3 = dict(num_train_timesteps=1000, shift=3.0)  # SD3 / SD3.5's scheduler config
FLUX = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)


def flux_set_timesteps(T: int, mu: float = 0.8) -> dict:
    """What FluxPipeline passes to set_timesteps: sigmas linspace(1, 1/T, T) and its mu."""
    return {"sigmas": np.linspace(1.0, 1 / T, T), "mu": mu}


def make_schedule(T: int, kind: str = "sd3") -> sampling.Schedule:
    if kind == "sd3":
        return sampling.Schedule.from_scheduler(FlowMatchEulerDiscreteScheduler(**SD3), T)
    return sampling.Schedule.from_scheduler(FlowMatchEulerDiscreteScheduler(**FLUX), T, **flux_set_timesteps(T))


def x_T_of(B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 4, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_the_flow_chain_matches_diffusers_euler_step(kind):
    T = 7
    sch = FlowMatchEulerDiscreteScheduler(**(SD3 if kind == "sd3" else FLUX))
    kw = {} if kind == "sd3" else flux_set_timesteps(T)
    ours = sampling.Schedule.from_scheduler(sch, T, **kw)
    assert ours.is_flow and ours.num_steps == T
    assert float(ours.sigma[0]) == pytest.approx(1.0) and float(ours.sigma_next[-1]) == 0.0
    den = lambda x, t: 0.3 * x + 0.002 * t  # noqa: E731
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    res = sampling.sample(den, ours, x, methods.plan_inference(T))
    ref_sch = FlowMatchEulerDiscreteScheduler(**(SD3 if kind == "sd3" else FLUX))
    ref_sch.set_timesteps(**kw) if kw else ref_sch.set_timesteps(T)
    ref = x.clone()
    for t in ref_sch.timesteps:
        ref = ref_sch.step(den(ref, t), t, ref).prev_sample
    assert torch.allclose(res.latents, ref, atol=1e-5)
    # FLUX's resolution-dependent shift moves the chain: a larger mu keeps it noisier for longer
    if kind == "flux":
        more = sampling.Schedule.from_scheduler(FlowMatchEulerDiscreteScheduler(**FLUX), T, **flux_set_timesteps(T, 1.15))
        assert (more.sigma[1:] > ours.sigma[1:]).all()


def test_a_flow_chain_refuses_step_noise():
    with pytest.raises(ValueError, match="a flow-matching chain is an ODE"):
        sampling.sample(lambda x, t: x, make_schedule(4), x_T_of(), methods.plan_inference(4), eta=0.5)


# ---------------------------------------------------------------------------------------------
# The reference: each method written from its formulas on a flow chain, with its own stop-gradients.


def reference_loss(method: str, plan: StepPlan, sch: sampling.Schedule, w, c, x_T, z=None):
    """sum of the returned latents (mean over DRaFT-LV copies), as the method defines it.

    Euler: x_{n+1} = x_n + (sigma_{n+1} - sigma_n) v_n, x0_hat_n = x_n - sigma_n v_n, with
    v_n = w_n x + c_n. A step outside the trained set gives a constant v_n (no gradient to w, c or
    through its input; x keeps its Euler path); DRaFT-LV's copies start from sg(x0); DRTune's
    network sees sg(x_n) at every step."""
    sig = [float(s) for s in sch.sigma] + [0.0]
    T = sch.num_steps
    x = x_T

    def v(n, x_in, trained):  # an untrained step's network output is a constant (it runs under no_grad)
        if not trained:
            return (w[n - 1] * x_in + c[n - 1]).detach()
        return w[n - 1] * x_in + c[n - 1]

    last = plan.stop or T
    for n in range(1, last + 1):
        trained = n in plan.grad_steps
        if method == "drtune":
            vn = v(n, x.detach(), trained)  # sg(x_t) at the network; the Euler update keeps x's own path
        elif method == "alignprop":
            first = torch.tensor(plan.sample_grad_from).view(-1, 1, 1, 1)
            vn = torch.where(first <= n, v(n, x, trained), v(n, x, False))
        else:
            vn = v(n, x, trained)
        if n == plan.stop:
            return (x - sig[n - 1] * vn).sum()
        x = x + (sig[n] - sig[n - 1]) * vn
    if method == "draft_lv":
        k = plan.lv_copies
        x0 = x.detach().repeat(k, 1, 1, 1)
        x1 = (1 - sig[T - 1]) * x0 + sig[T - 1] * z
        out = x1 - sig[T - 1] * v(T, x1, True)
        return out.view(k, x_T.shape[0], -1).mean(0).sum()
    return x.sum()


@pytest.mark.parametrize("method", [
    MethodConfig(name="drtune", k=2, early_stop_m=3), MethodConfig(name="drtune", k=3, early_stop_m=1),
    MethodConfig(name="draft"), MethodConfig(name="draft_k", k=2), MethodConfig(name="draft_lv", lv_copies=3),
    MethodConfig(name="refl", refl_window=[1, 4]), MethodConfig(name="alignprop", alignprop_range=[2, 5]),
], ids=lambda m: f"{m.name}-k{m.k}")
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_every_method_has_the_exact_gradient_on_a_flow_chain(method, kind):
    T, B = 8, 2
    sch = make_schedule(T, kind)
    for seed in range(3):  # several draws of the method's random steps
        gens = [torch.Generator().manual_seed(10 * seed + i) for i in range(B)]
        plan = methods.make_plan(method, T, B, torch.Generator().manual_seed(seed), sample_gens=gens)
        den = LinearDenoiser(sch, seed)
        x_T = x_T_of(B, seed).requires_grad_(True)
        noise = [torch.Generator().manual_seed(100 + i) for i in range(B)]
        res = sampling.sample(den, sch, x_T, plan, generator=noise)
        res.copy_mean(res.latents.flatten(1).sum(1)).sum().backward()

        ref_den = LinearDenoiser(sch, seed)
        ref_x = x_T.detach().clone().requires_grad_(True)
        z = None
        if plan.lv_copies:  # the same re-noising draws: copy-major rows, row r from generator r mod B
            z_gens = [torch.Generator().manual_seed(100 + i) for i in range(B)]
            z = torch.cat([torch.randn((1, 4, 3, 3), generator=z_gens[r % B], dtype=torch.float64)
                           for r in range(plan.lv_copies * B)])
        reference_loss(method.name, plan, sch, ref_den.w, ref_den.c, ref_x, z).backward()
        assert torch.allclose(den.w.grad, ref_den.w.grad, rtol=1e-9, atol=1e-12), (seed, plan)
        assert torch.allclose(den.c.grad, ref_den.c.grad, rtol=1e-9, atol=1e-12), (seed, plan)
        trained = {i + 1 for i, g in enumerate(den.w.grad) if g != 0}
        assert trained == set(plan.grad_steps) | ({T} if plan.lv_copies else set())  # which steps trained
        if method.name != "draft_lv":  # DRaFT-LV's copies start from sg(x0): no gradient reaches x_T
            assert torch.allclose(x_T.grad, ref_x.grad, rtol=1e-9, atol=1e-12)


def test_drtune_on_a_flow_chain_keeps_the_identity_path_in_x():
    """With sg(x_t) at the network, every Euler step has a_n = 1 and the stop x0_hat has c = 1:
    dL/dx_T is exactly 1 for L = sum(x0_hat), whatever the velocity model."""
    T = 10
    sch = make_schedule(T)
    plan = StepPlan(T, frozenset({2, 5}), detach_input=True, stop=8)
    x_T = x_T_of().requires_grad_(True)
    res = sampling.sample(LinearDenoiser(sch), sch, x_T, plan)
    res.latents.sum().backward()
    assert torch.equal(x_T.grad, torch.ones_like(x_T))
    assert [r.input_detached for r in res.trace] == [True] * 8


def test_early_stop_on_a_flow_chain_returns_x_minus_sigma_v():
    T, stop = 8, 5
    sch = make_schedule(T, "flux")
    den = LinearDenoiser(sch)
    seen = []
    res = sampling.sample(lambda x, t: (seen.append(x), den(x, t))[1], sch, x_T_of(), StepPlan(T, frozenset(), stop=stop))
    x_stop = seen[-1]
    expected = x_stop - sch.sigma[stop - 1].double() * (den.w[stop - 1] * x_stop + den.c[stop - 1])
    assert torch.allclose(res.latents, expected.detach(), atol=1e-7)
