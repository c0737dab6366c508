"""`rayreward eval`: base vs a trained LoRA on tiny models, two rewards scored in reward actors; the
table's numbers are checked by scoring the saved images again; bad inputs."""

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import quick_cfg
from PIL import Image

from rayreward import cli, config, evaluate, train
from rayreward.rewards import build_reward


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.run_training(quick_cfg(out, "train.steps=3"))
    return out / "lora"


def test_eval_table_matches_rescoring_the_saved_images(ray_session, trained_lora, tmp_path):
    (tmp_path / "prompts.csv").write_text("prompt,category\na cat,animal\na red car,object\na tree,plant\n")
    out = tmp_path / "eval"
    rc = cli.main(["eval", "--config", "experiments/quickstart.yaml", "--set", "sampling.num_steps=4",
                   "--lora", f"sym={trained_lora}", "--lora", f"half={trained_lora}:0.5",
                   "--rewards", "symmetry,pickscore", "--arg", "pickscore.model=tiny", "--arg", "pickscore.processor=tiny",
                   "--prompts", str(tmp_path / "prompts.csv"), "--seeds", "0,3", "--out", str(out)])
    assert rc == 0
    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == 3 * 3 * 2 and set(per_image.variant) == {"base", "sym", "half"}
    # every score is the reward of the saved PNG (the eval scores 8-bit images, as saved)
    sym, pick = build_reward("symmetry"), build_reward("pickscore", model="tiny", processor="tiny")
    imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(out / f), dtype=np.float32) / 255).permute(2, 0, 1)
                        for f in per_image.image])
    with torch.no_grad():
        assert np.allclose(per_image.symmetry, sym(imgs, list(per_image.prompt)).numpy(), atol=1e-6)
        assert np.allclose(per_image.pickscore, pick(imgs, list(per_image.prompt)).numpy(), atol=1e-4)
    # the summary: mean, std and win rate against base on the same (prompt, seed)
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 3 * 2
    for _, row in summary.iterrows():
        d = per_image[per_image.variant == row.variant].sort_values(["prompt_idx", "seed"])
        b = per_image[per_image.variant == "base"].sort_values(["prompt_idx", "seed"])
        assert row["mean"] == pytest.approx(d[row.reward].mean(), abs=1e-9)
        assert row["std"] == pytest.approx(d[row.reward].std(), abs=1e-9)
        wins = (d[row.reward].values > b[row.reward].values) + 0.5 * (d[row.reward].values == b[row.reward].values)
        assert row.win_rate_vs_base == pytest.approx(wins.mean())
    assert summary.set_index(["variant", "reward"]).loc[("base", "symmetry"), "win_rate_vs_base"] == 0.5
    per_prompt = pd.read_csv(out / "per_prompt.csv")
    assert len(per_prompt) == 3 * 3
    for s in (0, 3):
        assert Image.open(out / f"grid_seed{s}.png").size[0] > 3 * 32
    # the trained LoRA changed the images; at scale 0.5 it is between base and the full LoRA
    assert not per_image[per_image.variant == "sym"].symmetry.equals(per_image[per_image.variant == "base"].symmetry)


def test_eval_bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(config.ConfigError, match=r"--prompts '.*empty.txt': holds no prompt"):
        evaluate.load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(config.ConfigError, match=r"no such file.*builtin:animals"):
        evaluate.load_prompts(str(tmp_path / "nope.txt"))
    with pytest.raises(config.ConfigError, match=r"hpsv2:anime.*download_benchmark_prompts"):
        evaluate.load_prompts("hpsv2:anime")
    assert len(evaluate.load_prompts("builtin:styles")) == 12
    base = ["eval", "--rewards", "symmetry", "--out", str(tmp_path / "o")]
    with pytest.raises(config.ConfigError, match=r"--lora '.*missing': LoRA '.*missing': no such file"):
        cli.cmd_eval(cli.build_parser().parse_args(base + ["--lora", str(tmp_path / "missing")]))
    with pytest.raises(config.ConfigError, match=r"scale 'x' is not a number"):
        cli.cmd_eval(cli.build_parser().parse_args(base + ["--lora", f"{tmp_path}:x"]))
    with pytest.raises(config.ConfigError, match=r"--seeds 'a,b'"):
        cli.cmd_eval(cli.build_parser().parse_args(base + ["--seeds", "a,b"]))
    with pytest.raises(config.ConfigError, match=r"unknown"):
        cli.cmd_eval(cli.build_parser().parse_args(["eval", "--rewards", "nosuch", "--out", str(tmp_path)]))
    assert not (tmp_path / "o").exists()  # nothing written before the inputs are good


def test_report_of_runs_and_a_sweep(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train.run_training(quick_cfg(a, "name=a", "train.steps=3"))
    train.run_training(quick_cfg(b, "name=b", "train.steps=3", "method.name=draft_k", "method.k=1"))
    sweep = tmp_path / "sweep"
    (sweep / "trials").mkdir(parents=True)
    (b).rename(sweep / "trials" / "t1")  # a sweep folder expands to its trials
    assert cli.main(["report", str(a), str(sweep), "--out", str(tmp_path / "rep"), "--last", "2"]) == 0
    runs = pd.read_csv(tmp_path / "rep" / "runs.csv")
    assert list(runs.method) == ["drtune", "draft_k"] and list(runs.steps) == [3, 3]
    m = pd.read_csv(a / "metrics.csv")
    assert runs.final_reward[0] == pytest.approx(m.reward_mean.tail(2).mean())
    table = pd.read_csv(tmp_path / "rep" / "table.csv", index_col=0)
    assert table.loc["drtune", "symmetry"] == pytest.approx(runs.final_reward[0])
    assert (tmp_path / "rep" / "report.png").stat().st_size > 0
    with pytest.raises(config.ConfigError, match="not a run folder"):
        evaluate.report([tmp_path / "nothing"], tmp_path / "rep2")
