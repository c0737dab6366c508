"""One differentiable sampler for DDIM and flow-matching Euler chains; the methods
(rayreward/methods.py) are step plans fed to it.

Notation (as in the methods table of docs/guide/methods.md): T sampling steps, counted along the
chain as positions n = 1..T (n = 1 is the first step, from x_T). Both kinds of step are affine in
the current latent x_n and the network's output f(x_n):

    x_{n+1}  = a_n * x_n + b_n * f(x_n) + s_n * z
    x0_hat_n = c_n * x_n + d_n * f(x_n)

- DDIM (SD 1.x/2.x, SDXL), f = eps:  x0_hat = (x - sqrt(1 - abar) eps) / sqrt(abar), and
  x_{n+1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - s^2) eps + s z with s from eta;
  with v-prediction (SD 2.x 768-v) the same step written in v (eps and x0_hat are affine in x, v).
- Flow matching (SD3/SD3.5, FLUX), f = the velocity v, sigma_n the noise level at position n
  (sigma_{T+1} = 0): x0_hat = x - sigma_n v, x_{n+1} = x + (sigma_{n+1} - sigma_n) v: a = c = 1.

A method is a `StepPlan`: which positions run the denoiser with a parameter gradient, whether the
denoiser input is detached (`sg(x_t)`, DRTune), and where the chain stops (early stop returns
x0_hat). Steps outside the trained set run under `torch.no_grad()`, so their output is a
constant and memory grows with the number of trained steps, not with T. In every kind of chain
the a_n * x_n term keeps the identity path of the gradient in x. The sampler takes tensors and
callables only: no Ray, no I/O, no globals. docs/design.md ("The methods") has each method's
exact semantics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from rayreward.methods import StepPlan

# denoise(x_t: (b, c, h, w), t: scalar tensor) -> model output (b, c, h, w), already guided.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


class Step(NamedTuple):
    """The affine coefficients of one chain position (Python floats)."""

    a: float  # x_{n+1} = a * x_n + b * f + s * z
    b: float
    s: float
    c: float  # x0_hat = c * x_n + d * f
    d: float


@dataclass(frozen=True)
class Schedule:
    """Per-position coefficients of a chain. Shape: every tensor (T,), index n - 1 for position n.

    DDIM: `abar` / `abar_prev`, alpha-bar at t and at the next (less noisy) timestep.
    Flow matching (prediction_type "flow"): `sigma` / `sigma_next`, the noise level at position n
    and at n + 1 (0 after the last). `timesteps` is what the denoiser is given: DDIM's integer t,
    or the flow scheduler's t = 1000 * sigma (a family's denoiser rescales it as its pipeline does)."""

    timesteps: torch.Tensor  # descending
    abar: torch.Tensor | None = None
    abar_prev: torch.Tensor | None = None
    prediction_type: str = "epsilon"  # "epsilon", "v_prediction" (SD 2.x 768-v) or "flow" (velocity)
    sigma: torch.Tensor | None = None
    sigma_next: torch.Tensor | None = None
    # host-side copies (t and the levels as Python numbers) for the sampling loop: reading a CUDA
    # tensor there (int(t), float(abar)) would make the host wait for the GPU at every step
    _host: tuple | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported ({', '.join(PREDICTION_TYPES)})")
        levels = (self.sigma, self.sigma_next) if self.is_flow else (self.abar, self.abar_prev)
        if any(v is None for v in levels):
            raise ValueError(f"a {'flow' if self.is_flow else 'DDIM'} schedule needs "
                             f"{'sigma and sigma_next' if self.is_flow else 'abar and abar_prev'}")
        if self._host is None:
            ts = self.timesteps.tolist()
            object.__setattr__(self, "_host", (tuple(ts), tuple(levels[0].double().tolist()),
                                               tuple(levels[1].double().tolist())))

    @property
    def is_flow(self) -> bool:
        return self.prediction_type == "flow"

    def host(self, n: int) -> tuple[int | float, float, float]:
        """(t, level, next level) of position n as Python numbers (no device sync): the levels are
        (abar, abar_prev) for DDIM, (sigma, sigma_next) for flow."""
        ts, lv, nx = self._host
        return ts[n - 1], lv[n - 1], nx[n - 1]

    def step(self, n: int, eta: float = 0.0) -> Step:
        """The affine coefficients of position n, computed in float64 on the host."""
        _, lv, nx = self.host(n)
        if self.is_flow:
            return Step(1.0, nx - lv, 0.0, 1.0, -lv)
        ab, abp = lv, nx
        var = (1 - abp) / (1 - ab) * (1 - ab / abp)
        s = eta * math.sqrt(max(var, 0.0))
        e = math.sqrt(max(1 - abp - s * s, 0.0))  # the eps direction kept in x_{n+1}
        if self.prediction_type == "epsilon":
            c, d = 1 / math.sqrt(ab), -math.sqrt(1 - ab) / math.sqrt(ab)
            return Step(math.sqrt(abp) * c, math.sqrt(abp) * d + e, s, c, d)
        # v: eps = sqrt(ab) v + sqrt(1 - ab) x, x0_hat = sqrt(ab) x - sqrt(1 - ab) v
        c, d = math.sqrt(ab), -math.sqrt(1 - ab)
        return Step(math.sqrt(abp) * c + e * math.sqrt(1 - ab), math.sqrt(abp) * d + e * math.sqrt(ab), s, c, d)

    def renoise(self, n: int) -> tuple[float, float]:
        """(alpha, sigma) that put a clean latent back at position n's noise level: x_n = alpha *
        x0 + sigma * z (DRaFT-LV). DDIM: (sqrt(abar), sqrt(1 - abar)); flow: (1 - sigma, sigma)."""
        _, lv, _ = self.host(n)
        return (1 - lv, lv) if self.is_flow else (math.sqrt(lv), math.sqrt(1 - lv))

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    def to(self, device) -> "Schedule":
        def move(v):
            return None if v is None else v.to(device)

        return Schedule(self.timesteps.to(device), move(self.abar), move(self.abar_prev), self.prediction_type,
                        move(self.sigma), move(self.sigma_next), self._host)

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, **set_timesteps) -> "Schedule":
        """The chain of a diffusers scheduler, exactly as its `step` computes it: a DDIMScheduler,
        or a FlowMatchEulerDiscreteScheduler (`set_timesteps` passes its `sigmas` / `mu`, as the
        family's pipeline does)."""
        if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
            return cls.from_flow_scheduler(scheduler, num_steps, **set_timesteps)
        scheduler.set_timesteps(num_steps)
        ts = scheduler.timesteps.long()
        ac = scheduler.alphas_cumprod.double()
        stride = scheduler.config.num_train_timesteps // num_steps
        prev = ts - stride
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
        abar_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
        return cls(ts, ac[ts].float(), abar_prev.float(), scheduler.config.prediction_type)

    @classmethod
    def from_flow_scheduler(cls, scheduler, num_steps: int, sigmas=None, mu: float | None = None) -> "Schedule":
        """A FlowMatchEulerDiscreteScheduler's chain: its timesteps and sigmas after
        `set_timesteps(num_steps, sigmas=..., mu=...)` (shift, FLUX's resolution-dependent mu and
        the terminal sigma as the scheduler applies them)."""
        kw = {} if mu is None else {"mu": mu}
        if sigmas is not None:
            scheduler.set_timesteps(sigmas=list(sigmas), **kw)
        else:
            scheduler.set_timesteps(num_steps, **kw)
        sig = scheduler.sigmas.double()
        if len(sig) != num_steps + 1:
            raise ValueError(f"the flow scheduler made {len(sig) - 1} steps for num_steps={num_steps}")
        return cls(scheduler.timesteps.float(), prediction_type="flow", sigma=sig[:-1].float(), sigma_next=sig[1:].float())


@dataclass
class StepRecord:
    position: int  # n, 1..T
    timestep: int | float  # t of the scheduler (DDIM: an integer; flow: 1000 * sigma)
    grad: bool  # the denoiser call carried a parameter gradient
    input_detached: bool  # the denoiser saw sg(x_t)


@dataclass
class SampleResult:
    latents: torch.Tensor  # (b, c, h, w), or (n * b, c, h, w) with n DRaFT-LV copies
    trace: list[StepRecord]
    copies: int = 1  # rewards of the n copies of sample i are at i, b + i, 2b + i, ...

    def copy_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Average a per-image quantity over the copies. Shape: (n * b,) -> (b,)."""
        return copy_mean(values, self.copies)

    @property
    def unet_calls(self) -> int:
        """Denoiser calls per sample: one per chain step that ran (a guided call counts once), and
        n for DRaFT-LV's last call, which denoises n copies of each sample."""
        return len(self.trace) + self.copies - 1


def copy_mean(values: torch.Tensor, copies: int) -> torch.Tensor:
    """Average over DRaFT-LV copies laid out as [copy 0 of all samples, copy 1, ...]. Shape: (n * b,) -> (b,)."""
    return values.view(copies, -1).mean(0)


# ---------------------------------------------------------------------------------------------
# The sampler.


Generators = torch.Generator | Sequence[torch.Generator] | None


def _randn_like(x: torch.Tensor, g: Generators) -> torch.Tensor:
    """Noise like x, drawn on the generator's device (reproducible across devices), moved to x's.

    With one generator per sample (a list of b), row r of x (b rows, or copies * b for DRaFT-LV,
    laid out copy-major) is drawn from generator r mod b, copies in order: a sample's noise then
    depends on its own generator only, whatever else shares the batch (or the worker)."""
    if g is None or isinstance(g, torch.Generator):
        device = g.device if g is not None else x.device
        return torch.randn(x.shape, generator=g, device=device, dtype=x.dtype).to(x.device)
    b = len(g)
    if x.shape[0] % b:
        raise ValueError(f"{x.shape[0]} rows of noise for {b} per-sample generators: need a multiple of {b}")
    rows = [torch.randn((1, *x.shape[1:]), generator=g[r % b], device=g[r % b].device, dtype=x.dtype)
            for r in range(x.shape[0])]
    return torch.cat(rows).to(x.device)


def call_denoiser(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, grad: bool, checkpointing: bool) -> torch.Tensor:
    """One denoiser call as the chain makes it: under no_grad, or with a parameter gradient
    (recomputed in backward when `checkpointing`)."""
    if not grad:
        with torch.no_grad():
            return denoise(x, t)
    if checkpointing:
        return _checkpoint(denoise, x, t, use_reentrant=False)
    return denoise(x, t)


def sample(
    denoise: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    plan: StepPlan,
    *,
    eta: float = 0.0,
    generator: Generators = None,
    gradient_checkpointing: bool = False,
) -> SampleResult:
    """Run the chain of `plan` from x_T. Shape: x_T (b, c, h, w) -> latents (b or n*b, c, h, w).
    `eta` (DDIM only; a flow chain is an ODE) is the step noise.

    `generator` draws the step noise (eta > 0) and DRaFT-LV's re-noising: one generator, or a
    list of b (one per sample, so that a sample's chain does not depend on its batch)."""
    if eta > 0 and schedule.is_flow:
        raise ValueError(f"eta={eta}: a flow-matching chain is an ODE (Euler steps) with no step noise; need eta = 0")
    if plan.num_steps != schedule.num_steps:
        raise ValueError(f"the plan has {plan.num_steps} steps and the schedule {schedule.num_steps}")
    trace: list[StepRecord] = []

    def call(x_in: torch.Tensor, t: torch.Tensor, grad: bool) -> torch.Tensor:
        return call_denoiser(denoise, x_in, t, grad, gradient_checkpointing)

    x = x_T
    last = plan.stop or plan.num_steps
    grad_from = None if plan.sample_grad_from is None else torch.tensor(plan.sample_grad_from, device=x_T.device)
    for n in range(1, last + 1):
        # the coefficients are Python floats and the trace's t a Python number: nothing in the loop
        # waits for the device (the denoiser gets t as a device tensor, no host-to-device copy)
        t = schedule.timesteps[n - 1]
        st = schedule.step(n, eta)
        # 1. the denoiser at x_t: with gradient on trained steps, on sg(x_t) when detached
        grad = n in plan.grad_steps and torch.is_grad_enabled()
        detached = plan.detach_input or not grad
        out = call(x.detach() if detached else x, t, grad)
        if grad and grad_from is not None:  # AlignProp: only samples past their truncation keep gradient
            out = torch.where((grad_from <= n).view(-1, 1, 1, 1), out, out.detach())
        trace.append(StepRecord(n, schedule.host(n)[0], grad, detached))
        f = out.to(x.dtype)
        # 2. early stop: the one-step prediction x0_hat = c x_t + d f (the x_t term keeps the linear path)
        if n == plan.stop:
            return SampleResult(st.c * x + st.d * f, trace)
        # 3. the step to x_{n+1}: a x_t + b f (+ s z)
        x = st.a * x + st.b * f
        if eta > 0:
            x = x + st.s * _randn_like(x, generator)

    if plan.lv_copies:
        # 4. DRaFT-LV: x_T'_i = alpha * sg(x0) + sigma * z_i at the last position's noise level, one
        # differentiable step each: x0_i = c x_T'_i + d f(x_T'_i)
        n_copies, T = plan.lv_copies, plan.num_steps
        alpha, sigma = schedule.renoise(T)
        st = schedule.step(T, eta)
        t1 = schedule.timesteps[T - 1]
        x0 = x.detach().repeat(n_copies, 1, 1, 1)
        x1 = alpha * x0 + sigma * _randn_like(x0, generator)
        out = call(x1, t1, torch.is_grad_enabled())
        trace.append(StepRecord(T, schedule.host(T)[0], torch.is_grad_enabled(), False))
        return SampleResult(st.c * x1 + st.d * out.to(x1.dtype), trace, copies=n_copies)
    return SampleResult(x, trace)
