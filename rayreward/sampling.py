"""One differentiable DDIM sampler; the methods (rayreward/methods.py) are step plans fed to it.

Notation (as in the methods table of docs/guide/methods.md): T sampling steps, counted along the chain as positions n = 1..T (n = 1 is
the first step, from x_T). A DDIM step is

    x0_hat(x_t, eps) = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)
    x_{t-1}          = sqrt(abar_prev) * x0_hat + sqrt(1 - abar_prev - sigma^2) * eps + sigma * z
                     = a_t * x_t + b_t * eps + sigma * z

A method is a `StepPlan`: which positions run the denoiser with a parameter gradient, whether the
denoiser input is detached (`sg(x_t)`, DRTune), and where the chain stops (early stop returns
x0_hat). Steps outside the trained set run under `torch.no_grad()`, so their eps is a constant and
memory grows with the number of trained steps, not with T. The sampler takes tensors and
callables only: no Ray, no I/O, no globals. docs/design.md ("The methods") has each method's
exact semantics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from rayreward.methods import StepPlan

# denoise(x_t: (b, c, h, w), t: scalar long tensor) -> model output (b, c, h, w), already guided.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """Per-position DDIM coefficients. Shape: every tensor (T,), index n - 1 for position n."""

    timesteps: torch.Tensor  # long, descending
    abar: torch.Tensor  # alpha-bar at t
    abar_prev: torch.Tensor  # alpha-bar at the next (less noisy) timestep
    prediction_type: str = "epsilon"  # or "v_prediction" (SD 2.x 768-v)
    # host-side copies (t, abar, abar_prev as Python numbers) for the sampling loop: reading a CUDA
    # tensor there (int(t), float(abar)) would make the host wait for the GPU at every step
    _host: tuple | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self._host is None:
            object.__setattr__(self, "_host", (tuple(int(t) for t in self.timesteps.tolist()),
                                               tuple(self.abar.double().tolist()), tuple(self.abar_prev.double().tolist())))

    def host(self, n: int) -> tuple[int, float, float]:
        """(t, abar, abar_prev) of position n as Python numbers (no device sync)."""
        ts, ab, abp = self._host
        return ts[n - 1], ab[n - 1], abp[n - 1]

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    def to(self, device) -> "Schedule":
        return Schedule(self.timesteps.to(device), self.abar.to(device), self.abar_prev.to(device), self.prediction_type,
                        self._host)

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int) -> "Schedule":
        """Coefficients of a diffusers DDIMScheduler, exactly as its `step` computes them."""
        scheduler.set_timesteps(num_steps)
        ts = scheduler.timesteps.long()
        ac = scheduler.alphas_cumprod.double()
        stride = scheduler.config.num_train_timesteps // num_steps
        prev = ts - stride
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
        abar_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
        return cls(ts, ac[ts].float(), abar_prev.float(), scheduler.config.prediction_type)


@dataclass
class StepRecord:
    position: int  # n, 1..T
    timestep: int  # t of the scheduler
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


def _eps(out: torch.Tensor, x: torch.Tensor, abar: torch.Tensor | float, prediction_type: str) -> torch.Tensor:
    """Model output -> eps. v-prediction: eps = sqrt(abar) * v + sqrt(1 - abar) * x_t."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return abar ** 0.5 * out + (1 - abar) ** 0.5 * x
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")


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


def x0_hat(x: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor | float) -> torch.Tensor:
    """One-step prediction of x_0 from x_t."""
    return (x - (1 - abar) ** 0.5 * eps) / abar ** 0.5


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

    `generator` draws the step noise (eta > 0) and DRaFT-LV's re-noising: one generator, or a
    list of b (one per sample, so that a sample's chain does not depend on its batch)."""
    if plan.num_steps != schedule.num_steps:
        raise ValueError(f"the plan has {plan.num_steps} steps and the schedule {schedule.num_steps}")
    trace: list[StepRecord] = []

    def call(x_in: torch.Tensor, t: torch.Tensor, grad: bool) -> torch.Tensor:
        return call_denoiser(denoise, x_in, t, grad, gradient_checkpointing)

    x = x_T
    last = plan.stop or plan.num_steps
    grad_from = None if plan.sample_grad_from is None else torch.tensor(plan.sample_grad_from, device=x_T.device)
    for n in range(1, last + 1):
        # the coefficients are Python floats and the trace's t a Python int: nothing in the loop
        # waits for the device (the denoiser gets t as a device tensor, no host-to-device copy)
        t_int, abar, abar_prev = schedule.host(n)
        t = schedule.timesteps[n - 1]
        # 1. the denoiser at x_t: with gradient on trained steps, on sg(x_t) when detached
        grad = n in plan.grad_steps and torch.is_grad_enabled()
        detached = plan.detach_input or not grad
        out = call(x.detach() if detached else x, t, grad)
        if grad and grad_from is not None:  # AlignProp: only samples past their truncation keep gradient
            out = torch.where((grad_from <= n).view(-1, 1, 1, 1), out, out.detach())
        trace.append(StepRecord(n, t_int, grad, detached))
        # 2. eps and the one-step prediction; the x_t terms keep the linear gradient path
        eps = _eps(out.to(x.dtype), x, abar, schedule.prediction_type)
        x0 = x0_hat(x, eps, abar)
        if n == plan.stop:
            return SampleResult(x0, trace)
        # 3. the DDIM step to x_{t-1}: a_t * x_t + b_t * eps (+ sigma * z)
        var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        sigma = eta * max(var, 0.0) ** 0.5
        x = abar_prev ** 0.5 * x0 + max(1 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
        if eta > 0:
            x = x + sigma * _randn_like(x, generator)

    if plan.lv_copies:
        # 4. DRaFT-LV: x1_i = alpha_1 * sg(x0) + sigma_1 * z_i; x0_i = x0_hat(x1_i, eps(x1_i))
        n_copies, T = plan.lv_copies, plan.num_steps
        t1_int, abar1, _ = schedule.host(T)
        t1 = schedule.timesteps[T - 1]
        x0 = x.detach().repeat(n_copies, 1, 1, 1)
        x1 = abar1 ** 0.5 * x0 + (1 - abar1) ** 0.5 * _randn_like(x0, generator)
        out = call(x1, t1, torch.is_grad_enabled())
        trace.append(StepRecord(T, t1_int, torch.is_grad_enabled(), False))
        eps = _eps(out.to(x1.dtype), x1, abar1, schedule.prediction_type)
        return SampleResult(x0_hat(x1, eps, abar1), trace, copies=n_copies)
    return SampleResult(x, trace)
