"""Ray Tune sweeps: each trial is a full rayreward training run (Ray Train workers + reward actors).

A sweep file names a base training config and a search space over any config field:

    base: quickstart.yaml            # relative to the sweep file
    set: [train.steps=8]             # overrides on the base (optional)
    name: k_rank_sweep
    output_dir: runs/k_rank_sweep
    search:
      method.k: [1, 2, 3]            # a list is a grid
      lora.rank: {grid: [2, 4, 8]}
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      method.name: {choice: [drtune, draft_k]}
    num_samples: 1                   # grid repeats, or the number of random draws
    metric: reward_smooth            # reported every step by every trial
    mode: max
    scheduler: {name: asha, grace_period: 2, reduction_factor: 2}   # or {name: none}

Current Ray (Train V2): the Tuner runs a driver function per trial that builds and fits a
TorchTrainer; Ray's TuneReportCallback forwards the workers' per-step reports to Tune, so ASHA can
stop a trial early. Running the same command again resumes an interrupted sweep.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rayreward import budget, files
from rayreward import config as config_mod
from rayreward.errors import SweepError, first_line, root_cause

SPACES = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "none")
DRIVER_CPU = 0.01  # what a trial's driver function reserves


@dataclass
class SweepConfig:
    base: dict  # the base training config (a plain dict, overrides applied)
    search: dict[str, dict]  # dotted field -> {kind: values}
    name: str = "sweep"
    output_dir: str = "runs/sweep"
    num_samples: int = 1
    metric: str = "reward_smooth"
    mode: str = "max"
    scheduler: dict = field(default_factory=lambda: {"name": "asha"})
    max_concurrent: int | None = None  # default: as many trials as the cluster's resources hold


def _space(key: str, spec: Any, problems: list[str]) -> dict | None:
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACES:
        problems.append(f"search.{key}: {spec!r} is not allowed; need a list (grid) or one of "
                        f"{{{', '.join(k + ': ...' for k in SPACES)}}}")
        return None
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        problems.append(f"search.{key}.{kind}: {values!r} is not allowed; need a non-empty list")
        return None
    if kind in ("uniform", "loguniform", "randint"):
        ok = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
            and values[0] < values[1] and (kind != "loguniform" or values[0] > 0)
        if not ok:
            problems.append(f"search.{key}.{kind}: {values!r} is not allowed; need [low, high] numbers with "
                            f"low < high{' and low > 0' if kind == 'loguniform' else ''}")
            return None
    return {kind: values}


def _samples(space: dict) -> list:
    """Values to validate the field with: every grid/choice value, both ends of a range."""
    kind, values = next(iter(space.items()))
    if kind == "randint":
        return [int(values[0]), int(values[1]) - 1]
    if kind in ("uniform", "loguniform"):  # Tune draws floats: validate floats (an int field refuses them)
        return [float(values[0]), (float(values[0]) + float(values[1])) / 2]
    return list(values)


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read and check a sweep file; `overrides` apply to the base config. Every problem is reported
    at once (ConfigError), before Ray starts."""
    path = Path(path)
    data = config_mod.read_yaml_file(path, "--config")
    problems: list[str] = []
    allowed = {"base", "set", "config", "search", "name", "output_dir", "num_samples", "metric", "mode",
               "scheduler", "max_concurrent"}
    for k in data:
        if k not in allowed:
            problems.append(f"{k}: unknown key in a sweep file; allowed: {', '.join(sorted(allowed))}")
    if "base" in data:
        base_path = (path.parent / str(data["base"])).resolve()
        if not base_path.is_file():
            raise config_mod.ConfigError(problems + [f"base: {str(data['base'])!r} does not exist "
                                                     f"(looked at {base_path})"])
        base_data = config_mod.read_yaml_file(base_path, "base")
    else:
        base_data = data.get("config") or {}
    sets = list(data.get("set") or []) + list(overrides)
    try:
        base_cfg = config_mod.from_dict(base_data, sets)
    except config_mod.ConfigError as e:
        raise config_mod.ConfigError(problems + [f"base config: {p}" for p in e.problems]) from None
    base = base_cfg.to_dict()
    search_in = data.get("search") or {}
    if not isinstance(search_in, dict) or not search_in:
        problems.append("search: missing or empty; need at least one field, e.g. {method.k: [1, 2, 3]}")
        search_in = {}
    search: dict[str, dict] = {}
    for key, spec in search_in.items():
        space = _space(str(key), spec, problems)
        if space is None:
            continue
        for value in _samples(space):
            try:
                trial = config_mod.from_dict(base, [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
                if key.startswith(("lora.", "model.", "train.batch_size")):  # what the model and device bound
                    sk = budget.skeleton(trial.model)  # read once per process
                    if sk is not None:  # None: the model's configs are not here
                        budget.check(trial, sk)
            except config_mod.ConfigError as e:
                kind, hint = next(iter(space)), ""
                if kind in ("uniform", "loguniform") and any("integer" in p for p in e.problems):
                    hint = f" ({kind} draws floats; use randint: [low, high) for an integer field)"
                drawn = " (as drawn)" if kind in ("uniform", "loguniform", "randint") else ""
                problems.extend(f"search.{key} = {value!r}{drawn}: {p}{hint}" for p in e.problems)
                break
        search[str(key)] = space
    sched = data.get("scheduler", {"name": "asha"})
    if not isinstance(sched, dict) or sched.get("name") not in SCHEDULERS:
        problems.append(f"scheduler: {sched!r} is not allowed; need {{name: asha, grace_period: N, "
                        f"reduction_factor: F}} or {{name: none}}")
    elif sched["name"] == "asha":
        extra = set(sched) - {"name", "grace_period", "reduction_factor"}
        if extra:
            problems.append(f"scheduler: unknown keys {sorted(extra)}; allowed: grace_period, reduction_factor")
        if int(sched.get("grace_period", 1)) < 1 or float(sched.get("reduction_factor", 2)) <= 1:
            problems.append(f"scheduler: {sched!r} is not allowed; need grace_period >= 1 and reduction_factor > 1")
    mode = data.get("mode", "max")
    if mode not in ("max", "min"):
        problems.append(f"mode: {mode!r} is not allowed; allowed: max, min")
    n = data.get("num_samples", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        problems.append(f"num_samples: {n!r} is not allowed; need an integer >= 1")
    mc = data.get("max_concurrent")
    if mc is not None and (not isinstance(mc, int) or mc < 1):
        problems.append(f"max_concurrent: {mc!r} is not allowed; need an integer >= 1 or null")
    if problems:
        raise config_mod.ConfigError(problems)
    name = str(data.get("name", path.stem))
    return SweepConfig(base=base, search=search, name=name, output_dir=str(data.get("output_dir", f"runs/{name}")),
                       num_samples=n, metric=str(data.get("metric", "reward_smooth")), mode=mode, scheduler=sched,
                       max_concurrent=mc)


def budget_spent(train: dict, search: dict, last: dict) -> bool:
    """Whether a trial's last report shows it ended on train.max_unet_calls or train.max_seconds
    (its own value when the sweep searches it), not stopped early."""
    calls = int(search.get("train.max_unet_calls", train.get("max_unet_calls", 0)) or 0)
    seconds = float(search.get("train.max_seconds", train.get("max_seconds", 0)) or 0)
    return ((calls > 0 and (last.get("unet_calls_total") or 0) >= calls)
            or (seconds > 0 and (last.get("train_seconds_total") or 0) >= seconds))


def trial_config(base: dict, assignment: dict[str, Any], output_dir: str, name: str) -> config_mod.Config:
    """The training config of one trial: the base with the sampled values, in its own folder."""
    data = copy.deepcopy(base)
    data.update(output_dir=output_dir, name=name)
    sets = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in assignment.items()]
    return config_mod.from_dict(data, sets)


def _trial(params: dict) -> None:
    """A Tune trial: one rayreward training run. Its folder is stable across a sweep's restore, so a
    trial cut short resumes from its own latest Ray Train checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rayreward import driver

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(params["base"], params["search"], str(Path(params["sweep_dir"]) / "trials" / trial_id),
                       f"{params['sweep_name']}-{trial_id}")
    _give_driver_its_share(cfg)
    result = driver.fit(cfg, callbacks=[TuneReportCallback()], node_id=params.get("node_id"))
    if result.error is not None:
        raise result.error


def _give_driver_its_share(cfg: config_mod.Config) -> None:
    """The trial's driver holds DRIVER_CPU; its workers reserve that much less, so a trial takes
    exactly its workers' CPUs (two 1-CPU trials fit on 2 CPUs, not one)."""
    t = cfg.train
    t.cpus_per_worker = max(t.cpus_per_worker - DRIVER_CPU / t.num_workers, DRIVER_CPU)


def _param_space(sweep: SweepConfig, sweep_dir: Path) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    search = {k: make[kind](values) for k, s in sweep.search.items() for kind, values in s.items()}
    import ray

    # each trial's driver may run on any node; its files go to the node of the sweep's driver,
    # where the sweep folder is
    return {"base": tracked_base(sweep, sweep_dir), "search": search, "sweep_dir": str(sweep_dir),
            "sweep_name": sweep.name, "node_id": ray.get_runtime_context().get_node_id()}


def tracked_base(sweep: SweepConfig, sweep_dir: Path) -> dict:
    """The base config with its trackers grouped by sweep: one MLflow experiment / W&B group named
    after the sweep (unless log.experiment names one), one MLflow store for all trials (the sweep
    folder's mlflow.db unless a URI is set), resolved here, in the driver's environment."""
    from rayreward import tracking

    base = copy.deepcopy(sweep.base)
    cfg = config_mod.from_dict(base)
    if cfg.log.trackers:
        tracking.resolve(cfg, experiment=sweep.name, folder=sweep_dir)
        base["log"] = cfg.to_dict()["log"]
    return base


def concurrency(sweep: SweepConfig, have: dict[str, float], fixed: bool) -> int:
    """How many trials fit at once; a clear error when not even one does on a fixed-size cluster."""
    from rayreward import runtime

    worst: dict[str, float] = {}
    for assignment in _extremes(sweep):  # resources can depend on swept fields (num_workers, replicas)
        cfg = trial_config(sweep.base, assignment, sweep.output_dir, sweep.name)
        _give_driver_its_share(cfg)
        need = runtime.resources_needed(cfg)
        need["CPU"] = need.get("CPU", 0.0) + DRIVER_CPU
        for k, v in need.items():
            worst[k] = max(worst.get(k, 0.0), v)
    short = {k: (v, have.get(k, 0.0)) for k, v in worst.items() if v > have.get(k, 0.0) + 1e-9}
    if short and fixed:
        text = "; ".join(f"{k}: needs {v:g}, the cluster has {h:g}" for k, (v, h) in short.items())
        raise config_mod.ConfigError([f"resources: one trial of sweep {sweep.name!r} asks for more than the cluster "
                                      f"has ({text}); lower train.num_workers / reward_server.replicas, or add nodes"])
    fits = [math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in worst.items() if v > 0]
    n = max(1, min(fits) if fits else 1)
    return min(n, sweep.max_concurrent) if sweep.max_concurrent else n


def _extremes(sweep: SweepConfig) -> list[dict]:
    """One assignment per value of each swept field (others at their first value)."""
    firsts = {k: _samples(s)[0] for k, s in sweep.search.items()}
    out = [dict(firsts)]
    for k, s in sweep.search.items():
        for v in _samples(s)[1:]:
            out.append({**firsts, k: v})
    return out


def trial_progress(expected: int, metric: str, mode: str):
    """A Tune callback (Tune calls it in the driver) drawing a progress bar of the sweep's trials:
    done of `expected`, running, stopped early, failed, and the best `metric` reported so far."""
    from ray.tune import Callback
    from tqdm.auto import tqdm

    class TrialProgress(Callback):
        def __init__(self):
            self.running: set[str] = set()
            self.stopped = self.failed = 0
            self.best: float | None = None
            self.bar = tqdm(total=expected, desc="[rayreward] trials", unit="trial", dynamic_ncols=True)

        def __getstate__(self):  # Tune pickles its callbacks into the sweep's saved state
            return {}

        def __setstate__(self, state):  # restored with a resumed sweep: inert (it would undercount)
            self.running, self.stopped, self.failed, self.best, self.bar = set(), 0, 0, None, None

        def _show(self):
            if self.bar is None:
                return
            best = "" if self.best is None else f", best {metric} {self.best:+.4f}"
            self.bar.set_postfix_str(f"{len(self.running)} running, {self.stopped} stopped early, "
                                     f"{self.failed} failed{best}")

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(trial.trial_id)
            self._show()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                if self.best is None or (value > self.best if mode == "max" else value < self.best):
                    self.best = value
            self._show()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)
            last, cfg = trial.last_result, trial.config
            if (last.get("training_iteration", 0) < cfg["base"]["train"]["steps"]
                    and not budget_spent(cfg["base"]["train"], cfg.get("search", {}), last)):
                self.stopped += 1  # ASHA ended it (a trial that ran all its steps, or its budget, reported each one)
            self._ended()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)
            self.failed += 1
            self._ended()

        def _ended(self):
            if self.bar is not None:
                self.bar.update(1)
            self._show()

        def close(self):
            if self.bar is not None:
                self.bar.close()

    return TrialProgress()


def run_sweep(sweep: SweepConfig) -> Path | None:
    """Run (or resume) the sweep; write results.csv/.parquet, best_config.yaml and sweep.png.
    Returns the sweep folder, or None when the sweep was interrupted (nothing is written then)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from rayreward import driver, runtime

    out = Path(sweep.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if sweep.base["model"]["name"] in config_mod.TINY_MODELS:
        from rayreward import models

        models.resolve_source(config_mod.from_dict(sweep.base).model)  # build the tiny cache once
    fixed = driver.init_ray(own="drop")  # the trials bar stands for the trials' step lines
    n = concurrency(sweep, ray.cluster_resources(), fixed)
    steps = int(sweep.base["train"]["steps"])
    scheduler = None
    if sweep.scheduler["name"] == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=steps,
                                  grace_period=min(steps, int(sweep.scheduler.get("grace_period", 1))),
                                  reduction_factor=float(sweep.scheduler.get("reduction_factor", 2)))
    # the trial only drives (Tune needs a non-empty request); its TorchTrainer asks for the workers
    trainable = tune.with_resources(_trial, {"CPU": DRIVER_CPU})
    space = _param_space(sweep, out)
    exp = out / "tune" / sweep.name
    verbose = 1 if os.environ.get(runtime.VERBOSE_ENV) else 0  # Tune's status tables with --verbose
    if not verbose:  # Tune's newer console output prints its start box at any verbosity; the older is silent at 0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    expected = sweep.num_samples * math.prod(len(v) for s in sweep.search.values() for k, v in s.items() if k == "grid")
    progress = None  # a fresh sweep's trials bar (Tuner.restore takes no callbacks)
    if tune.Tuner.can_restore(str(exp)):
        print(f"[rayreward] resuming sweep {sweep.name} from {exp}", flush=True)
        tuner = tune.Tuner.restore(str(exp), trainable, resume_errored=True, param_space=space)
    else:
        progress = trial_progress(expected, sweep.metric, sweep.mode)
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                        num_samples=sweep.num_samples, max_concurrent_trials=n,
                                        # a trial's actor serves the next trial: its imports (torch,
                                        # Ray Train, diffusers) and the model's skeleton are not paid again
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(out / "tune"), verbose=verbose,
                                      callbacks=[progress]))
    print(f"[rayreward] sweep {sweep.name}: {', '.join(sweep.search)}; up to {n} trial(s) at once; "
          f"{sweep.scheduler['name']} on {sweep.metric} ({sweep.mode})", flush=True)
    grid = tuner.fit()
    if progress is not None:
        progress.close()
    # a trial ended when it errored or reported: one Ctrl-C stopped before its first report may
    # still be listed as terminated, and it has not run
    ended = sum(1 for r in grid if r.error is not None or r.metrics)
    if len(grid) < expected or ended < len(grid):  # Ctrl-C / SIGUSR1: Tune saved its state and returned
        print(f"[rayreward] sweep {sweep.name} interrupted ({ended} of {expected} trials ended); run the same "
              "command again to resume it", flush=True)
        return None
    df = results_table(grid, sweep)
    with files.written(out / "results.csv", newline="") as f:
        df.to_csv(f, index=False)
    failed = [r for r in grid if r.error]
    if failed:

        cause, _ = root_cause(failed[0].error)
        text = f"{type(cause).__name__}: {first_line(cause)}"
        if len(failed) == len(grid):
            raise SweepError(f"all {len(grid)} trials of sweep {sweep.name!r} failed; the first: {text} "
                             f"(each trial's log: {out / 'tune' / sweep.name})")
        print(f"[rayreward] warning: {len(failed)} of {len(grid)} trials failed; the first: {text}", flush=True)
    try:
        df.to_parquet(out / "results.parquet", index=False)
    except ImportError as e:  # pyarrow is optional for pandas
        print(f"[rayreward] results.parquet skipped: {e}", flush=True)
    best = df.dropna(subset=[sweep.metric])
    if len(best):
        row = best.sort_values(sweep.metric, ascending=sweep.mode == "min").iloc[0]
        assignment = {k: _plain(row[k]) for k in sweep.search}
        cfg = trial_config(sweep.base, assignment, str(out / "best"), f"{sweep.name}-best")
        config_mod.dump(cfg, out / "best_config.yaml")
        print(f"[rayreward] best trial {row['trial_id']}: {assignment} -> {sweep.metric} {row[sweep.metric]:+.4f}; "
              f"ready to run: rayreward train --config {out / 'best_config.yaml'}", flush=True)
    plot_sweep(df, sweep, out / "sweep.png")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    print(f"[rayreward] wrote {out / 'results.csv'}, {out / 'sweep.png'}", flush=True)
    return out


def _plain(v):
    """numpy scalars -> Python, for YAML."""
    return v.item() if hasattr(v, "item") else v


def results_table(grid, sweep: SweepConfig):
    """One row per trial: the swept values, the last reported metrics (what the scheduler saw), the
    best value of the metric over its steps, steps reported and trained, status, the trial's folder."""
    import pandas as pd

    rows = []
    for r in grid:
        cfg = r.config or {}
        hist = r.metrics_dataframe
        m = sweep.metric
        best_seen = None
        if hist is not None and m in hist:
            best_seen = float(hist[m].max() if sweep.mode == "max" else hist[m].min())
        last = r.metrics or {}
        trial_id = last.get("trial_id") or Path(r.path).name
        row = {"trial_id": trial_id, **{k: cfg.get("search", {}).get(k) for k in sweep.search},
               m: last.get(m), f"{m}_best": best_seen,
               "steps": int(last["step"]) + 1 if "step" in last else 0,  # the training step of the last report
               "reward_mean": last.get("reward_mean"), "status": "ERROR" if r.error else "DONE",
               "trial_dir": str(Path(cfg.get("sweep_dir", sweep.output_dir)) / "trials" / str(trial_id))}
        # a trial ASHA stops is torn down within seconds, not at once: it may train a few steps more
        # than it reported (its own metrics.csv has them); the table keeps what the scheduler saw
        log = Path(row["trial_dir"]) / "metrics.csv"
        row["steps_trained"] = len(pd.read_csv(log)) if log.is_file() else 0
        spent = budget_spent(sweep.base["train"], cfg.get("search", {}), last)
        row["stopped_early"] = row["steps"] < int(sweep.base["train"]["steps"]) and not spent
        rows.append(row)
    df = pd.DataFrame(rows)
    for k in sweep.search:  # as drawn: a column with a missing value would turn integers into floats
        df[k] = pd.Series([row[k] for row in rows], dtype=object)
    return df.sort_values("trial_id").reset_index(drop=True)


def plot_sweep(df, sweep: SweepConfig, path: Path) -> None:
    """The metric against each swept knob (one panel per knob; trials stopped by ASHA hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(sweep.search)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        vals = df[k].tolist()
        cats = sorted({str(v) for v in vals}, key=lambda s: (len(s), s))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        xs = [float(v) for v in vals] if numeric else [cats.index(str(v)) for v in vals]
        done = ~df["stopped_early"]
        ax.scatter([x for x, d in zip(xs, done) if d], df[sweep.metric][done], label="ran to the end")
        ax.scatter([x for x, d in zip(xs, done) if not d], df[sweep.metric][~done], facecolors="none",
                   edgecolors="C1", label="stopped by ASHA")
        if not numeric:
            ax.set_xticks(range(len(cats)), cats)
        elif k.endswith("lr"):
            ax.set_xscale("log")
        ax.set_xlabel(k)
        ax.set_ylabel(sweep.metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"sweep {sweep.name}: last reported {sweep.metric} per trial")
    fig.tight_layout()
    with files.written(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
