"""Config loading, overrides and validation: each bad value gets a message with field, value, allowed."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayreward import config
from rayreward.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_every_experiment_file_validate():
    config.from_dict({})
    files = sorted((ROOT / "experiments").rglob("*.yaml"))
    assert files
    for f in files:  # training configs; sweep files (a `search`) are loaded in test_experiments/test_tune
        if "search" not in (yaml.safe_load(f.read_text()) or {}):
            config.load(f)


def test_set_overrides_parse_yaml_values_and_index_lists():
    cfg = config.load(ROOT / "experiments/tiny.yaml",
                      ["method.k=3", "sampling.guidance_scale=1", "rewards.0.weight=0.5", "lora.target_modules=[to_q]"])
    assert cfg.method.k == 3 and cfg.sampling.guidance_scale == 1.0 and isinstance(cfg.sampling.guidance_scale, float)
    assert cfg.rewards[0].weight == 0.5 and cfg.lora.target_modules == ["to_q"]
    cfg = config.from_dict({"optim": {"eps": "1e-6"}}, ["optim.lr=1e-4"])  # YAML reads 1e-4 as a string
    assert cfg.optim.lr == 1e-4 and cfg.optim.eps == 1e-6
    cfg = config.from_dict({}, ["rewards.0.weight=2"])  # indexes the default list
    assert cfg.rewards[0].name == "symmetry" and cfg.rewards[0].weight == 2.0


@pytest.mark.parametrize("overrides,needle", [
    (["method.k=11"], "method.k: 11 is larger than sampling.num_steps (10)"),
    (["method.k=0"], "method.k: 0 is not allowed"),
    (["method.name=dpo"], "method.name: 'dpo' is unknown; allowed: drtune, draft, draft_k, draft_lv, refl, alignprop"),
    (["rewards=[{name: hpsv9}]"], "rewards[0].name: 'hpsv9' is unknown; allowed: aesthetic, brightness, centring, clipscore, contrast, hpsv2, hpsv21, imagereward, pickscore"),
    (["lora.rank=-4"], "lora.rank: -4 is not allowed"),
    (["optim.lr=-0.001"], "optim.lr: -0.001 is not allowed"),
    (["sampling.guidance_scale=-1"], "sampling.guidance_scale: -1.0 is negative"),
    (["model.name=/no/such/model/folder"], "model.name: '/no/such/model/folder' is neither a local folder"),
    (["method.early_stop_m=11"], "method.early_stop_m: 11 is outside [1, sampling.num_steps=10]"),
    (["method.name=refl", "method.refl_window=[3, 12]"], "method.refl_window: [3, 12] is not allowed"),
    (["method.name=alignprop", "method.alignprop_range=[0, 4]"], "method.alignprop_range: [0, 4] is not allowed"),
    (["method.name=draft_lv", "method.lv_copies=0"], "method.lv_copies: 0 is not allowed"),
    (["train.steps=0"], "train.steps: 0 is not allowed"),
    (["train.mixed_precision=fp8"], "train.mixed_precision: 'fp8' is unknown; allowed: auto, no, bf16, fp16"),
    (["loss.kind=square"], "loss.kind: 'square' is unknown"),
    (["model.resolution=30"], "model.resolution: 30 is not allowed"),
    (["method.kk=2"], "method.kk: unknown key; allowed: name, k, early_stop_m"),
    (["method.k=two"], "method.k: expected an integer, got 'two'"),
    (["rewards.0.weight=heavy"], "rewards[0].weight: expected a number, got 'heavy'"),
    (["prompts=[]"], "prompts: empty"),
    (["optim.eps=0"], "optim.eps: 0.0 is not allowed; need > 0"),
    (["train.max_failures=-2"], "train.max_failures: -2 is not allowed"),
    (["train.max_unet_calls=-1"], "train.max_unet_calls: -1 is not allowed; need an integer >= 0"),
    (["train.cpus_per_worker=0"], "train.cpus_per_worker: 0.0 is not allowed; need a number > 0"),
    (["reward_server.num_cpus=-1"], "reward_server.num_cpus: -1.0 is negative"),
    (["reward_server.max_restarts=-5"], "reward_server.max_restarts: -5 is not allowed"),
    (["prompt_file=/no/such/prompts.txt"], "prompt_file: '/no/such/prompts.txt' does not exist"),
    (["train.resume=always"], "train.resume: 'always' is unknown; allowed: auto, force"),
    (["train.start_timeout_s=0"], "train.start_timeout_s: 0.0 is not allowed; need seconds > 0"),
])
def test_bad_values_are_named_with_value_and_allowed(overrides, needle):
    with pytest.raises(ConfigError) as e:
        config.from_dict({}, overrides)
    assert needle in str(e.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        config.from_dict({}, ["lora.rank=0", "optim.lr=0", "method.k=99"])
    assert len(e.value.problems) == 3


def test_bad_override_syntax_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        config.from_dict({}, ["method.k"])
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        config.load(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("method: {k: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(tmp_path / "broken.yaml")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no prompt"):
        config.from_dict({"prompt_file": str(tmp_path / "empty.txt")})


def test_prompt_file_replaces_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a fox\n\na boat\n")
    cfg = config.from_dict({"prompt_file": str(tmp_path / "p.txt")})
    assert cfg.training_prompts() == ["a fox", "a boat"]


def test_cli_rejects_bad_config_with_exit_2_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"method": {"name": "drtune", "k": 50}, "lora": {"rank": -1}}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rayreward.cli", "train", "--config", str(bad),
                           "--set", f"output_dir={out}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "method.k: 50 is larger than sampling.num_steps" in proc.stderr
    assert "lora.rank: -1 is not allowed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # rejected before anything was created


def test_sample_cli_rejects_a_scale_that_is_not_a_number(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rayreward.cli", "sample", "--lora", f"{tmp_path}:strong"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "the scale after ':' must be a number" in proc.stderr


@pytest.mark.parametrize("override", ["optim.lr=.inf", "optim.lr=.nan", "sampling.guidance_scale=-.inf",
                                      "loss.margin=.nan", "rewards.0.weight=.inf", "reward_server.num_gpus=.inf",
                                      "reward_server.resources={reward_host: .inf}"])
def test_non_finite_numbers_are_refused(override):
    key = re.sub(r"\.(\d+)", r"[\1]", override.split("=")[0])  # rewards.0.weight -> rewards[0].weight
    with pytest.raises(config.ConfigError, match=re.escape(key + ":")) as e:
        config.from_dict({}, [override])
    assert "finite" in str(e.value) or "not allowed" in str(e.value)


def test_config_error_survives_pickling_across_processes():
    import pickle

    err = config.ConfigError(["method.k: 50 is larger than sampling.num_steps (10)", "lora.rank: -1"])
    back = pickle.loads(pickle.dumps(err))
    assert back.problems == err.problems and str(back) == str(err)


def test_compile_mode_is_checked():
    assert config.from_dict({}, ["train.compile=reduce-overhead"]).train.compile == "reduce-overhead"
    # YAML 1.1 reads a bare off / on as a boolean
    assert [config.from_dict({}, [f"train.compile={v}"]).train.compile for v in ("off", "on")] == ["off", "default"]
    with pytest.raises(config.ConfigError, match="train.compile: 'fast' is unknown; allowed: off, default, reduce-overhead, "
                                                 "max-autotune"):
        config.from_dict({}, ["train.compile=fast"])


def test_shapes_alignment_refuses_prompts_its_judge_cannot_read():
    with pytest.raises(config.ConfigError) as e:
        config.from_dict({"rewards": [{"name": "shapes_alignment"}], "prompt_file": "builtin:shapes",
                          "grid": {"prompts": ["a cat", "a large red circle in the middle, on a white background"]}})
    assert e.value.problems == [
        "grid.prompts[0]: 'a cat' is not a caption of the shapes world, and reward shapes_alignment reads only "
        "those; use captions such as 'a large red circle in the middle, on a white background' (prompt_file: "
        "builtin:shapes)"]
    with pytest.raises(config.ConfigError) as e:
        config.from_dict({"rewards": [{"name": "shapes_alignment"}], "prompts": ["a cat", "a dog"] * 3})
    assert [x.split(" is not")[0] for x in e.value.problems] == [
        "prompts[0]: 'a cat'", "prompts[1]: 'a dog'", "prompts[2]: 'a cat'", "... and 3 more such prompts"]
    # rendering only (sample, eval): the training prompts are not the judge's business
    config.from_dict({"rewards": [{"name": "shapes_alignment"}], "prompts": ["a cat"]}, training=False)
