"""Low-level rewards against hand-computed values; composite; registry errors; user rewards."""

import pytest
import torch

from rayreward import rewards
from rayreward.rewards.composite import build_composite
from rayreward.config import RewardSpec


def test_symmetry_by_hand():
    img = torch.zeros(2, 3, 2, 2)
    img[0, :, :, 0] = 1.0  # left column white: |img - flip| = 1 everywhere
    img[1] = 0.5  # uniform: symmetric
    r = rewards.build_reward("symmetry")(img, ["", ""])
    assert torch.allclose(r, torch.tensor([-1.0, 0.0]))


def test_brightness_contrast_sharpness_by_hand():
    img = torch.zeros(1, 3, 3, 3)
    img[0, :, 1, 1] = 1.0  # one white pixel
    assert torch.allclose(rewards.build_reward("brightness")(img, [""]), torch.tensor([1 / 9]))
    assert torch.allclose(rewards.build_reward("brightness", target=0.5)(img, [""]), torch.tensor([-(0.5 - 1 / 9)]))
    assert torch.allclose(rewards.build_reward("contrast")(img, [""]), torch.tensor([img[0, 0].flatten().std()]))
    # Laplacian: -4 at the centre, +1 at its 4 neighbours -> (4 + 4) / 9
    assert torch.allclose(rewards.build_reward("sharpness")(img, [""]), torch.tensor([8 / 9]))


def test_rewards_are_differentiable_in_the_images():
    img = torch.rand(2, 3, 8, 8, requires_grad=True)
    for name in ["symmetry", "brightness", "contrast", "sharpness"]:
        (g,) = torch.autograd.grad(rewards.build_reward(name)(img, ["a", "b"]).sum(), img)
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_composite_is_a_weighted_sum_with_components():
    comp = build_composite([RewardSpec("symmetry", 2.0), RewardSpec("brightness", -1.0),
                                    RewardSpec("brightness", 0.5)])
    img = torch.rand(3, 3, 4, 4)
    total, parts = comp(img, ["a"] * 3)
    assert list(parts) == ["symmetry", "brightness", "brightness_2"]
    assert torch.allclose(total, 2 * parts["symmetry"] - parts["brightness"] + 0.5 * parts["brightness_2"])


def test_unknown_reward_lists_the_known_ones():
    with pytest.raises(KeyError, match="allowed: aesthetic, brightness, clipscore, contrast, hpsv2, hpsv21, imagereward, pickscore, shapes_alignment, sharpness, symmetry"):
        rewards.build_reward("hpsv9")


def test_user_reward_from_module_path():
    r = rewards.build_reward("helpers:mean_red", scale=2.0)
    img = torch.zeros(1, 3, 2, 2)
    img[:, 0] = 0.25
    assert torch.allclose(r(img, [""]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="cannot import"):
        rewards.build_reward("helpers:no_such_fn")
    with pytest.raises(ValueError, match="bad args"):
        rewards.build_reward("symmetry", strength=3)


def _write_images(folder, n=3):
    import numpy as np
    from PIL import Image

    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((g.random((16, 16, 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")


def test_score_cli_writes_the_same_scores_as_the_reward(tmp_path):
    import subprocess
    import sys

    import numpy as np
    import pandas as pd
    from PIL import Image

    _write_images(tmp_path / "imgs")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\na car\n")
    proc = subprocess.run([sys.executable, "-m", "rayreward.cli", "score", "--rewards", "symmetry,brightness",
                           "--arg", "brightness.target=0.5", "--images", str(tmp_path / "imgs"),
                           "--prompts", str(tmp_path / "prompts.txt")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    df = pd.read_csv(tmp_path / "imgs/scores.csv")
    assert list(df.columns) == ["image", "prompt", "symmetry", "brightness"] and list(df.prompt) == ["a cat", "a dog", "a car"]
    img = torch.from_numpy(np.asarray(Image.open(tmp_path / "imgs/img1.png"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    assert df.symmetry[1] == pytest.approx(float(rewards.build_reward("symmetry")(img, [""])[0]), abs=1e-6)
    assert df.brightness[1] == pytest.approx(float(rewards.build_reward("brightness", target=0.5)(img, [""])[0]), abs=1e-6)


@pytest.mark.parametrize("argv,needle", [
    (["--rewards", "hpsv9"], "rewards[0].name: 'hpsv9' is unknown"),
    (["--rewards", "symmetry", "--arg", "nope.x=1"], "expected REWARD.KEY=VALUE"),
    (["--rewards", "symmetry", "--prompts", "PROMPTS2"], "has 2 prompts for 3 images"),
    (["--rewards", "symmetry", "--images", "EMPTY"], "holds no image"),
])
def test_score_cli_bad_inputs(tmp_path, argv, needle):
    import subprocess
    import sys

    _write_images(tmp_path / "imgs")
    (tmp_path / "empty").mkdir()
    (tmp_path / "p2.txt").write_text("a\nb\n")
    argv = [a.replace("PROMPTS2", str(tmp_path / "p2.txt")).replace("EMPTY", str(tmp_path / "empty")) for a in argv]
    if "--images" not in argv:
        argv += ["--images", str(tmp_path / "imgs")]
    proc = subprocess.run([sys.executable, "-m", "rayreward.cli", "score", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_reward_of_the_wrong_shape_is_a_clear_error():
    from rayreward.rewards.composite import CompositeReward

    one_number = CompositeReward(["total"], [1.0], [lambda images, prompts: images.mean()])
    with pytest.raises(ValueError, match=r"reward total returned shape \(\) for 2 images; a reward returns one value"):
        one_number(torch.rand(2, 3, 8, 8), ["a", "b"])
