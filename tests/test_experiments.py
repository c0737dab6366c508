"""Every file in experiments/ loads and validates, and runs a 2-step smoke run on the tiny models.

Training configs run as they are with the tiny-model overrides; sweep files run the training
config of their first trial. Model rewards get tiny weights of their real classes (the same
checkpoints the parity tests build), since nothing is downloaded here.
"""

import json

import pytest
import torch
import yaml
from helpers import ROOT, TINY_HPS

from rayreward import config, train
from rayreward import tune as rtune
from rayreward.rewards.clip import AestheticMLP
from rayreward.rewards.composite import component_names

FILES = sorted(p.relative_to(ROOT / "experiments").as_posix() for p in (ROOT / "experiments").rglob("*.yaml"))
CAPTION = "a large red circle in the middle, on a white background"
SMOKE = ["train.steps=2", "train.batch_size=1", "train.checkpoint_every=1", "sampling.num_steps=4",
         "method.k=1", "method.early_stop_m=2", "method.refl_window=[1,2]", "method.alignprop_range=[1,2]",
         "model.resolution=32", "train.num_workers=1", "train.use_gpu=false", "train.mixed_precision=auto",
         "reward_server.mode=local", "grid.seeds=[0]", "grid.prompts=[a cat]"]


def is_sweep(path) -> bool:
    return "search" in (yaml.safe_load(path.read_text()) or {})


@pytest.fixture(scope="module")
def tiny_reward_args(tmp_path_factory):
    """Reward name -> args that load tiny weights of the real classes."""
    from rayreward.rewards.packages import require

    d = tmp_path_factory.mktemp("rewards")
    oc = require("hpsv2.src.open_clip", "hpsv21")
    (d / "rr-tiny-hps.json").write_text(json.dumps(TINY_HPS))
    oc.add_model_config(d / "rr-tiny-hps.json")
    torch.manual_seed(0)
    torch.save({"state_dict": oc.create_model("rr-tiny-hps", pretrained=None, output_dict=True).state_dict()},
               d / "hps.pt")
    torch.save(AestheticMLP(16).state_dict(), d / "head.pth")
    hps = {"checkpoint": str(d / "hps.pt"), "arch": str(d / "rr-tiny-hps.json"), "dtype": "float32"}
    return {"hpsv2": hps, "hpsv21": hps, "pickscore": {"model": "tiny", "processor": "tiny"},
            "clipscore": {"model": "tiny"}, "aesthetic": {"model": "tiny", "head": str(d / "head.pth")}}


def tiny(data: dict, reward_args: dict, imagereward_dir) -> dict:
    """A config dict with the tiny model of its flavour and tiny reward weights."""
    data = json.loads(json.dumps(data))
    name = data["model"]["name"]
    last = name.split("/")[-1].lower()
    data["model"]["name"] = ("tiny-flux2" if "flux.2" in last else "tiny-flux" if "flux" in last else "tiny-sd3" if "3" in last else
                             "tiny-sdxl" if "xl" in last else "tiny")
    data["model"]["variant"] = None
    for r in data["rewards"]:
        if r["name"] == "imagereward":
            r["args"] = {"checkpoint": str(imagereward_dir)}
        elif r["name"] in reward_args:
            r["args"] = dict(reward_args[r["name"]])
    return data


@pytest.mark.parametrize("name", FILES)
def test_every_experiment_loads_and_runs_two_steps(name, tiny_reward_args, imagereward_files, tmp_path):
    path = ROOT / "experiments" / name
    if is_sweep(path):
        sweep = rtune.load_sweep(path)  # validates the base and every searched value
        first = rtune._extremes(sweep)[0]
        data = rtune.trial_config(sweep.base, first, str(tmp_path), "smoke").to_dict()
        assert sweep.search and sweep.metric
    else:
        data = config.load(path).to_dict()
    smoke = SMOKE
    if any(r["name"] == "shapes_alignment" for r in data["rewards"]):  # its judge reads the world's captions only
        smoke = [x for x in SMOKE if not x.startswith("grid.prompts=")] + [f"grid.prompts=['{CAPTION}']"]
    cfg = config.from_dict(tiny(data, tiny_reward_args, imagereward_files), smoke + [f"output_dir={tmp_path}"])
    row = train.run_training(cfg)
    assert row["step"] == 1 and (tmp_path / "lora").is_dir()
    # every component of the composite reward is logged, under its name, and nothing else
    assert [k for k in row if k.startswith("reward/")] == [f"reward/{n}" for n in component_names(cfg.rewards)]


def test_the_paper_experiments_are_all_there():
    names = set(FILES)
    for method in ("drtune", "draft", "draft1", "draft_k", "draft_lv", "refl", "alignprop"):
        assert f"sd15/{method}.yaml" in names
    assert {"sdxl_hpsv21.yaml", "sd15/main_table.yaml", "sd15/sweep_k_spacing.yaml",
            "sd15/reward_ablation.yaml"} <= names
    methods = {config.load(ROOT / "experiments/sd15" / f).method.name for f in
               ("drtune.yaml", "draft.yaml", "draft1.yaml", "draft_k.yaml", "draft_lv.yaml", "refl.yaml", "alignprop.yaml")}
    assert methods == set(config.METHODS)


def test_builtin_prompt_sets_and_a_missing_prompt_file(tmp_path):
    assert {"animals", "styles", "symmetry"} <= set(config.builtin_prompt_sets())
    cfg = config.from_dict({"prompt_file": "builtin:symmetry"})
    assert len(cfg.training_prompts()) == 12
    with pytest.raises(config.ConfigError, match=r"prompt_file: 'builtin:nope' does not exist.*builtin:animals"):
        config.from_dict({"prompt_file": "builtin:nope"})
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(config.ConfigError, match="holds no prompt"):
        config.from_dict({"prompt_file": str(tmp_path / "empty.txt")})
