"""The Ray side of a run, shared by `train`, `tune` and `eval`: joining or starting Ray, what a
run asks of the cluster, waiting for it with a deadline, the reward actors and the one decision
of where rewards run, the device and the compute dtype.

Every wait here ends: an unreachable RAY_ADDRESS fails in seconds, and resources the cluster
cannot provide fail after `train.start_timeout_s` with a message that names what is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import torch

from rayreward import config as config_mod

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


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or cannot provide what the run needs."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; the run stopped (its checkpoints are whole)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def check_device(spec: str, field: str) -> torch.device:
    """A torch device the user named, checked: it parses, and a CUDA device exists here."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise config_mod.ConfigError([f"{field}: {spec!r} is not a device; use cpu, cuda or cuda:N"]) from None
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (device.index or 0) >= n:
            raise config_mod.ConfigError([f"{field}: {spec!r} is not available: this machine has {n} CUDA device(s) "
                                          "visible to torch; use cpu"])
    return device


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype of the frozen UNet, VAE and text encoders (None: fp32): bf16 or fp16 on CUDA,
    fp32 on CPU. LoRA parameters are fp32 whatever this says."""
    if device.type != "cuda" or precision == "no":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """A clear error for a RAY_ADDRESS that is empty, malformed, a dashboard URL, or not
    reachable within `timeout_s` (ray.init would retry it for minutes, ignoring SIGTERM)."""
    a = address.strip()
    if not a:
        raise ClusterError("RAY_ADDRESS is set but empty. Unset it to start a local Ray, or set it to the "
                           "cluster's address (host:6379, ray://host:10001, or auto)")
    if a in ("auto", "local"):
        return
    if a.startswith(("http://", "https://")):
        raise ClusterError(f"RAY_ADDRESS={address!r} is a dashboard / job-server URL, which `ray job submit` takes. "
                           "`rayreward train` joins a cluster at its GCS address (host:6379) or through Ray Client "
                           "(ray://host:10001); inside `ray job submit` Ray sets it for you")
    parsed = urlparse(a if "://" in a else f"gcs://{a}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host, port = None, None
    if parsed.scheme not in ("gcs", "ray") or not host or not port:
        raise ClusterError(f"RAY_ADDRESS={address!r} is not an address Ray can join; expected host:port "
                           "(e.g. 10.0.0.1:6379), ray://host:port, or auto")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterError(f"RAY_ADDRESS={address!r}: nothing answers at {host}:{port} ({e.strerror or e}). Is the "
                           "cluster up (`ray status` on its head node)? Unset RAY_ADDRESS to run on a local Ray") from None


def init_ray(own: str = "prefixed") -> bool:
    """Join the cluster at RAY_ADDRESS (as under `ray job submit`), else start a local Ray.
    Returns True when this process started a fixed-size local Ray. Unless `rayreward --verbose`,
    Ray's known noise is filtered, and the workers' own "[rayreward]" lines are shown as `own`
    says (see `quiet_ray_output`)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address is not None:
        check_address(address)
    verbose = bool(os.environ.get(VERBOSE_ENV))
    if not verbose:
        _quiet_driver_logs()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"could not join Ray at RAY_ADDRESS={address!r}: {first_line(e)}") from None
    finally:
        if main and previous is not None:  # ray.init sets SIGTERM to a bare sys.exit: keep the caller's
            signal.signal(signal.SIGTERM, previous)
    if not verbose:
        quiet_ray_output(own)
    return not address


# What `rayreward --verbose` brings back, each seen in real runs on Ray 2.60 and not about the run:
# - Ray Train's PlacementGroupCleaner prints a thread traceback, and "Failed to query Ray Train
#   Controller actor state" every few seconds, when its state-API query fails on a busy machine;
# - the Train controller's core worker logs (level E) that its PreemptionWatcher actor "has
#   constructor arguments in the object store and max_restarts > 0", at every run's start;
# - a local Ray started here says that token authentication is on by default (nothing to do).
QUIET_ACTORS = ("PlacementGroupCleaner",)
QUIET_LINES = ("Failed to query Ray Train Controller actor state",
               "has constructor arguments in the object store and max_restarts > 0")
QUIET_DRIVER_LOGS = ("Token authentication is enabled for this Ray cluster",)
OWN_LINE = "[rayreward]"


def _quiet_driver_logs() -> None:
    """Drop the driver-side Ray log records of QUIET_DRIVER_LOGS (a logging filter on Ray's handlers)."""
    import logging

    class Drop(logging.Filter):
        def filter(self, record):
            return not any(q in str(record.getMessage()) for q in QUIET_DRIVER_LOGS)

    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, Drop) for f in logger.filters):
        logger.addFilter(Drop())


OWN_MODES = ("prefixed", "bare", "drop")
_own = ["prefixed"]


def quiet_ray_output(own: str = "prefixed") -> None:
    """Filter the driver's printing of cluster output (Ray's "ray_print_logs" handler): drop the
    lines of QUIET_ACTORS and QUIET_LINES. The workers' own "[rayreward]" lines: "prefixed" as Ray
    prints them, "bare" without Ray's "(RayTrainWorker pid=...)" prefix (one run: only rank 0
    prints), "drop" all but warnings and errors (a sweep: its progress bar stands for them, each
    trial's metrics.csv holds the steps). Without the hook (another Ray), nothing is filtered."""
    import logging

    if own not in OWN_MODES:
        raise ValueError(f"own: {own!r} is unknown; allowed: {', '.join(OWN_MODES)}")
    _own[0] = own
    logging.getLogger("ray.tune").setLevel(logging.WARNING)  # Tune's INFO lines ("Wrote the latest version ...")
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
        from ray._private.worker import print_to_stdstream
    except ImportError:
        return
    with dispatcher._lock:
        for i, (name, handle) in enumerate(dispatcher.handlers):
            if name == "ray_print_logs" and not getattr(handle, "_rayreward_filter", False):
                def filtered(data, _handle=handle):
                    if data.get("actor_name") in QUIET_ACTORS:
                        return
                    lines = [x for x in data.get("lines", []) if not any(q in x for q in QUIET_LINES)]
                    if _own[0] == "drop":
                        lines = [x for x in lines if not x.startswith(OWN_LINE) or "warning" in x or "error" in x]
                    mine, rest = [], lines
                    if _own[0] == "bare":
                        mine = [x for x in lines if x.startswith(OWN_LINE)]
                        rest = [x for x in lines if not x.startswith(OWN_LINE)]
                    if mine:
                        print_to_stdstream({**data, "lines": mine}, ignore_prefix=True)
                    if rest:
                        _handle({**data, "lines": rest})

                filtered._rayreward_filter = True
                dispatcher.handlers[i] = (name, filtered)


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
        raise config_mod.ConfigError([f"resources: {text}. The run asks for {HINT}"])
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


# ---------------------------------------------------------------------------------------------
# Reward actors, and where rewards run.


def start_reward_actors(cfg) -> list:
    """Start `reward_server.replicas` RewardServer actors with their resources (the driver does);
    fail within train.start_timeout_s if they cannot be placed or built."""
    import ray

    from rayreward.serving import RewardServer

    rs = cfg.reward_server
    device = "cuda" if rs.num_gpus > 0 else "cpu"
    actor = ray.remote(RewardServer).options(
        num_cpus=rs.num_cpus, num_gpus=rs.num_gpus, resources=dict(rs.resources) or None,
        max_restarts=rs.max_restarts, max_task_retries=rs.max_restarts, max_concurrency=1)
    specs = [vars(s) for s in cfg.rewards]
    fault = os.environ.get(FAULT_REWARD_CALLS_ENV)
    actors = [actor.remote(specs, vars(cfg.loss), device, int(fault) if fault and i == 0 else None)
              for i in range(rs.replicas)]
    try:
        ray.get([a.pid.remote() for a in actors], timeout=cfg.train.start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        for a in actors:
            ray.kill(a)
        raise ClusterError(f"the reward actors did not start within train.start_timeout_s={cfg.train.start_timeout_s:g} s "
                           f"(each asks for {rs.num_cpus:g} CPU, {rs.num_gpus:g} GPU, {dict(rs.resources)}); see "
                           "`ray status`") from None
    return actors


def stop_reward_actors(actors: list, record: Path | None = None) -> None:
    """End the reward actors; with `record`, first write their state (restarts) there as JSON."""
    import ray

    if record is not None:
        try:
            states = ray.get([a.info.remote() for a in actors], timeout=30)
        except Exception as e:  # a dead or unreachable actor must not hide the run's own outcome
            states = [{"error": f"{type(e).__name__}: {first_line(e)}"}]
        record.write_text(json.dumps(states, indent=1))
        for i, st in enumerate(states):
            if st.get("restarted"):
                print(f"[rayreward] reward server {i} died and was restarted during the run", flush=True)
    for a in actors:
        ray.kill(a)


@contextlib.contextmanager
def reward_client(cfg, device, rank: int = 0, actors: list | None = None):
    """The one decision of where rewards run, from `reward_server.mode`: "local", in this process
    on `device`; "remote", in reward actors: `actors` (started by the driver), else actors started
    here and ended on exit (an in-process run or `eval`). Yields a serving.LocalReward or
    serving.RemoteReward."""
    from rayreward.serving import LocalReward, RemoteReward

    if cfg.reward_server.mode == "local":
        yield LocalReward(cfg.rewards, cfg.loss, device)
        return
    if actors:
        yield RemoteReward(actors, rank)
        return
    init_ray()
    own = start_reward_actors(cfg)
    try:
        yield RemoteReward(own, rank)
    finally:
        stop_reward_actors(own)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def root_cause(e: BaseException) -> tuple[BaseException, str]:
    """The error a user can act on, and where it happened: a Ray Train worker's own exception
    out of WorkerGroupError / ControllerError, a Ray task's out of RayTaskError."""
    where = ""
    for _ in range(10):
        failures = getattr(e, "worker_failures", None)
        if failures:
            rank, inner = sorted(failures.items())[0]
            where = f"worker {rank}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
            e = inner
            continue
        cause = getattr(e, "cause", None) or getattr(e, "__cause__", None)
        if cause is not None and cause is not e and type(e).__module__.startswith("ray"):
            e = cause
            continue
        break
    return e, where
