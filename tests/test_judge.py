"""The shapes world's judge and its alignment reward."""

import subprocess
import sys

import pytest
import torch

from rayreward.shapes import judge, pretrain
from rayreward.shapes import world as shapes
from rayreward.rewards import build_reward


def test_a_caption_parses_back_into_its_scene():
    for seed in range(3000):
        s = shapes.scene(seed)
        back = shapes.parse(s.caption)
        assert back.caption == s.caption and back.background == s.background
        assert [(a.kind, a.colour, a.place) for a in back.shapes] == [(a.kind, a.colour, a.place) for a in s.shapes]
    unplaced = shapes.parse("a purple star, on a gray background")
    assert unplaced.shapes[0].place == "anywhere" and not unplaced.shapes[0].size_said
    for text in ["a photo of a cat", "a red dog in the centre, on a black background",
                 "a red star and a blue circle on the right, on a black background",  # only a lone shape goes unplaced
                 "a small red star and a blue circle, on a black background",
                 "a large red star in the centre, on a pink background", "a red star in the centre, on a black background"]:
        with pytest.raises(ValueError, match="not a caption of the shapes world"):
            shapes.parse(text)


def test_labels_put_each_shape_in_its_column():
    one = shapes.parse("a large red star in the centre, on a striped background")
    assert judge.labels(one) == [0, judge.KIND_CLASSES.index("star"), 0, 0, judge.COLOUR_CLASSES.index("red"), 0,
                                 judge.BACKGROUND_CLASSES.index("striped")]
    two = shapes.parse("a blue square on the left and a green circle on the right, on a white background")
    assert judge.labels(two)[:3] == [judge.KIND_CLASSES.index("square"), 0, judge.KIND_CLASSES.index("circle")]


def test_an_unplaced_caption_is_read_in_whichever_column_holds_the_shape():
    """Labels follow where an unplaced shape stands (thirds of the side); the caption's readings
    are its three columns, and the alignment sums their probabilities."""
    from dataclasses import replace

    s = shapes.parse("a large red star, on a striped background")
    at = lambda x: replace(s, shapes=(replace(s.shapes[0], dx=x - 0.5),))  # noqa: E731
    assert [judge.slot(at(x), at(x).shapes[0]) for x in (0.3, 0.5, 0.7)] == [0, 1, 2]
    r = judge.readings(s.caption)
    assert len(r) == 3 and r[0] == judge.labels(at(0.3)) and r[2] == judge.labels(at(0.7))
    assert judge.readings("a large red star on the left, on a striped background") == [judge.labels(at(0.3))]
    # a judge certain of the left column: the unplaced caption scores as high as the placed one
    torch.manual_seed(0)
    j = judge.Judge()
    x = torch.rand(1, 3, 64, 64)
    left = judge.alignment(j, x, ["a large red star on the left, on a striped background"])
    lp, _ = judge.log_probs(j, x, [s.caption])
    joint = lp.sum(dim=2)[0]
    assert torch.allclose(judge.alignment(j, x, [s.caption]), torch.logsumexp(joint, 0)[None] / 7)
    assert torch.allclose(joint[0] / 7, left) and judge.alignment(j, x, [s.caption]) >= left


def test_the_alignment_is_differentiable_and_names_a_prompt_it_cannot_read():
    torch.manual_seed(0)
    j = judge.Judge()
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    caps = shapes.prompts(2)
    a = judge.alignment(j, images, caps)
    assert a.shape == (2,) and (a <= 0).all()
    a.sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="a photo of a cat"):
        judge.alignment(j, images, [caps[0], "a photo of a cat"])
    # any resolution is read at the judge's 64 px
    assert judge.alignment(j, torch.rand(1, 3, 96, 96), caps[:1]).shape == (1,)


def test_training_lowers_the_loss_and_a_saved_judge_loads_the_same(tmp_path):
    j, info = judge.train(steps=40, batch_size=16, lr=3e-3)
    assert info["loss_end"] < info["loss_start"]
    folder = judge.save(j, info, tmp_path / "j")
    back = judge.load(folder)
    x = torch.rand(3, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(j(x), back(x)))
    with pytest.raises(FileNotFoundError, match="no judge at"):
        judge.load(tmp_path / "nothing")


def test_the_builtin_judge_reads_held_out_drawings():
    """The shipped judge reads what the held-out captions say from their drawings; the reward
    scores a picture higher against its own caption than against another's."""
    j = judge.load()
    scenes = [shapes.scene(shapes.HELD_OUT + i) for i in range(64)]  # never trained on
    x = (pretrain.images(scenes) + 1) / 2
    caps = [s.caption for s in scenes]
    labels_read, all_read = judge.agreement(j, x, caps)
    assert labels_read.mean() > 0.97 and all_read.mean() > 0.85
    unplaced = [c for c in caps if shapes.parse(c).shapes[0].place == "anywhere"]
    assert len(unplaced) >= 8  # among them, read wherever the shape stands
    reward = build_reward("shapes_alignment", device="cpu")
    own = reward(x[:16], caps[:16])
    other = reward(x[:16], caps[16:32])
    assert (own > other).float().mean() >= 0.75


def test_pretrain_cli_trains_a_judge_and_refuses_bad_settings(tmp_path):
    def cli(*a):
        return subprocess.run([sys.executable, "-m", "rayreward.cli", "pretrain", *a], capture_output=True, text=True)

    r = cli("--part", "judge", "--out", str(tmp_path / "j"), "--judge-steps", "0")
    assert r.returncode == 2 and "--judge-steps: 0 is not allowed; need an integer >= 1" in r.stderr
    r = cli("--part", "judge", "--out", str(tmp_path / "j"), "--judge-steps", "3", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    assert judge.load(tmp_path / "j").width == judge.Judge().width
