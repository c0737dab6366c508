"""The driver: everything between a validated config and the Ray Train workers, in one place.

`fit` locks the output folder, decides what to resume, joins or starts Ray, waits (bounded) for
the resources, starts the reward actors (`serving`) and runs a `TorchTrainer` whose workers run
`train_loop_per_worker`, which calls `train.run_training`. Signal handling (SIGINT and SIGTERM
ask Ray Train to abort between reports, so every checkpoint on disk is whole) and Ray's shutdown
are here too.

Every use of a private Ray API is in this module and listed in `PRIVATE_RAY`, each checked
against the Ray version it names; `tests/test_driver.py` fails loudly when Ray moves one. Each is
a convenience (quieter output, a graceful abort): without it a run still trains.
"""

from __future__ import annotations

import collections
import copy
import logging
import math
import os
import signal
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
from ray.train.torch import TorchTrainer

from rayreward import config as config_mod
from rayreward import budget, models, outputs, reaper, rewards, runfolder, runtime, serving, tiny, tracking, train
from rayreward.errors import ClusterError, ConfigError, Interrupted, first_line
from rayreward.storage import Storage

# The private Ray APIs rayreward uses, all checked against Ray 2.60.0 (tests/test_driver.py):
# - TorchTrainer._register_sigint_handler(controller): the hook Ray Train calls (main thread)
#   just before it blocks on a run; `Trainer` overrides it to turn SIGINT and SIGTERM into a
#   graceful abort. Without it, Ray's own handler aborts on SIGINT only.
# - ray._private.worker.global_worker_stdstream_dispatcher (its `handlers`, `_lock`,
#   `remove_handler`) and ray._private.worker.print_to_stdstream: how the driver prints the
#   cluster's output; `quiet_ray_output` filters Ray's noise there and `shutdown_ray` silences it.
# - the loggers "ray.train.v2._internal.util" (logs a failed worker's traceback; the CLI says it
#   in one line) and "ray._private.authentication.authentication_token_setup" (the token notice).
RAY_CHECKED = "2.60.0"
TRAIN_UTIL_LOGGER = "ray.train.v2._internal.util"
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
PRIVATE_RAY = {
    "ray.train.torch:TorchTrainer._register_sigint_handler": "graceful abort on SIGINT and SIGTERM",
    "ray._private.worker:global_worker_stdstream_dispatcher": "filtering the cluster's output",
    "ray._private.worker:print_to_stdstream": "printing the workers' lines without Ray's prefix",
    f"{TRAIN_UTIL_LOGGER}:logger": "a failed worker's traceback, shown with --verbose only",
    f"{TOKEN_NOTICE_LOGGER}:logger": "the local Ray's token notice",
}


# ---------------------------------------------------------------------------------------------
# Joining Ray, and its console output.


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
    verbose = bool(os.environ.get(runtime.VERBOSE_ENV))
    if not verbose:
        _quiet_driver_logs()
    check_report_poll()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    if main:  # ray.init sets SIGTERM to a bare sys.exit: hold the signal until the caller's handler is back
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        ray.init(address=address, log_to_driver=True)
    except Exception as e:  # Ray raises ConnectionError, RuntimeError, ValueError, and a bare Exception on a timeout
        where = f"join Ray at RAY_ADDRESS={address!r}" if address else "start a local Ray"
        raise ClusterError(f"could not {where}: {first_line(e)}") from None
    finally:
        if main:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a SIGTERM that came meanwhile lands now
    if not address:
        reaper.start()  # Ray's agents would outlive a SIGKILL of this process
    if not verbose:
        quiet_ray_output(own)
    return not address


def check_report_poll() -> None:
    """The report poll the user may set (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) must be a number of
    seconds > 0: Ray's controller would die on anything else, after the run started."""
    value = os.environ.get(runtime.REPORT_POLL_ENV)
    if value is None:
        return
    try:
        ok = float(value) > 0 and math.isfinite(float(value))
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError([f"{runtime.REPORT_POLL_ENV}={value!r} (environment) is not allowed; need seconds > 0, "
                           f"e.g. {runtime.REPORT_POLL_S}, or unset it"])


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

    logger = logging.getLogger(TOKEN_NOTICE_LOGGER)
    if not any(isinstance(f, Drop) for f in logger.filters):
        logger.addFilter(Drop())


OWN_MODES = ("prefixed", "bare", "drop")
_own = ["prefixed"]
# Where several raylets share one session folder (nodes started on one machine, or a shared
# /tmp), each node's log monitor forwards the same worker log lines: every line twice. A worker's
# own lines are printed once: the last few (pid, line) seen are remembered.
_seen: collections.OrderedDict = collections.OrderedDict()


def _first_time(pid, line: str, keep: int = 4096) -> bool:
    key = (pid, line)
    if key in _seen:
        return False
    _seen[key] = None
    if len(_seen) > keep:
        _seen.popitem(last=False)
    return True


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
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher  # private: see PRIVATE_RAY
        from ray._private.worker import print_to_stdstream
    except ImportError:
        return
    with dispatcher._lock:
        for i, (name, handle) in enumerate(dispatcher.handlers):
            if name == "ray_print_logs" and not getattr(handle, "_rayreward_filter", False):
                def filtered(data, _handle=handle):
                    if data.get("actor_name") in QUIET_ACTORS:
                        return
                    lines = [x for x in data.get("lines", []) if not any(q in x for q in QUIET_LINES)
                             and (not x.startswith(OWN_LINE) or _first_time(data.get("pid"), x))]
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


def shutdown_ray(quiet: bool) -> None:
    """Stop the local Ray this process started (and with it the run's workers and actors).
    `quiet`: first stop printing the cluster's log lines; the command's outcome is decided, and
    Ray's own actors print tracebacks while they are torn down (PlacementGroupCleaner)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    if quiet:
        try:  # without the private hook we only lose the quiet
            from ray._private.worker import global_worker_stdstream_dispatcher

            global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
        except Exception:  # noqa: BLE001
            pass
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001  (exiting anyway)
        pass


# ---------------------------------------------------------------------------------------------
# Signals.


def raise_interrupted(signum, frame):
    """A signal handler: SIGTERM (and SIGINT) end a command as `Interrupted`, which the CLI turns
    into exit 128 + signal after a clean stop."""
    raise Interrupted(signum)


class Trainer(TorchTrainer):
    """A TorchTrainer whose `_register_sigint_handler` (private, see PRIVATE_RAY) makes SIGINT and
    SIGTERM alike ask the controller to abort, which stops the workers between reports, so every
    checkpoint on disk is whole; `fit` then returns and `stop` holds the signal. A second signal
    stops waiting for the graceful abort."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop: list[int] = []  # the signals received during `fit`

    def _register_sigint_handler(self, controller):
        def abort(signum, frame):
            if self.stop:
                raise Interrupted(signum)
            self.stop.append(signum)
            print(f"\n[rayreward] {signal.Signals(signum).name}: stopping the run...", flush=True)
            controller.abort.remote()

        signal.signal(signal.SIGINT, abort)
        signal.signal(signal.SIGTERM, abort)


# ---------------------------------------------------------------------------------------------
# The workers' side.


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry: everything arrives through `loop_config`: the Config (parsed and checked
    on the driver, passed as data), the reward actors' handles when rewards are remote, and the
    checkpoint the driver chose to resume (a path in the run's storage), and the handle of the
    actor that writes the output folder on the driver's machine (rank 0's files go there)."""
    import ray.train
    import ray.train.torch

    # Ray Train logs every report at INFO through a logger named by its file path, which
    # LoggingConfig's ray.train filter misses; our progress line already says the same.
    logging.getLogger().setLevel(logging.WARNING)
    if not os.environ.get(runtime.VERBOSE_ENV):  # the driver says the error in one line; --verbose: the traceback too
        logging.getLogger(TRAIN_UTIL_LOGGER).setLevel(logging.CRITICAL)
    cfg: config_mod.Config = loop_config["config"]
    ctx = ray.train.get_context()  # [1] who am I: rank and world size (gloo/nccl group is up)
    # [2] where to start: the newer of Ray's latest checkpoint (after a worker-group restart, this
    # run's newest) and the driver's pick (the newest readable on disk: Ray's latest may be broken,
    # or older than one written just before a kill and never registered with Ray)
    store, checkpoints, candidates = Storage.of(cfg), [], []
    latest = ray.train.get_checkpoint()
    if latest is not None and Path(latest.path).name not in loop_config.get("skip_checkpoints", ()):
        checkpoints.append(latest)
    if loop_config.get("resume_from"):
        checkpoints.append(ray.train.Checkpoint(loop_config["resume_from"], filesystem=store.filesystem))
    for c in checkpoints:
        with c.as_directory() as d:  # a local folder, or a copy fetched from an object store
            candidates.append(runfolder.read_checkpoint(d))
        candidates[-1].folder = store.describe(c.path)
    resume = max(candidates, key=lambda r: r.step, default=None)

    def report(row: dict, folder: Path | None) -> None:  # [3] every worker, every step
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        checkpoint = None if folder is None else ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(metrics, checkpoint=checkpoint)

    device = ray.train.torch.get_device()
    if device.type == "cpu":  # as many threads as CPUs reserved: workers sharing a node do not oversubscribe it
        torch.set_num_threads(max(1, round(cfg.train.cpus_per_worker)))  # rounded: a Tune trial's 1.99 is 2
    rank = ctx.get_world_rank()
    written = outputs.Remote(loop_config["outputs"]) if rank == 0 and loop_config.get("outputs") else None
    train.run_training(cfg, device=device, rank=rank, world=ctx.get_world_size(), resume=resume, report=report,
                       reward_actors=loop_config.get("reward_actors"), written=written)  # [4]


# ---------------------------------------------------------------------------------------------
# The driver's side.


def prepare_run(cfg: config_mod.Config) -> config_mod.Config:
    """The config the workers get: a copy, with output_dir absolute and the prompts read here
    (the workers may not see the driver's files). The caller's config is left as it was."""
    run = copy.deepcopy(cfg)
    run.output_dir = str(Path(cfg.output_dir).resolve())
    run.prompts, run.prompt_file = cfg.training_prompts(), None
    return run


def _writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(13, "not writable", str(out))
    except OSError as e:
        raise ConfigError([f"output_dir: cannot write to {str(out)!r} ({e.strerror}); choose a folder "
                           "you can write"]) from None


def _build_caches(cfg: config_mod.Config) -> None:
    """Build the tiny models' caches once, here, before the workers start (they would race)."""
    if cfg.model.name in config_mod.TINY_MODELS:
        models.resolve_source(cfg.model)
    if any("tiny" in (s.args.get("model"), s.args.get("processor")) for s in cfg.rewards):
        tiny.folder("clip")


def fit(cfg: config_mod.Config, callbacks: list | None = None, node_id: str | None = None):
    """Lock the output folder, check what it holds and what to resume, join or start Ray, check
    that every node reaches the checkpoint storage, wait (bounded) for the resources, start the
    output folder's writer (on `node_id`, default this process's node: where output_dir is) and
    the reward actors, run the TorchTrainer, return its Result. `callbacks`: Ray Train callbacks
    (a Tune trial passes TuneReportCallback). Raises Interrupted after SIGINT / SIGTERM, once
    the workers have stopped."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    cfg = prepare_run(cfg)
    problems = rewards.check_args(cfg.rewards)  # imports each reward's module (not its weights)
    if problems:
        raise ConfigError(problems)
    tracking.resolve(cfg)  # the MLflow URI and W&B mode from the driver's environment
    out = Path(cfg.output_dir)
    _writable(out)
    with runfolder.RunLock(out):
        plan = runfolder.prepare(cfg, out)  # refuses another run's folder or a changed config
        for w in plan.warnings:
            print(f"[rayreward] warning: {w}", flush=True)
        _build_caches(cfg)
        budget.check(cfg)  # LoRA targets and rank, resolution, a step's memory against the device's
        fixed = init_ray(own="bare")
        store = Storage.of(cfg)
        store.check_reachable()  # a local path some node cannot see fails here, not at the first checkpoint
        runtime.check_resources(cfg, ray.cluster_resources(), fixed)
        runtime.wait_for_resources(cfg)
        runtime.shorten_report_poll()
        writer = outputs.start(cfg, node_id)
        actors = serving.start_reward_actors(cfg) if cfg.reward_server.mode == "remote" else None
        trainer = Trainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg, "reward_actors": actors, "outputs": writer,
                               "resume_from": plan.resume.folder if plan.resume else None,
                               "skip_checkpoints": plan.skip},
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                         resources_per_worker=runtime.worker_resources(cfg)),
            run_config=RunConfig(name=cfg.name, storage_path=store.path, storage_filesystem=store.filesystem,
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                                 worker_runtime_env={"env_vars": runtime.worker_env()}, callbacks=callbacks or [],
                                 logging_config=LoggingConfig(log_level="WARNING")),  # our progress line is enough
        )
        main = threading.current_thread() is threading.main_thread()  # not in a Tune trial
        handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) if main else None
        if main:
            print(f"[rayreward] starting {cfg.train.num_workers} Ray Train worker(s) "
                  f"({'GPU' if cfg.train.use_gpu else 'CPU'}); each loads the model", flush=True)
        result, status = None, "FAILED"
        try:
            result = trainer.fit()
            status = "FINISHED" if result.error is None else "FAILED"
        except Exception:
            if not trainer.stop:
                raise
        finally:
            if trainer.stop:
                status = "KILLED"
            if handlers:
                signal.signal(signal.SIGINT, handlers[0])
                signal.signal(signal.SIGTERM, handlers[1])
            if actors:
                serving.stop_reward_actors(actors, record=out / "reward_servers.json")
            outputs.stop(writer, status)
        if trainer.stop:
            raise Interrupted(trainer.stop[0])
        return result
