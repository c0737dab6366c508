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
    with pytest.raises(KeyError, match="allowed: aesthetic, brightness, centring, clipscore, contrast, hpsv2, hpsv21, imagereward, pickscore, shapes_alignment, sharpness, symmetry"):
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


# ---------------------------------------------------------------------------------------------
# centring: a reward only a layout change can raise.


def _drawn(*shapes, background="white", side=64):
    """Images of shapes-world scenes: each argument a (kind, colour, size, place) tuple list."""
    import numpy as np

    from rayreward.shapes import world

    scene = world.Scene(tuple(world.Shape(*s) for s in shapes), background)
    return torch.from_numpy(np.asarray(world.draw(scene, side), dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.mark.parametrize("background", ["white", "black", "gray"])
def test_centring_ignores_fading_shrinking_and_recolouring_and_pays_for_moving(background):
    from rayreward.rewards.lowlevel import centring

    r = centring()
    left = _drawn(("circle", "red", "large", "left"), background=background)
    base = float(r(left, [""]))
    bg = left[..., :1, :1]
    faded = bg + 0.5 * (left - bg)  # half way to the background
    variants = {"faded": faded, "shrunk": _drawn(("circle", "red", "small", "left"), background=background),
                "recoloured": _drawn(("circle", "blue", "large", "left"), background=background),
                "another kind": _drawn(("square", "yellow", "large", "left"), background=background)}
    for name, img in variants.items():
        assert abs(float(r(img, [""])) - base) < 0.01, (name, float(r(img, [""])), base)
    assert base == pytest.approx(-0.25, abs=0.02)  # a quarter of the side from the centre
    middle = float(r(_drawn(("circle", "red", "large", "middle"), background=background), [""]))
    assert middle > base + 0.2 and middle > -0.02  # moving it is what pays
    # the symmetry reward, the colour-level control, pays for fading the off-centre shape
    from rayreward.rewards.lowlevel import symmetry

    assert float(symmetry()(faded, [""])) > float(symmetry()(left, [""])) + 0.01


def test_centring_of_an_empty_picture_is_the_worst_and_its_gradient_moves_content():
    from rayreward.rewards.lowlevel import centring

    r = centring()
    blank = torch.full((1, 3, 32, 32), 0.9)
    assert float(r(blank, [""])) < -0.7  # fading everything away does not pay
    img = _drawn(("square", "green", "large", "left")).requires_grad_(True)
    r(img, [""]).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="threshold=1.5 is not allowed"):
        centring(threshold=1.5)


def test_centring_is_a_registered_reward_that_score_reads(tmp_path, capsys):
    from PIL import Image

    from rayreward import cli

    for i, place in enumerate(["left", "middle"]):
        arr = (_drawn(("star", "orange", "large", place))[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
    assert cli.main(["score", "--images", str(tmp_path), "--rewards", "centring,symmetry"]) == 0
    import pandas as pd

    df = pd.read_csv(tmp_path / "scores.csv")
    assert df.centring[1] > df.centring[0] + 0.2
