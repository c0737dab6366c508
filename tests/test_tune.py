"""`rayreward tune`: a real sweep on the session's Ray (tiny model, 4 trials over K and LoRA rank, ASHA),
interrupted with Ctrl-C and resumed; its results table and best config; bad sweep files."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from helpers import ROOT, rows

from rayreward import config, train
from rayreward import tune as rtune

SWEEP = {
    "base": str(ROOT / "experiments/tiny.yaml"),
    "set": ["train.steps=3", "train.batch_size=1", "train.checkpoint_every=1", "sampling.num_steps=4",
            "method.early_stop_m=2", "grid.seeds=[0]", "grid.prompts=[a cat]"],
    "name": "kr",
    "search": {"method.k": [1, 2], "lora.rank": {"grid": [2, 4]}},
    "metric": "reward_smooth",
    "mode": "max",
    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
}


def write_sweep(tmp_path, **changes):
    data = {**SWEEP, "output_dir": str(tmp_path / "sweep"), **changes}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_sweep_is_interrupted_resumes_and_its_best_config_trains(ray_session, tmp_path):
    import ray

    # one at a time: trials are still pending when the first ends; tracked in MLflow and TensorBoard
    path = write_sweep(tmp_path, max_concurrent=1, set=SWEEP["set"] + ["log.trackers=[mlflow, tensorboard]"])
    out = tmp_path / "sweep"
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1")
    # 1. `rayreward tune` as users run it, joined to this session's Ray; Ctrl-C once a trial is done
    proc = subprocess.Popen([sys.executable, "-m", "rayreward.cli", "tune", "--config", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("trials/*/lora/*.safetensors")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(1)
    finished = {p.parts[-3] for p in out.glob("trials/*/lora/*.safetensors")}
    assert finished, "no trial finished in 300 s"
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "interrupted" in log, log[-2000:]
    # quiet by default: a bar of the trials stands for their step lines (each trial's metrics.csv has them)
    assert "[rayreward] trials:" in log and "] step 0 [" not in log and "Configuration for experiment" not in log, log
    assert not (out / "results.csv").exists(), log[-2000:]  # it was cut short
    stamps = {t: (out / "trials" / t / "grid_start.png").stat().st_mtime for t in finished}

    # 2. the same command again resumes: finished trials are not re-run, the others complete
    sweep = rtune.load_sweep(path)
    assert rtune.run_sweep(sweep) == out
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 4 and set(df.status) == {"DONE"}, df
    assert sorted(zip(df["method.k"], df["lora.rank"])) == [(1, 2), (1, 4), (2, 2), (2, 4)]
    assert df.steps.between(1, 3).all() and df.reward_smooth.notna().all()
    assert (df.stopped_early == (df.steps < 3)).all()
    assert (out / "results.parquet").is_file() and (out / "sweep.png").stat().st_size > 0
    for t in finished:
        assert (out / "trials" / t / "grid_start.png").stat().st_mtime == stamps[t]
        assert len(rows(out / "trials" / t / "metrics.csv")) == 3
    # each trial's own metrics.csv agrees with what Tune saw at its last report
    for _, r in df.iterrows():
        m = rows(out / "trials" / r.trial_id / "metrics.csv")
        assert len(m) == r.steps_trained >= r.steps
        assert float(m[r.steps - 1]["reward_smooth"]) == pytest.approx(r.reward_smooth, rel=1e-6)

    # one MLflow run per trial, in one experiment named after the sweep, in the sweep folder's store;
    # the trial cut short by Ctrl-C continued its own run. TensorBoard: each trial's folder.
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kr").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(f"kr-{t}" for t in df.trial_id)
    for r in runs:
        trial = r.info.run_name[len("kr-"):]
        steps = {h.step for h in client.get_metric_history(r.info.run_id, "reward_mean")}
        assert steps == set(range(len(rows(out / "trials" / trial / "metrics.csv")))), (trial, steps)
        assert (out / "trials" / trial / "tensorboard").is_dir()

    # 3. the best config is the best row's values on the base, and it trains
    best = df.sort_values("reward_smooth", ascending=False).iloc[0]
    cfg = config.load(out / "best_config.yaml", [f"output_dir={tmp_path / 'best'}", "train.steps=1"])
    assert (cfg.method.k, cfg.lora.rank) == (best["method.k"], best["lora.rank"])
    assert cfg.sampling.num_steps == 4  # the base's overrides are kept
    row = train.run_training(cfg)
    assert row["stepped"] == 1 and (tmp_path / "best" / "lora").is_dir()


def test_bad_sweeps_are_refused_before_ray_starts(tmp_path):
    def problems(**changes):
        with pytest.raises(config.ConfigError) as e:
            rtune.load_sweep(write_sweep(tmp_path, **changes))
        return "\n".join(e.value.problems)

    p = problems(search={"method.kk": [1, 2]})
    assert "search.method.kk = 1: method.kk: unknown key; allowed:" in p
    assert "search.method.k = 0: method.k: 0 is not allowed" in problems(search={"method.k": [0, 2]})
    assert "need [low, high] numbers with low < high and low > 0" in problems(search={"optim.lr": {"loguniform": [0, 1]}})
    assert "search.lora.rank: {'range': [1, 2]} is not allowed" in problems(search={"lora.rank": {"range": [1, 2]}})
    assert "search: missing or empty" in problems(search={})
    assert "scheduler: {'name': 'hyperband'} is not allowed" in problems(scheduler={"name": "hyperband"})
    assert "mode: 'best' is not allowed" in problems(mode="best")
    assert "base: 'nope.yaml' does not exist" in problems(base="nope.yaml")
    assert "base config: train.steps:" in problems(set=["train.steps=-1"])
    with pytest.raises(config.ConfigError, match="does not exist"):
        rtune.load_sweep(tmp_path / "missing.yaml")


def test_a_sweep_larger_than_the_cluster_is_a_clear_error(tmp_path):
    sweep = rtune.load_sweep(write_sweep(tmp_path, search={"train.num_workers": [1, 8]}))
    with pytest.raises(config.ConfigError, match=r"one trial of sweep 'kr' asks for more than the cluster has "
                                                 r"\(CPU: needs 8, the cluster has 4\)"):
        rtune.concurrency(sweep, {"CPU": 4.0}, fixed=True)
    assert rtune.concurrency(sweep, {"CPU": 4.0}, fixed=False) == 1  # an autoscaler may add nodes
    small = rtune.load_sweep(write_sweep(tmp_path))
    # a trial takes exactly its worker's CPU: the driver's 0.01 comes out of the worker's share
    assert rtune.concurrency(small, {"CPU": 2.0}, fixed=True) == 2
    assert rtune.concurrency(small, {"CPU": 64.0}, fixed=True) == 64
    two = rtune.load_sweep(write_sweep(tmp_path, search={"train.cpus_per_worker": [2.0]}))
    assert rtune.concurrency(two, {"CPU": 5.0}, fixed=True) == 2


def test_a_float_distribution_on_an_integer_field_is_refused_at_load(tmp_path):
    path = write_sweep(tmp_path, search={"lora.rank": {"uniform": [1, 8]}, "optim.lr": {"loguniform": [1e-4, 1e-2]}})
    with pytest.raises(config.ConfigError) as e:
        rtune.load_sweep(path)
    msg = str(e.value)
    assert "search.lora.rank = 1.0 (as drawn): lora.rank: expected an integer, got 1.0" in msg
    assert "use randint" in msg and "optim.lr" not in msg  # a float field takes uniform draws


def test_a_sweep_whose_trials_all_fail_exits_1_with_the_cause(ray_session, tmp_path):
    import ray

    # a reward model folder that does not exist: the config validates, every trial's workers fail
    missing = tmp_path / "no-such-model"
    path = write_sweep(tmp_path, search={"method.k": [1]}, scheduler={"name": "none"},
                       set=SWEEP["set"] + ["train.steps=1", f"rewards=[{{name: pickscore, args: {{model: '{missing}', "
                                                            f"processor: '{missing}'}}}}]"])
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    proc = subprocess.run([sys.executable, "-m", "rayreward.cli", "tune", "--config", str(path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "all 1 trials of sweep 'kr' failed; the first: RewardLoadError: reward pickscore: cannot load" in proc.stderr


def test_a_sweeps_trials_are_grouped_in_its_trackers(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = rtune.load_sweep(write_sweep(tmp_path, set=SWEEP["set"] + ["log.trackers=[mlflow, wandb]"]))
    log = rtune.tracked_base(sweep, tmp_path / "sweep")["log"]
    assert log["experiment"] == "kr"  # the MLflow experiment and the W&B group of every trial
    assert log["mlflow_tracking_uri"] == f"sqlite:///{(tmp_path / 'sweep').resolve() / 'mlflow.db'}"
    assert log["wandb_mode"] == "offline"
    plain = rtune.load_sweep(write_sweep(tmp_path))
    assert rtune.tracked_base(plain, tmp_path / "sweep")["log"]["trackers"] == []


def test_a_trial_that_spent_its_budget_was_not_stopped_early():
    """A trial that ended on train.max_unet_calls or train.max_seconds (the sweep's, or its own
    searched value) is not counted as stopped by the scheduler."""
    from rayreward.tune import budget_spent

    train = {"steps": 100, "max_unet_calls": 200, "max_seconds": 0}
    assert budget_spent(train, {}, {"unet_calls_total": 204}) and not budget_spent(train, {}, {"unet_calls_total": 150})
    assert not budget_spent(train, {"train.max_unet_calls": 400}, {"unet_calls_total": 204})
    timed = {"steps": 100, "max_unet_calls": 0, "max_seconds": 30.0}
    assert budget_spent(timed, {}, {"train_seconds_total": 31.2}) and not budget_spent(timed, {}, {"train_seconds_total": 12})
    assert not budget_spent({"steps": 100}, {}, {"unet_calls_total": 10**6, "train_seconds_total": 10**6})
