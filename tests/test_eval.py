"""`rayreward eval`: base vs a trained LoRA on tiny models, two rewards scored in-process or in reward
actors (reward_server.mode); the table's numbers are checked by scoring the saved images again;
a LoRA at scale 0.5 lands between base and scale 1; bad inputs; `rayreward report`."""

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import quick_cfg
from PIL import Image

from rayreward import cli, config, reports, train
from rayreward.rewards import RewardLoadError, build_reward


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.run_training(quick_cfg(out, "train.steps=3"))
    return out / "lora"


def load_png(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.mark.parametrize("mode", ["local", pytest.param("remote", marks=pytest.mark.slow)])
def test_eval_table_matches_rescoring_the_saved_images(mode, trained_lora, tmp_path, request):
    if mode == "remote":
        request.getfixturevalue("ray_session")  # reward actors on the session's Ray
    (tmp_path / "prompts.csv").write_text("prompt,category\na cat,animal\na red car,object\na tree,plant\n")
    out = tmp_path / "eval"
    rc = cli.main(["eval", "--config", "experiments/tiny.yaml", "--set", "sampling.num_steps=4",
                   "--set", f"reward_server.mode={mode}",
                   "--lora", f"sym={trained_lora}", "--lora", f"half={trained_lora}:0.5",
                   "--rewards", "symmetry,pickscore", "--arg", "pickscore.model=tiny", "--arg", "pickscore.processor=tiny",
                   "--prompts", str(tmp_path / "prompts.csv"), "--seeds", "0,3", "--diversity-clip", "tiny",
                   "--out", str(out)])
    assert rc == 0
    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == 3 * 3 * 2 and set(per_image.variant) == {"base", "sym", "half"}
    # every score is the reward of the saved PNG (the eval scores 8-bit images, as saved)
    sym, pick = build_reward("symmetry"), build_reward("pickscore", model="tiny", processor="tiny")
    imgs = torch.stack([load_png(out / f) for f in per_image.image])
    with torch.no_grad():
        assert np.allclose(per_image.symmetry, sym(imgs, list(per_image.prompt)).numpy(), atol=1e-6)
        assert np.allclose(per_image.pickscore, pick(imgs, list(per_image.prompt)).numpy(), atol=1e-4)
    # the summary: mean, std and win rate against base on the same (prompt, seed)
    full_summary = pd.read_csv(out / "summary.csv")
    assert len(full_summary) == 3 * 2 + 3 * 2  # two rewards and two diversity measures per variant
    summary = full_summary[~full_summary.reward.str.startswith("diversity_")]
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
    # diversity across the 2 seeds, per variant and prompt: RMS pixel difference and CLIP 1 - cos
    # of the saved images, recomputed here; the summary's mean is over prompts, its win rate the
    # share of prompts more diverse than the base's
    clip = build_reward("pickscore", model="tiny", processor="tiny").scorer
    for _, row in per_prompt.iterrows():
        files = per_image[(per_image.variant == row.variant) & (per_image.prompt_idx == row.prompt_idx)].image
        a, b = [load_png(out / f) for f in files]
        assert row.diversity_pixel == pytest.approx((a - b).pow(2).mean().sqrt().item(), rel=1e-5)
        with torch.no_grad():
            ea, eb = clip.image_embeds(torch.stack([a, b]))
        assert row.diversity_clip == pytest.approx(1 - (ea @ eb).item(), abs=1e-5)
    div = full_summary.set_index(["variant", "reward"])
    for v in ("base", "sym", "half"):
        mine, base = per_prompt[per_prompt.variant == v], per_prompt[per_prompt.variant == "base"]
        assert div.loc[(v, "diversity_pixel"), "mean"] == pytest.approx(mine.diversity_pixel.mean())
        assert div.loc[(v, "diversity_clip"), "n"] == 3
        wins = (mine.diversity_pixel.values > base.diversity_pixel.values).mean()
        assert div.loc[(v, "diversity_pixel"), "win_rate_vs_base"] == pytest.approx(
            wins + 0.5 * (mine.diversity_pixel.values == base.diversity_pixel.values).mean())
    for s in (0, 3):
        assert Image.open(out / f"grid_seed{s}.png").size[0] > 3 * 32
    # the trained LoRA changed the images; at scale 0.5 they lie between base and the full LoRA:
    # nearer each end than the ends are to each other, and at neither (measured: 0.69 and 0.45 of
    # the base-to-full distance; not exactly half, the chain is not linear in the scale)
    img = {v: torch.stack([load_png(out / f) for f in per_image[per_image.variant == v].image]) for v in ("base", "sym", "half")}
    full = (img["sym"] - img["base"]).abs().mean().item()
    to_base, to_full = (img["half"] - img["base"]).abs().mean().item(), (img["half"] - img["sym"]).abs().mean().item()
    assert full > 1e-3, full
    assert 0.15 * full < to_base < 0.85 * full and 0.15 * full < to_full < 0.85 * full, (to_base, to_full, full)


def test_eval_bad_inputs(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(config.ConfigError, match=r"--prompts: '.*empty.txt' holds no prompt"):
        config.read_prompts(str(tmp_path / "empty.txt"), "--prompts")
    with pytest.raises(config.ConfigError, match=r"--prompts: '.*nope.txt' does not exist; give .*builtin:animals"):
        config.read_prompts(str(tmp_path / "nope.txt"), "--prompts")
    with pytest.raises(config.ConfigError, match=r"hpsv2:anime.*download_benchmark_prompts"):
        config.read_prompts("hpsv2:anime", "--prompts")
    assert len(config.read_prompts("builtin:styles", "--prompts")) == 12
    base = ["eval", "--rewards", "symmetry", "--out", str(tmp_path / "o")]
    with pytest.raises(config.ConfigError, match=r"--lora '.*missing': LoRA '.*missing': no such file"):
        cli.cmd_eval(cli.build_parser().parse_args(base + ["--lora", str(tmp_path / "missing")]))
    for bad, said in [(["--lora", f"{tmp_path}:x"], "the scale after ':' must be a number, got 'x'"),
                      (["--seeds", "a,b"], "--seeds 'a,b': expected integers")]:
        with pytest.raises(SystemExit) as e:
            cli.build_parser().parse_args(base + bad)
        assert e.value.code == 2 and said in capsys.readouterr().err
    with pytest.raises(config.ConfigError, match=r"unknown"):
        cli.cmd_eval(cli.build_parser().parse_args(["eval", "--rewards", "nosuch", "--out", str(tmp_path)]))
    with pytest.raises(config.ConfigError, match=r"--device: 'cuda:7' is not available"):
        cli.cmd_eval(cli.build_parser().parse_args(base + ["--device", "cuda:7"]))
    with pytest.raises(RewardLoadError, match=r"^--diversity-clip: cannot load .*no-clip.*Set --diversity-clip to a local"):
        cli.cmd_eval(cli.build_parser().parse_args(base + ["--diversity-clip", str(tmp_path / "no-clip")]))
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
        reports.report([tmp_path / "nothing"], tmp_path / "rep2")
