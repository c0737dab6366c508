"""The methods, one entry each in `METHODS`: a step-selection rule, its config rule, its parameters.

A method is data fed to the one sampler (`rayreward.sampling.sample`): a `StepPlan` says which
chain positions run the denoiser with a parameter gradient, whether the denoiser input is
detached (`sg(x_t)`, DRTune), and where the chain stops (early stop returns x0_hat). The exact
semantics of each method are in docs/design.md ("The methods").

Adding a method touches this file only (and its test): write its plan function, add a `Method`
to `METHODS`, and any new parameter to `PARAMS`. `config.MethodConfig` is built from `PARAMS`
(each becomes a `method.<name>` field with its default), `config.validate` runs the method's
`check`, and the CLI, the sweeps and benchmarks/memory.py list `METHODS`.

This module imports no torch at import time, so validating a config stays light; the plan
functions import it when they draw.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

# ---------------------------------------------------------------------------------------------
# What a plan is.


@dataclass(frozen=True)
class StepPlan:
    """What one training sample of one method does along the chain of T positions (n = 1 is the
    first step, from x_T)."""

    num_steps: int  # T
    grad_steps: frozenset[int]  # positions whose denoiser call carries a parameter gradient
    detach_input: bool = False  # DRTune: the denoiser sees sg(x_t) at every step
    stop: int | None = None  # early stop: return x0_hat at this position; None = full chain
    lv_copies: int = 0  # DRaFT-LV: n re-noised copies of the last step (0 = off)
    # AlignProp: per sample, the first position that carries gradient (None = whole batch alike)
    sample_grad_from: tuple[int, ...] | None = None
    info: dict = field(default_factory=dict, compare=False)  # the random draws, for logging


def plan_inference(T: int) -> StepPlan:
    """Plain sampling: no gradient anywhere, full chain."""
    return StepPlan(T, frozenset())


def _randint(lo: int, hi: int, g) -> int:
    """Uniform integer in {lo..hi}, both ends included, from the torch.Generator `g`."""
    import torch

    return int(torch.randint(lo, hi + 1, (1,), generator=g).item())


def _need(fn: str, **checks: tuple[int, bool, str]) -> None:
    """A public plan function's arguments, checked as the config checks them: ValueError naming
    the function, the argument, its value and what is allowed (no plan of a wrong chain)."""
    bad = [f"{name}={value!r} (need {allowed})" for name, (value, ok, allowed) in checks.items() if not ok]
    if bad:
        raise ValueError(f"{fn}: " + "; ".join(bad))


def _positive_T(T) -> tuple:
    return T, isinstance(T, int) and T >= 1, "an integer >= 1"


# ---------------------------------------------------------------------------------------------
# The step-selection rules. `g` seeds the per-batch draws; `sample_gens` (one generator per
# sample) the per-sample ones. Each checks its arguments (ValueError) before drawing.


def plan_drtune(T: int, K: int, m: int, g=None) -> StepPlan:
    """K equally spaced steps with a random offset; detached input; early stop at t_min ~ U{1..m}.

    stride = floor(T / K), s ~ U{1 .. T - (K - 1) * stride}, steps {s + i * stride}. t_min counts
    from the end, so the chain stops at position T - t_min + 1 and returns x0_hat there; a
    trained step after the stop does not run.
    """
    _need("plan_drtune", T=_positive_T(T), K=(K, isinstance(K, int) and 1 <= K <= max(T, 1), "1 <= K <= T"),
          m=(m, isinstance(m, int) and 1 <= m <= max(T, 1), "1 <= m <= T"))
    stride = T // K
    s = _randint(1, T - (K - 1) * stride, g)
    steps = [s + i * stride for i in range(K)]
    t_min = _randint(1, m, g)
    stop = T - t_min + 1
    return StepPlan(T, frozenset(n for n in steps if n <= stop), detach_input=True, stop=stop,
                    info={"offset": s, "stride": stride, "steps": steps, "t_min": t_min})


def plan_draft(T: int) -> StepPlan:
    """DRaFT: every step carries gradient, full chain."""
    _need("plan_draft", T=_positive_T(T))
    return StepPlan(T, frozenset(range(1, T + 1)))


def plan_draft_k(T: int, K: int) -> StepPlan:
    """DRaFT-K: the last K steps carry gradient, full chain."""
    _need("plan_draft_k", T=_positive_T(T), K=(K, isinstance(K, int) and 1 <= K <= max(T, 1), "1 <= K <= T"))
    return StepPlan(T, frozenset(range(T - K + 1, T + 1)))


def plan_draft_lv(T: int, n: int) -> StepPlan:
    """DRaFT-LV: the chain without gradient, then n re-noised copies of the last step with it."""
    _need("plan_draft_lv", T=_positive_T(T), n=(n, isinstance(n, int) and n >= 1, "an integer >= 1"))
    return StepPlan(T, frozenset(), lv_copies=n)


def plan_refl(T: int, window: Sequence[int], g=None) -> StepPlan:
    """ReFL: t ~ U{t1..t2} counted from the end; no gradient before it; return x0_hat at t."""
    ok = len(window) == 2 and all(isinstance(v, int) for v in window) and 1 <= window[0] <= window[1] <= max(T, 1)
    _need("plan_refl", T=_positive_T(T), window=(tuple(window), ok, "(t1, t2) with 1 <= t1 <= t2 <= T"))
    t = _randint(window[0], window[1], g)
    stop = T - t + 1
    return StepPlan(T, frozenset({stop}), stop=stop, info={"t": t})


def plan_alignprop(T: int, k_range: Sequence[int], sample_gens: Sequence) -> StepPlan:
    """AlignProp: per sample k ~ U{lo..hi} (from that sample's generator); sample i
    back-propagates through its last k steps."""
    ok = (len(k_range) == 2 and all(isinstance(v, int) for v in k_range)
          and 1 <= k_range[0] <= k_range[1] <= max(T, 1))
    _need("plan_alignprop", T=_positive_T(T), k_range=(tuple(k_range), ok, "(lo, hi) with 1 <= lo <= hi <= T"))
    ks = [_randint(k_range[0], k_range[1], g) for g in sample_gens]
    first = tuple(T - k + 1 for k in ks)
    return StepPlan(T, frozenset(range(min(first), T + 1)), sample_grad_from=first, info={"k": ks})


# ---------------------------------------------------------------------------------------------
# The config rules: 'method.<field>: value ...; allowed ...' lines, for T >= 1.


def _check_k(m, T: int) -> list[str]:
    if m.k < 1:
        return [f"method.k: {m.k} is not allowed; K counts trained steps and must be >= 1"]
    if m.k > T:
        return [f"method.k: {m.k} is larger than sampling.num_steps ({T}); need 1 <= k <= num_steps"]
    return []


def _check_drtune(m, T: int) -> list[str]:
    p = _check_k(m, T)
    if not 1 <= m.early_stop_m <= T:
        p.append(f"method.early_stop_m: {m.early_stop_m} is outside [1, sampling.num_steps={T}]")
    return p


def _check_draft_lv(m, T: int) -> list[str]:
    return [] if m.lv_copies >= 1 else [f"method.lv_copies: {m.lv_copies} is not allowed; need >= 1 (2 is usual)"]


def _check_range(key: str, names: str, value, T: int) -> list[str]:
    if value is None or (len(value) == 2 and 1 <= value[0] <= value[1] <= T):
        return []
    return [f"method.{key}: {value} is not allowed; need [{names}] with 1 <= {names.replace(', ', ' <= ')} "
            f"<= num_steps={T}"]


# ---------------------------------------------------------------------------------------------
# The registry.


@dataclass(frozen=True)
class Param:
    """A `method.<name>` config field: its type (as config.py checks it), default and comment."""

    type: Any
    default: Any
    doc: str


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line: what it trains
    params: tuple[str, ...]  # the PARAMS it reads
    # plan(method config, T, g, sample_gens) -> StepPlan
    plan: Callable[[Any, int, Any, Sequence], StepPlan]
    check: Callable[[Any, int], list[str]] = lambda m, T: []  # problems with its params, given T >= 1


PARAMS: dict[str, Param] = {
    "k": Param(int, 2, "drtune / draft_k: number of trained steps K"),
    "early_stop_m": Param(int, 4, "drtune: t_min ~ U{1..m}, counted from the end; 1 = never stop early"),
    "lv_copies": Param(int, 2, "draft_lv: n re-noised copies of the last step"),
    "refl_window": Param(list[int], [1, 4], "refl: [t1, t2] counted from the end"),
    "alignprop_range": Param(list[int] | None, None, "alignprop: [lo, hi], each sample back-propagates through "
                                                     "its last k ~ U{lo..hi} steps; null means [1, num_steps]"),
}

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("drtune", "K equally spaced trained steps on sg(x_t), random offset, early stop at t_min ~ U{1..m}",
           ("k", "early_stop_m"), lambda m, T, g, gens: plan_drtune(T, m.k, m.early_stop_m, g), _check_drtune),
    Method("draft", "every step carries gradient", (), lambda m, T, g, gens: plan_draft(T)),
    Method("draft_k", "the last K steps carry gradient", ("k",), lambda m, T, g, gens: plan_draft_k(T, m.k),
           _check_k),
    Method("draft_lv", "the last step only, on n re-noised copies of the final latent", ("lv_copies",),
           lambda m, T, g, gens: plan_draft_lv(T, m.lv_copies), _check_draft_lv),
    Method("refl", "one step t ~ U{t1..t2} from the end, returns x0_hat there", ("refl_window",),
           lambda m, T, g, gens: plan_refl(T, m.refl_window, g),
           lambda m, T: _check_range("refl_window", "t1, t2", m.refl_window, T)),
    Method("alignprop", "each sample back-propagates through its last k ~ U{lo..hi} steps", ("alignprop_range",),
           lambda m, T, g, gens: plan_alignprop(T, m.alignprop_range or (1, T), gens),
           lambda m, T: _check_range("alignprop_range", "lo, hi", m.alignprop_range, T)),
]}


def config_class() -> type:
    """The `method:` section's dataclass: `name` plus every parameter of PARAMS, with its default."""
    fields = [("name", str, field(default="drtune"))]
    for key, p in PARAMS.items():
        default = field(default_factory=lambda d=p.default: list(d)) if isinstance(p.default, list) else field(default=p.default)
        fields.append((key, p.type, default))
    cls = dataclasses.make_dataclass("MethodConfig", fields)
    cls.__module__ = "rayreward.config"  # where it is exported: pickles (Ray) find it there
    return cls


def check(m, T: int) -> list[str]:
    """Problems with the `method:` section, given T sampling steps."""
    if m.name not in METHODS:
        return [f"method.name: {m.name!r} is unknown; allowed: {', '.join(METHODS)}"]
    return METHODS[m.name].check(m, T) if T >= 1 else []


def make_plan(method, T: int, batch: int, g=None, sample_gens: Sequence | None = None) -> StepPlan:
    """The plan of one training step from a `MethodConfig`. Per-batch draws use `g`; per-sample
    draws (AlignProp) use `sample_gens` (one generator per sample; default: `g` for all)."""
    if method.name not in METHODS:
        raise ValueError(f"method.name: {method.name!r} is unknown; allowed: {', '.join(METHODS)}")
    return METHODS[method.name].plan(method, T, g, list(sample_gens) if sample_gens else [g] * batch)
