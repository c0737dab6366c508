"""Devices and cluster resources, shared by `train`, `tune`, `eval` and the workers: the device
and compute dtype, what a run asks of the cluster and waiting for it with a deadline, and the
environment the workers get. Joining Ray and everything that touches Ray's internals is in
`driver`; the reward actors are in `serving`.

Every wait here ends: resources the cluster cannot provide fail after `train.start_timeout_s`
with a message that names what is missing.
"""

from __future__ import annotations

import os
import time

import torch

from rayreward.errors import ClusterError, ConfigError

# Ray Train V2 re-routes worker print() through logging and tees it: each line would show twice.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Ray Train V2's controller collects worker reports on a poll of this many seconds (default 2)
# through a one-slot queue, so a report per step caps a run at one step per poll. The driver
# sets a short poll unless the user set one; Ray propagates it to the controller and workers.
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_S = "0.05"
VERBOSE_ENV = "RAYREWARD_VERBOSE"  # set by `rayreward --verbose`: workers keep Ray's error tracebacks
# Fault injection, for tests only (never in a config): training worker 0 exits once at this step;
# reward actor 0 exits once after this many calls. The driver passes both on to the cluster.
FAULT_STEP_ENV = "RAYREWARD_FAULT_STEP"
FAULT_REWARD_CALLS_ENV = "RAYREWARD_FAULT_REWARD_CALLS"


def check_device(spec: str, field: str) -> torch.device:
    """A torch device the user named, checked: it parses, and a CUDA device exists here."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError([f"{field}: {spec!r} is not a device; use cpu, cuda or cuda:N"]) from None
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (device.index or 0) >= n:
            raise ConfigError([f"{field}: {spec!r} is not available: this machine has {n} CUDA device(s) "
                               "visible to torch; use cpu"])
    return device


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype of the frozen UNet, VAE and text encoders (None: fp32): bf16 or fp16 on CUDA,
    fp32 on CPU. LoRA parameters are fp32 whatever this says."""
    if device.type != "cuda" or precision == "no":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def worker_resources(cfg) -> dict[str, float]:
    """One Ray Train worker's resources: train.cpus_per_worker CPUs, and train.gpus_per_worker GPU
    with use_gpu (a share below 1 lets a reward actor of reward_server.num_gpus <= 1 - share use the
    same GPU)."""
    return {"CPU": float(cfg.train.cpus_per_worker),
            **({"GPU": float(cfg.train.gpus_per_worker)} if cfg.train.use_gpu else {})}


def resources_needed(cfg) -> dict[str, float]:
    """What the run asks of the cluster: the Ray Train workers plus the reward actors."""
    t, rs = cfg.train, cfg.reward_server
    need = {k: t.num_workers * v for k, v in worker_resources(cfg).items()}
    if rs.mode == "remote":
        need["CPU"] += rs.replicas * rs.num_cpus
        need["GPU"] = need.get("GPU", 0.0) + rs.replicas * rs.num_gpus
        for k, v in rs.resources.items():
            need[k] = need.get(k, 0.0) + rs.replicas * v
    return {k: v for k, v in need.items() if v > 0}


HINT = ("train.num_workers x (1 CPU, + train.gpus_per_worker GPU with train.use_gpu) + reward_server.replicas x "
        "(reward_server.num_cpus, num_gpus, resources)")


def check_resources(cfg, have: dict[str, float], fixed: bool) -> None:
    """A clear error (fixed-size cluster) or a note (autoscaling may add nodes; `wait_for_resources`
    then bounds the wait) when the run asks for more than the cluster has now."""
    short = {k: (v, have.get(k, 0.0)) for k, v in resources_needed(cfg).items() if v > have.get(k, 0.0) + 1e-9}
    if not short:
        return
    text = "; ".join(f"{k}: needs {v:g}, the cluster has {h:g}" for k, (v, h) in short.items())
    if fixed:
        raise ConfigError([f"resources: {text}. The run asks for {HINT}"])
    print(f"[rayreward] the cluster has too little now ({text}); waiting up to {cfg.train.start_timeout_s:g} s "
          "for the autoscaler", flush=True)


def _bundles(cfg) -> list[dict[str, float]]:
    t, rs = cfg.train, cfg.reward_server
    bundles = [worker_resources(cfg)] * t.num_workers
    if rs.mode == "remote":
        actor = {"CPU": rs.num_cpus, "GPU": rs.num_gpus, **rs.resources}
        bundles += [{k: float(v) for k, v in actor.items() if v > 0}] * rs.replicas
    return [b for b in bundles if b]


def wait_for_resources(cfg) -> None:
    """Reserve, for a moment, what the whole run needs (a placement group of its workers' and
    reward actors' bundles), so the autoscaler sees the demand; give up after
    train.start_timeout_s with a message naming what could not be placed. Ray Train itself
    would retry placing its workers forever."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = _bundles(cfg)
    pg = placement_group(bundles, strategy="PACK")
    deadline = time.monotonic() + cfg.train.start_timeout_s
    try:
        while not pg.wait(timeout_seconds=max(0.0, min(15.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                avail = ray.available_resources()
                need = resources_needed(cfg)
                have = ", ".join(f"{k} {avail.get(k, 0):g} of {need[k]:g}" for k in need)
                raise ClusterError(
                    f"the cluster could not provide the run's resources within train.start_timeout_s="
                    f"{cfg.train.start_timeout_s:g} s (available now: {have}; bundles {bundles}). No node type may "
                    f"fit them (see `ray status` and cluster.yaml), or other jobs hold them. The run asks for {HINT}")
            print(f"[rayreward] waiting for the cluster to place {len(bundles)} bundle(s) {bundles} "
                  f"({deadline - time.monotonic():.0f} s left)", flush=True)
    finally:
        remove_placement_group(pg)


def worker_env() -> dict[str, str]:
    """Environment for the training workers: our print patch setting, the caches, test hooks."""
    keep = ("RAYREWARD_CACHE", "HF_HOME", "HF_HUB_OFFLINE", REPORT_POLL_ENV, VERBOSE_ENV, FAULT_STEP_ENV)
    return dict(WORKER_ENV, **{k: os.environ[k] for k in keep if k in os.environ})


def shorten_report_poll() -> None:
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)


def fault_step() -> int | None:
    """The step at which worker 0 exits once (tests: RAYREWARD_FAULT_STEP), or None."""
    value = os.environ.get(FAULT_STEP_ENV)
    if not value:
        return None
    if not value.strip().isdigit():
        raise ValueError(f"{FAULT_STEP_ENV}={value!r} is not allowed; need a step number >= 0 (a test hook)")
    return int(value)


def resolve_device(spec: str, field: str) -> torch.device:
    """The device of a command's --device: "auto" is CUDA when there is one, else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(spec, field)
