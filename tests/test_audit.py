"""Bad inputs and faults found by the third audit: each case fails on the code before its fix."""

import os
from pathlib import Path

import pytest
import torch

from rayreward import cli, config, methods, models, runfolder
from rayreward.errors import RunFolderBusy

from helpers import ROOT


def test_the_run_lock_never_writes_through_a_symlink(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / runfolder.LOCK_FILE).symlink_to(victim)
    with pytest.raises(RunFolderBusy, match="is a symbolic link"):
        runfolder.RunLock(out).acquire()
    assert victim.read_text() == "precious"
    # the CLI: exit 2 before Ray or any model starts, the victim untouched
    code = cli.main(["train", "--config", str(ROOT / "experiments/tiny.yaml"), "--set", f"output_dir={out}"])
    assert code == 2 and "symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "precious"


def test_the_run_lock_refuses_a_fifo_instead_of_hanging(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / runfolder.LOCK_FILE)
    with pytest.raises(RunFolderBusy, match="not a regular file"):
        runfolder.RunLock(out).acquire()


def test_a_metrics_rewrite_cut_short_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    log = runfolder.MetricsLog(path, 0)
    for step in range(3):
        log.append({"step": step, "reward_mean": 0.1 * step})
    before = path.read_text()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runfolder.csv.DictWriter, "writerows", full_disk)
    with pytest.raises(OSError):
        runfolder.MetricsLog(path, 2)  # a resume at step 2 rewrites the file
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    c = models.load_components(config.ModelConfig(name="tiny"))
    for p in models.add_lora(c.unet, config.LoraConfig()):
        torch.nn.init.normal_(p, std=0.01)
    from rayreward import lora_io

    folder = tmp_path_factory.mktemp("run") / "lora"
    lora_io.save_lora(c.unet, folder, c.flavour)
    return folder


def test_export_refuses_an_existing_out_and_never_overwrites_its_input(lora_folder, tmp_path, capsys):
    source = lora_folder / "pytorch_lora_weights.safetensors"
    original = source.read_bytes()
    for extra in ([], ["--force"]):  # the LoRA being exported is never the target, even with --force
        assert cli.main(["export", "--lora", str(lora_folder), "--format", "kohya", "--out", str(source), *extra]) == 2
        assert "is the LoRA being exported" in capsys.readouterr().err
    assert source.read_bytes() == original
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"another run's file")
    assert cli.main(["export", "--lora", str(lora_folder), "--format", "kohya", "--out", str(other)]) == 2
    assert "exists; choose a new file, or add --force" in capsys.readouterr().err
    assert other.read_bytes() == b"another run's file"
    assert cli.main(["export", "--lora", str(lora_folder), "--format", "kohya", "--out", str(other), "--force"]) == 0
    assert other.read_bytes() != b"another run's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.safetensors"]  # written whole, no temporary left


@pytest.mark.parametrize("call, needle", [
    (lambda: methods.plan_drtune(5, 2, 9), "plan_drtune: m=9 (need 1 <= m <= T)"),
    (lambda: methods.plan_drtune(5, 6, 2), "plan_drtune: K=6 (need 1 <= K <= T)"),
    (lambda: methods.plan_drtune(0, 1, 1), "plan_drtune: T=0 (need an integer >= 1)"),
    (lambda: methods.plan_draft_k(4, 5), "plan_draft_k: K=5"),
    (lambda: methods.plan_draft_lv(4, 0), "plan_draft_lv: n=0"),
    (lambda: methods.plan_refl(10, (3, 12)), "plan_refl: window=(3, 12)"),
    (lambda: methods.plan_alignprop(10, (0, 3), []), "plan_alignprop: k_range=(0, 3)"),
])
def test_public_plan_functions_check_their_arguments(call, needle):
    with pytest.raises(ValueError) as e:
        call()
    assert needle in str(e.value)


def test_a_valid_drtune_plan_is_unchanged_by_the_checks():
    g = torch.Generator().manual_seed(0)
    plan = methods.plan_drtune(10, 2, 4, g)
    assert len(plan.info["steps"]) == 2 and plan.info["stride"] == 5 and plan.stop == 10 - plan.info["t_min"] + 1


BOMB = ('a: &a ["x","x","x","x","x","x","x","x","x"]\n'
        + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(7))
        + "rewards:\n  - {name: symmetry, args: {x: *h}}\n")  # nine-way, seven levels: 9^8 leaves


def test_a_yaml_alias_bomb_is_refused_at_load_in_a_fraction_of_a_second(tmp_path):
    import time

    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB)
    t0 = time.perf_counter()
    with pytest.raises(config.ConfigError, match="expands to more than 100,000 YAML nodes"):
        config.load(f)
    with pytest.raises(config.ConfigError, match="--set 'rewards.0.args.x=.*expands to more than"):
        config.load(None, ["rewards.0.args.x=" + BOMB.replace("\n", "\n")])
    assert time.perf_counter() - t0 < 30  # unbounded before: killed at 120 s


@pytest.mark.parametrize("make, needle", [
    (lambda d: d, "is a folder; give a YAML file"),
    (lambda d: (os.mkfifo(d / "fifo"), d / "fifo")[1], "is not a regular file"),
    (lambda d: ((d / "bad.yaml").write_bytes(b"name: \xff\xfe\n"), d / "bad.yaml")[1], "is not UTF-8 text"),
])
def test_config_files_that_are_not_yaml_text_are_named_for_what_they_are(tmp_path, capsys, make, needle):
    path = make(tmp_path)
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(path) in err and "does not exist" not in err


def test_a_set_that_is_not_yaml_names_the_set_and_its_key(capsys):
    assert cli.main(["train", "--config", str(ROOT / "experiments/tiny.yaml"), "--set", "method.k=[1,"]) == 2
    err = capsys.readouterr().err
    assert "--set 'method.k=[1,': not valid YAML" in err and "ParserError" not in err


@pytest.mark.parametrize("value", ["banana", "0", "-1", "inf"])
def test_a_bad_report_poll_in_the_environment_is_refused_before_ray_starts(monkeypatch, value):
    from rayreward import driver

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", value)
    with pytest.raises(config.ConfigError, match=f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={value!r} .* need seconds > 0"):
        driver.check_report_poll()
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    driver.check_report_poll()


def test_pretrain_refuses_a_non_finite_learning_rate_and_never_saves_a_non_finite_model(tmp_path, capsys):
    assert cli.main(["pretrain", "--out", str(tmp_path / "m"), "--lr", "inf", "--unet-steps", "1"]) == 2
    assert "--lr: inf is not allowed; need a finite number > 0" in capsys.readouterr().err
    from rayreward.errors import RunError
    from rayreward.shapes.pretrain import require_finite

    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(RunError, match="the unet has 1 non-finite weights .* nothing of it was saved"):
        require_finite({"unet": net}, tmp_path / "m")


def _user_rewards(name: str):
    """Misbehaving user rewards, named as a config names them (module:factory)."""
    import sys
    import types

    module = types.ModuleType("audit_rewards")

    def raises_at_second_call(device="cpu"):  # the second training step
        calls = {"n": 0}

        def fn(images, prompts):
            calls["n"] += 1
            if calls["n"] >= 3:  # the start grid, step 0, then step 1
                raise KeyError("my_lookup_table")
            return -images.mean(dim=(1, 2, 3))
        return fn

    module.raises_at_second_call = raises_at_second_call
    module.returns_a_float = lambda device="cpu": (lambda images, prompts: 0.5)
    module.returns_nan = lambda device="cpu": (lambda images, prompts: images.mean(dim=(1, 2, 3)) * float("nan"))
    sys.modules["audit_rewards"] = module
    return f"audit_rewards:{name}"


@pytest.mark.parametrize("factory, needle", [
    ("raises_at_second_call", "step 1: reward audit_rewards:raises_at_second_call raised KeyError: 'my_lookup_table' "
                              "(in the reward's own code, not in rayreward)"),
    ("returns_a_float", "start grid: reward audit_rewards:returns_a_float returned a float, not a tensor"),
    ("returns_nan", "the loss is nan on the first trained step: a reward returned NaN or inf"),
])
def test_a_misbehaving_user_reward_is_named_with_its_step_and_its_error(tmp_path, factory, needle):
    from rayreward import train
    from rayreward.errors import RunError

    cfg = config.load(ROOT / "experiments/tiny.yaml", [f"output_dir={tmp_path}", "train.steps=3", "sampling.num_steps=4",
                                                       "method.early_stop_m=2", "method.k=1"])
    cfg.rewards = [config.RewardSpec(name=_user_rewards(factory))]
    with pytest.raises(RunError) as e:
        train.run_training(cfg)
    assert needle in str(e.value)
    message, code = cli.explain(e.value)
    assert code == 1 and "please report it" not in message


def test_all_reward_weights_zero_is_refused_at_validation():
    with pytest.raises(config.ConfigError, match="every weight is 0 .*training would change nothing"):
        config.from_dict({"rewards": [{"name": "symmetry", "weight": 0}]})
    config.from_dict({"rewards": [{"name": "symmetry", "weight": 0}]}, training=False)  # eval and sample take it


def test_reward_args_are_checked_against_the_factory_before_ray_starts(tmp_path, capsys):
    code = cli.main(["train", "--config", str(ROOT / "experiments/tiny.yaml"), "--set", f"output_dir={tmp_path / 'r'}",
                     "--set", "rewards=[{name: symmetry, args: {strength: 2}}]"])
    err = capsys.readouterr().err
    assert code == 2 and "rewards[0].args {'strength': 2}: got an unexpected keyword argument 'strength'" in err
    assert not (tmp_path / "r" / "metrics.csv").exists()
    import ray

    assert not ray.is_initialized()  # refused before Ray started


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--rewards", "symmetry", "--batch", "0", "--out", "{tmp}/e"], "--batch: 0 is not allowed; need an integer >= 1"),
    (["eval", "--rewards", "symmetry", "--out", "{tmp}/afile/x"], "--out: '{tmp}/afile/x' cannot be written: '{tmp}/afile' is a file"),
    (["sample", "--out", "{tmp}/afile/g.png"], "--out: '{tmp}/afile/g.png' cannot be written: '{tmp}/afile' is a file"),
    (["pretrain", "--out", "{tmp}/afile/m"], "--out: '{tmp}/afile/m' cannot be written: '{tmp}/afile' is a file"),
    (["sample", "--set", "grid.seeds=[]", "--out", "{tmp}/g.png"], "grid.seeds: empty"),
])
def test_command_flags_are_checked_before_any_model_loads(tmp_path, capsys, argv, needle):
    (tmp_path / "afile").write_text("not a folder")
    assert cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert needle.replace("{tmp}", str(tmp_path)) in err, err
    assert "model" not in err.split("error:")[0]  # nothing loaded before the refusal


@pytest.mark.parametrize("sets, needle", [
    (["train.storage=ftp://host/runs"], "train.storage: 'ftp://host/runs' has the scheme 'ftp', which Ray Train cannot"),
    (["train.storage_endpoint=http://127.0.0.1:9000"], "train.storage_endpoint: 'http://127.0.0.1:9000' is set, but "
                                                       "train.storage '' is not an s3:// URI"),
    (["train.storage=s3://b/p", "train.storage_endpoint=minio:9000"], "train.storage_endpoint: 'minio:9000' is not "
                                                                      "allowed; give the store's URL"),
])
def test_bad_storage_settings_are_refused_at_validation(sets, needle):
    with pytest.raises(config.ConfigError) as e:
        config.from_dict({}, sets)
    assert any(needle in p for p in e.value.problems), e.value.problems
    assert config.from_dict({}, ["train.storage=s3://bucket/prefix", "train.storage_endpoint=http://10.0.0.5:9000"])


def test_the_storage_of_a_run_is_its_output_folder_by_default_and_lists_checkpoints_newest_first(tmp_path):
    from rayreward.storage import Storage

    cfg = config.from_dict({"output_dir": str(tmp_path / "run")})
    store = Storage.of(cfg)
    assert store.local and store.path == str(tmp_path / "run" / "ray")
    for name in ("checkpoint_2026-01-01_00-00-01", "checkpoint_2026-01-01_00-00-03", "checkpoint_2026-01-01_00-00-02"):
        (tmp_path / "run" / "ray" / cfg.name / name).mkdir(parents=True)
    assert [p.rpartition("/")[2] for p in store.checkpoints(cfg.name)] == [
        "checkpoint_2026-01-01_00-00-03", "checkpoint_2026-01-01_00-00-02", "checkpoint_2026-01-01_00-00-01"]


# ---------------------------------------------------------------------------------------------
# Upper bounds: what the model and the device cannot take is refused before Ray starts.


@pytest.mark.parametrize("sets, needle", [
    (["train.batch_size=1000000000"], "one training step needs at least"),
    (["lora.rank=1000000"], "lora.rank: 1000000 is larger than the narrowest targeted layer"),
    (["model.resolution=65536"], "model.resolution: 65536 is more than 4x the native side of 'tiny' (32 px)"),
    (["lora.target_modules=[no_such_layer]"], "match no Linear or Conv2d layer"),
])
def test_values_the_model_or_the_device_cannot_take_are_refused_before_ray(tmp_path, capsys, monkeypatch, sets, needle):
    from rayreward import budget, driver

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(driver, "init_ray", no_ray)
    with pytest.raises(config.ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        budget.check(config.from_dict({}, sets))
    out = tmp_path / "run"
    code = cli.main(["train", "--config", str(ROOT / "experiments/tiny.yaml"), "--set", f"output_dir={out}",
                     *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Ray was started" not in err


def test_the_memory_estimate_grows_with_batch_and_resolution_and_accepts_the_defaults():
    from rayreward import budget

    cfg = config.from_dict({})
    sk = budget.skeleton(cfg.model)
    budget.check(cfg, sk)  # the default config fits
    layers = budget.lora_layers(sk.denoiser, cfg.lora.target_modules)
    base = budget.step_bytes(cfg, sk, layers)
    assert all(v > 0 for v in base.values())
    big = budget.step_bytes(config.from_dict({}, ["train.batch_size=8", "model.resolution=64"]), sk, layers)
    act = "decoder activations at full resolution"
    assert big[act] == base[act] * 2 * 4  # the batch, and the resolution squared
    assert budget.check(config.from_dict({}, ["model.name=nowhere/not-cached"])) is None  # not here: not checked


def test_a_sweep_over_a_rank_the_model_cannot_take_is_refused_at_load(tmp_path):
    from rayreward import tune

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {ROOT / 'experiments/tiny.yaml'}\nsearch: {{lora.rank: [2, 4096]}}\n")
    with pytest.raises(config.ConfigError, match=r"search.lora.rank = 4096: lora.rank: 4096 is larger than"):
        tune.load_sweep(sweep)


# ---------------------------------------------------------------------------------------------
# A driver killed with SIGKILL leaves no Ray process behind.


def test_the_reaper_kills_what_outlives_the_driver_and_nothing_else():
    import subprocess

    from rayreward import reaper

    driver = subprocess.Popen(["sleep", "1"])
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    recycled = subprocess.Popen(["sleep", "300"], start_new_session=True)
    victims = {orphan.pid: reaper.start_time(orphan.pid), recycled.pid: reaper.start_time(recycled.pid) + 1}
    try:
        killed = reaper.watch(driver.pid, victims, grace_s=0.5, poll_s=0.1)
        assert killed == [orphan.pid] and orphan.wait(5) == -9
        assert recycled.poll() is None  # another start time: another process with the same pid, spared
    finally:
        for p in (driver, orphan, recycled):
            p.kill()
            p.wait()


def test_no_ray_process_outlives_a_driver_killed_with_sigkill():
    import signal
    import subprocess
    import sys
    import time

    from rayreward import reaper

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = "import time; from rayreward import driver; driver.init_ray(); print('up', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        ray_procs = {p: reaper.start_time(p) for p in reaper.descendants(proc.pid)}
        names = {Path(f"/proc/{p}/cmdline").read_text().split("\0")[0] for p in ray_procs}
        assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names  # what used to outlive the driver
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(reaper.start_time(p) == t for p, t in ray_procs.items()):
            time.sleep(0.5)
        alive = [p for p, t in ray_procs.items() if reaper.start_time(p) == t]
        assert not alive, f"still running after the driver's SIGKILL: {alive}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None


# ---------------------------------------------------------------------------------------------
# Files written into a folder rayreward does not own alone never go through a planted link.


def test_no_file_rayreward_writes_goes_through_a_planted_link(tmp_path):
    from rayreward import files, outputs

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    for name in ("metrics.csv", "grid_scores.csv", "config.yaml", outputs.STARTS_FILE, "report.png"):
        (out / name).symlink_to(victim)
    log = runfolder.MetricsLog(out / "metrics.csv", 0)  # a whole-file write replaces the link
    log.append({"step": 0, "reward_mean": 0.5})
    runfolder.write_grid_scores(out / "grid_scores.csv", "start", ["p"], [0], {"r": torch.tensor([1.0])})
    config.dump(config.from_dict({}), out / "config.yaml")
    with files.written(out / "report.png", "wb") as f:
        f.write(b"png")
    with pytest.raises(OSError, match="is a symbolic link"):
        files.append(out / outputs.STARTS_FILE, "{}\n")  # an append refuses it
    os.mkfifo(out / "log.jsonl")
    with pytest.raises(OSError, match="not a regular file"):
        files.append(out / "log.jsonl", "{}\n")  # and does not hang on a FIFO
    assert victim.read_text() == "precious"
    assert not any(p.is_symlink() for p in out.iterdir() if p.name != outputs.STARTS_FILE)
    assert (out / "metrics.csv").read_text().splitlines() == ["step,reward_mean", "0,0.5"]
    assert oct((out / "config.yaml").stat().st_mode & 0o777) == oct(0o644 & ~files._UMASK)


def test_the_model_skeleton_is_read_once_per_process_until_its_configs_change(tmp_path):
    """A Tune trial actor serves many trials (reuse_actors): each checks its config against the
    model's skeleton, read once; a changed config file is read again."""
    import os
    import shutil

    from rayreward import budget, models

    cfg = config.from_dict({})
    first = budget.skeleton(cfg.model)
    assert budget.skeleton(cfg.model) is first
    folder = tmp_path / "model"
    shutil.copytree(models.resolve_source(cfg.model), folder)
    local = config.from_dict({}, [f"model.name={folder}"]).model
    mine = budget.skeleton(local)
    assert mine is not first and budget.skeleton(local) is mine
    index = folder / "unet" / "config.json"
    st = index.stat()
    os.utime(index, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert budget.skeleton(local) is not mine
