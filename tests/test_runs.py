"""A run's folder and the ways a user meets it: reused folders, two runs at once, a changed config
on resume, corrupt checkpoints, unreachable clusters, Ctrl-C / SIGTERM, worker errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayreward import config, driver, runfolder, runtime, train

from helpers import ROOT, make_worker, quick_cfg, rows

CLI = [sys.executable, "-m", "rayreward.cli"]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def make_run(out: Path, *overrides: str) -> config.Config:
    """An in-process run laid out as Ray Train lays it out: OUTPUT_DIR/config.yaml, metrics.csv,
    and OUTPUT_DIR/ray/NAME/checkpoint_<n>/ per checkpoint (oldest first)."""
    cfg = quick_cfg(out, *overrides)
    n = {"i": 0}

    def report(row, folder):
        if folder is not None:
            shutil.copytree(folder, out / "ray" / cfg.name / f"checkpoint_{n['i']:04d}")
            n["i"] += 1

    train.run_training(cfg, report=report)
    return cfg


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A run of 4 steps with checkpoints at steps 2 and 4 (copied per test)."""
    out = tmp_path_factory.mktemp("run") / "run"
    make_run(out, "train.steps=4", "train.checkpoint_every=2")
    return out


@pytest.fixture
def run_dir(two_checkpoints, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    return out


def test_a_run_resumes_from_its_newest_checkpoint(run_dir):
    plan = runfolder.prepare(quick_cfg(run_dir, "train.steps=6", "train.checkpoint_every=2"), run_dir)
    assert plan.resume.step == 4 and plan.warnings == [] and plan.skip == []


def test_a_new_name_in_a_used_folder_is_refused_and_nothing_is_touched(run_dir):
    before = (run_dir / "metrics.csv").read_text()
    with pytest.raises(config.ConfigError, match="holds the run 'tiny'; a run named 'other' would overwrite"):
        runfolder.prepare(quick_cfg(run_dir, "name=other"), run_dir)
    proc = subprocess.run([*CLI, "train", "--config", str(ROOT / "experiments/tiny.yaml"), "--set",
                           f"output_dir={run_dir}", "--set", "name=other"], capture_output=True, text=True,
                          timeout=120, env=_env())
    assert proc.returncode == 2 and "Set output_dir to a new folder" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / "metrics.csv").read_text() == before


def test_resuming_with_another_config_names_the_fields_and_the_way_out(run_dir):
    cfg = quick_cfg(run_dir, "method.name=draft_k", "optim.lr=0.02", "train.steps=6", "grid.seeds=[0, 1]",
                    "train.compile=default", "train.vae_checkpointing=false", "train.gpus_per_worker=0.5")
    with pytest.raises(config.ConfigError) as e:
        runfolder.prepare(cfg, run_dir)
    msg = str(e.value)
    assert "method.name: 'drtune' in the checkpoint, 'draft_k' now" in msg and "optim.lr: 0.01" in msg
    for free in ("train.steps", "grid.seeds", "train.compile", "train.vae_checkpointing", "train.gpus_per_worker"):
        assert free not in msg  # free to change on resume: they do not change what a step computes
    assert "train.resume=force" in msg and "new folder" in msg


def test_a_forced_resume_records_the_change_and_uses_the_new_learning_rate(run_dir):
    cfg = quick_cfg(run_dir, "optim.lr=0.02", "train.steps=6", "train.resume=force")
    plan = runfolder.prepare(cfg, run_dir)
    assert plan.resume.step == 4 and "optim.lr 0.01 -> 0.02" in plan.warnings[0]
    (record,) = [json.loads(line) for line in (run_dir / runfolder.RESUMES_FILE).read_text().splitlines()]
    assert record["at_step"] == 4 and record["changed"] == {"optim.lr": [0.01, 0.02]}
    w = make_worker(cfg, "cpu")
    w.restore(plan.resume)
    assert [g["lr"] for g in w.optimizer.param_groups] == [0.02]  # not the 0.01 saved with the moments
    assert w.optimizer.state_dict()["state"]  # the moments did come back


@pytest.mark.parametrize("change", ["lora.rank=8", "lora.target_modules=[to_q, to_v]", "model.name=tiny-sdxl"])
def test_a_structural_change_is_refused_even_with_force_and_nothing_is_written(run_dir, change):
    """A LoRA of another shape or base model cannot load into the new adapter: refused before
    anything is written (resumes.jsonl untouched), naming the field."""
    cfg = quick_cfg(run_dir, change, "train.steps=6", "train.resume=force")
    with pytest.raises(config.ConfigError) as e:
        runfolder.prepare(cfg, run_dir)
    assert f"{change.split('=')[0]}: " in str(e.value) and "not even with train.resume=force" in str(e.value)
    assert not (run_dir / runfolder.RESUMES_FILE).exists()


@pytest.mark.parametrize("damage,needle", [
    (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]), "optimizer.pt: unreadable"),
    (lambda c: shutil.rmtree(c / "lora"), "lora"),
    (lambda c: (c / "trainer_state.json").write_text(""), "trainer_state.json: unreadable"),
], ids=["truncated_optimizer", "deleted_lora", "empty_state"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(run_dir, damage, needle):
    newest, older = runfolder.checkpoint_folders(run_dir, "tiny")
    damage(newest)
    plan = runfolder.prepare(quick_cfg(run_dir, "train.steps=6", "train.checkpoint_every=2"), run_dir)
    assert plan.resume.step == 2 and plan.resume.folder == str(older) and plan.skip == [newest.name]
    assert needle in plan.warnings[0] and "resuming from the one before it, at step 2" in plan.warnings[0]
    damage(older)
    with pytest.raises(runfolder.CheckpointError, match=f"no checkpoint of run 'tiny' can be read back: .*{needle}"):
        runfolder.prepare(quick_cfg(run_dir, "train.steps=6"), run_dir)


def test_ray_train_resumes_past_a_corrupt_latest_checkpoint(tmp_path, ray_session):
    """Through Ray Train: its own latest checkpoint is truncated, the run goes on from the one
    before it and ends with every step once."""
    out = tmp_path / "run"
    assert driver.fit(quick_cfg(out, "train.steps=4", "train.checkpoint_every=2")).error is None
    newest, _ = runfolder.checkpoint_folders(out, "tiny")
    (newest / "optimizer.pt").write_bytes(b"")
    result = driver.fit(quick_cfg(out, "train.steps=6", "train.checkpoint_every=2"))
    assert result.error is None
    assert [int(r["step"]) for r in rows(out / "metrics.csv")] == [0, 1, 2, 3, 4, 5]
    assert runfolder.read_checkpoint(result.checkpoint.path).step == 6


def test_a_checkpoint_written_but_never_registered_with_ray_is_resumed_from(tmp_path, ray_session):
    """A kill between writing a checkpoint and Ray recording it leaves the newest checkpoint unknown
    to Ray (found trying SIGTERM by hand: the CLI said "resume from step 10", the resume took 8).
    Made here by putting back Ray's record from before the newest checkpoint."""
    import shutil

    out = tmp_path / "run"
    assert driver.fit(quick_cfg(out, "train.steps=2", "train.checkpoint_every=2")).error is None
    record = out / "ray" / "tiny" / "checkpoint_manager_snapshot.json"
    shutil.copy(record, tmp_path / "record-at-2.json")
    assert driver.fit(quick_cfg(out, "train.steps=4", "train.checkpoint_every=2")).error is None
    shutil.copy(tmp_path / "record-at-2.json", record)  # Ray knows step 2; step 4 is on disk only
    started = time.time()
    result = driver.fit(quick_cfg(out, "train.steps=6", "train.checkpoint_every=2"))
    assert result.error is None
    log = rows(out / "metrics.csv")
    assert [int(r["step"]) for r in log] == [0, 1, 2, 3, 4, 5]
    assert [float(r["time"]) > started for r in log] == [False] * 4 + [True] * 2  # from 4: steps 2, 3 not redone
    assert runfolder.read_checkpoint(result.checkpoint.path).step == 6


def test_a_second_run_in_the_same_folder_stops_with_a_message(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from rayreward.runfolder import RunLock; RunLock(Path(sys.argv[1])).acquire(); "
                               "print('locked', flush=True); time.sleep(120)", str(out)], stdout=subprocess.PIPE,
                              text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runfolder.RunFolderBusy, match=f"in use by another rayreward run \\(pid {holder.pid} on"):
            runfolder.RunLock(out).acquire()
        proc = subprocess.run([*CLI, "train", "--config", str(ROOT / "experiments/tiny.yaml"), "--set",
                               f"output_dir={out}"], capture_output=True, text=True, timeout=120, env=_env())
        assert proc.returncode == 2 and "is in use by another rayreward run" in proc.stderr
        assert "Traceback" not in proc.stderr and not (out / "metrics.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    with runfolder.RunLock(out):  # released when its process ended
        pass


@pytest.mark.parametrize("address,needle", [
    ("127.0.0.1:1", "nothing answers at 127.0.0.1:1"), ("", "set but empty"),
    ("http://127.0.0.1:8265", "dashboard / job-server URL"), ("foo:bar:baz", "not an address Ray can join"),
])
def test_a_bad_ray_address_fails_fast_with_a_message(address, needle):
    t0 = time.monotonic()
    with pytest.raises(runtime.ClusterError, match=needle):
        driver.check_address(address)
    assert time.monotonic() - t0 < 10  # not Ray's minutes of retries


def test_the_cli_with_an_unreachable_ray_address_exits_1_without_a_traceback(tmp_path):
    proc = subprocess.run([*CLI, "train", "--config", str(ROOT / "experiments/tiny.yaml"), "--set",
                           f"output_dir={tmp_path}"], capture_output=True, text=True, timeout=120,
                          env=_env(RAY_ADDRESS="127.0.0.1:1"))
    assert proc.returncode == 1 and "nothing answers at 127.0.0.1:1" in proc.stderr and "Traceback" not in proc.stderr


def test_resources_no_node_can_provide_end_after_the_start_timeout(ray_session):
    cfg = config.from_dict({}, ["reward_server.mode=remote", "reward_server.resources={reward_host: 1}",
                                "train.start_timeout_s=1"])
    t0 = time.monotonic()
    with pytest.raises(runtime.ClusterError, match=r"within train.start_timeout_s=1 s .*reward_host 0 of 1"):
        runtime.wait_for_resources(cfg)
    assert time.monotonic() - t0 < 30


@pytest.mark.slow  # starts its own Ray through the CLI
def test_a_worker_error_is_one_line_and_the_traceback_only_with_verbose(tmp_path):
    args = [*CLI, "train", "--config", str(ROOT / "experiments/tiny.yaml"), "--set", f"output_dir={tmp_path}",
            "--set", "train.steps=1", "--set", "sampling.num_steps=4", "--set", "method.name=draft_k",
            "--set", "rewards=[{name: 'helpers:detached_mean'}]"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "rayreward train: error: worker 0: reward helpers:detached_mean: the loss does not depend" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    proc = subprocess.run(args[:3] + ["--verbose"] + args[3:], capture_output=True, text=True, timeout=300,
                          env=_env())
    assert proc.returncode == 1 and "Traceback" in proc.stderr + proc.stdout


@pytest.mark.slow  # starts its own Ray through the CLI
def test_sigterm_stops_the_run_says_how_to_resume_and_the_same_command_resumes(tmp_path):
    args = [*CLI, "train", "--config", str(ROOT / "experiments/tiny.yaml"), "--set", f"output_dir={tmp_path}",
            "--set", "train.steps=40", "--set", "train.checkpoint_every=2", "--set", "train.batch_size=2",
            "--set", "sampling.num_steps=4", "--set", "method.early_stop_m=2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    lines = []
    for line in proc.stdout:  # wait for step 4: checkpoints at 2 and 4 exist or are being written
        lines.append(line)
        if "] step 4 " in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + rest
    assert "interrupted (SIGTERM); run the same command again to resume from its checkpoint at step" in rest
    assert "Traceback" not in rest
    # quiet by default: the workers' progress lines bare, Ray's known noise dropped
    said = "".join(lines) + rest
    assert any(x.startswith("[rayreward] step 0 [1/40]") for x in lines), said
    assert "[rayreward] model tiny loaded in" in said and "[rayreward] start grid: 8 images in" in said
    assert "pid=" not in said and "PreemptionWatcher" not in said and "Token authentication" not in said, said
    done = rows(tmp_path / "metrics.csv")
    args[args.index("train.steps=40")] = f"train.steps={len(done) + 2}"
    again = subprocess.run(args + ["--verbose"], capture_output=True, text=True, timeout=300, env=_env())
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from the checkpoint at step" in again.stdout + again.stderr
    assert "(RayTrainWorker pid=" in again.stdout + again.stderr  # --verbose: Ray's output as it is
    assert [int(r["step"]) for r in rows(tmp_path / "metrics.csv")] == list(range(len(done) + 2))


@pytest.mark.parametrize("argv,code,needle", [
    (["score", "--rewards", "symmetry", "--images", ".", "--device", "banana"], 2,
     "--device: 'banana' is not a device; use cpu, cuda or cuda:N"),
    (["score", "--rewards", "symmetry", "--images", ".", "--device", "cuda:7"], 2, "--device: 'cuda:7' is not available"),
    (["sample", "--device", "banana", "--out", "/tmp/never.png"], 2, "--device: 'banana' is not a device"),
    (["sample", "--prompts", "/no/such.txt", "--out", "/tmp/never.png"], 2, "--prompts: '/no/such.txt' does not exist"),
    (["sample", "--set", "sampling.num_steps=4", "--prompt", "a", "--seeds", "0", "--out", "/proc/no/grid.png"], 2,
     "'/proc/no': No such file or directory"),  # its folder cannot be made
    (["train", "--config", str(ROOT / "experiments/tiny.yaml"), "--set", "output_dir=/proc/runs"], 2,
     "output_dir: cannot write to '/proc/runs'"),
], ids=["device_name", "device_missing", "sample_device", "sample_prompts", "sample_out", "train_output_dir"])
def test_bad_devices_and_unwritable_outputs_are_one_message(argv, code, needle, capsys):
    from rayreward import cli

    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
