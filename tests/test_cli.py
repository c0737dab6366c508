"""One grammar across the commands: --lora [NAME=]PATH[:SCALE], --seeds 0 1 (or 0,1), --device,
--prompts SOURCE (the reader training's prompt_file uses too). A test per subcommand."""

import pytest
import torch
from PIL import Image

from rayreward import cli, config, lora_io, models

from helpers import ROOT

PROMPTS_CSV = "prompt,kind\na cat,animal\na dog,animal\n"


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A LoRA that changes the images visibly (every weight moved by 0.3)."""
    out = tmp_path_factory.mktemp("lora")
    c = models.load_components(config.ModelConfig(name="tiny"))
    with torch.no_grad():
        for p in models.add_lora(c.unet, config.LoraConfig()):
            p.add_(0.3)
    lora_io.save_lora(c.unet, out / "lora", c.flavour)
    return out / "lora"


def test_grammar_parses_the_same_in_every_command(tmp_path):
    parser = cli.build_parser()
    for command, extra in [("sample", []), ("eval", ["--rewards", "symmetry", "--out", "o"])]:
        a = parser.parse_args([command, "--lora", "runs/a/lora", "--lora", "mine=runs/b/lora:0.5", "--seeds", "0,1",
                               "2", "--device", "cpu", "--prompts", "builtin:animals", *extra])
        assert [(x.name, x.path, x.scale) for x in a.lora] == [("", "runs/a/lora", 1.0), ("mine", "runs/b/lora", 0.5)]
        assert a.seeds == [0, 1, 2] and a.device == "cpu" and a.prompts == "builtin:animals"
    a = parser.parse_args(["score", "--rewards", "symmetry", "--images", ".", "--prompts", "p.csv"])
    assert a.device == "auto" and a.prompts == "p.csv"


def test_train_reads_its_prompt_file_with_the_shared_reader(tmp_path):
    (tmp_path / "p.csv").write_text(PROMPTS_CSV)
    args = cli.build_parser().parse_args(["train", "--config", str(ROOT / "experiments/tiny.yaml"),
                                          "--set", f"prompt_file={tmp_path / 'p.csv'}"])
    assert config.load(args.config, args.set).training_prompts() == ["a cat", "a dog"]
    with pytest.raises(config.ConfigError, match=r"prompt_file: '.*nope.csv' does not exist; give a .txt"):
        config.load(args.config, [f"prompt_file={tmp_path / 'nope.csv'}"])


def test_sample_takes_the_shared_grammar(lora, tmp_path):
    (tmp_path / "p.csv").write_text(PROMPTS_CSV)
    common = ["sample", "--model", "tiny", "--lora", f"mine={lora}:0.5", "--prompts", str(tmp_path / "p.csv"),
              "--device", "cpu", "--set", "sampling.num_steps=2"]  # 2 steps: below drtune's early_stop_m (4), no matter
    assert cli.main(common + ["--seeds", "0,1", "--out", str(tmp_path / "a.png"), "--save-images", str(tmp_path / "a")]) == 0
    assert cli.main(common + ["--seeds", "0", "1", "--out", str(tmp_path / "b.png"), "--save-images", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a/prompts.txt").read_text().splitlines() == ["a cat", "a cat", "a dog", "a dog"]
    for name in ("p000_s0.png", "p000_s1.png", "p001_s0.png", "p001_s1.png"):  # both seed forms: the same images
        assert Image.open(tmp_path / "a" / name).tobytes() == Image.open(tmp_path / "b" / name).tobytes()
    assert cli.main(["sample", "--model", "tiny", "--prompts", str(tmp_path / "p.csv"), "--seeds", "0",
                     "--set", "sampling.num_steps=2", "--out", str(tmp_path / "base.png"),
                     "--save-images", str(tmp_path / "base")]) == 0
    assert Image.open(tmp_path / "base/p000_s0.png").tobytes() != Image.open(tmp_path / "a/p000_s0.png").tobytes()


def test_score_takes_the_shared_grammar(lora, tmp_path):
    assert cli.main(["sample", "--model", "tiny", "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0",
                     "--set", "sampling.num_steps=2", "--out", str(tmp_path / "g.png"),
                     "--save-images", str(tmp_path / "imgs")]) == 0
    (tmp_path / "p.csv").write_text(PROMPTS_CSV)  # one prompt per image, in the images' sorted order
    assert cli.main(["score", "--rewards", "symmetry", "--images", str(tmp_path / "imgs"), "--prompts",
                     str(tmp_path / "p.csv"), "--device", "auto", "--out", str(tmp_path / "s.csv")]) == 0
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "image,prompt,symmetry" and [ln.split(",")[1] for ln in lines[1:]] == ["a cat", "a dog"]


def test_eval_takes_the_shared_grammar(lora, tmp_path):
    (tmp_path / "p.csv").write_text(PROMPTS_CSV)
    rc = cli.main(["eval", "--set", "sampling.num_steps=2", "--lora", f"mine={lora}:0.5", "--lora", str(lora),
                   "--prompts", str(tmp_path / "p.csv"), "--seeds", "0", "5", "--device", "cpu", "--rewards", "symmetry",
                   "--out", str(tmp_path / "eval")])
    assert rc == 0
    import pandas as pd

    per_image = pd.read_csv(tmp_path / "eval/per_image.csv")
    # the unnamed LoRA is named after its run folder (RUN/lora)
    assert list(dict.fromkeys(per_image.variant)) == ["base", "mine", lora.parent.name]
    assert sorted(set(per_image.seed)) == [0, 5] and list(dict.fromkeys(per_image.prompt)) == ["a cat", "a dog"]


def test_train_help_lists_the_registries(capsys):
    from rayreward import methods, rewards

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert all(f"  {name} " in text for name in methods.METHODS) and all(name in text for name in rewards.REGISTRY)
