"""HPSv2/v2.1 and ImageReward adapters against the packages' own `score` functions, and their gradients.

No downloads: the models are the packages' own classes with random weights, saved as checkpoints in
the published layouts ({'state_dict': ...} for HPS, a plain state dict for ImageReward.pt) and
loaded through the adapters. hpsv2 is checked on a small open_clip architecture of the same classes
(ViT-H-14 is 1B parameters); ImageReward on its real ViT-L visual encoder (the package fixes it) with
a one-layer BERT in med_config.json.
"""

import json

import pytest
import torch

from rayreward.rewards import RewardLoadError
from rayreward.rewards.packages import require
from rayreward.rewards import build_reward

from helpers import TINY_HPS, smooth_images, to_pil

@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    """A small open_clip architecture file, its model (seeded) and an HPS-layout checkpoint."""
    oc = require("hpsv2.src.open_clip", "hpsv21")
    d = tmp_path_factory.mktemp("hps")
    arch = d / "rr-tiny-hps.json"
    arch.write_text(json.dumps(TINY_HPS))
    oc.add_model_config(arch)
    torch.manual_seed(0)
    model, _, preprocess_val = oc.create_model_and_transforms("rr-tiny-hps", pretrained=None, precision="amp",
                                                              device="cpu", output_dict=True)
    ckpt = d / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return arch, ckpt, model, preprocess_val


def test_hps_matches_the_packages_score(hps_files, monkeypatch, tmp_path):
    """hpsv2.img_score.score on PIL images: its model cache holds the small model instead of the
    ViT-H-14 it would download; the checkpoint load, tokenizer and scoring are the package's."""
    from hpsv2 import img_score

    arch, ckpt, model, preprocess_val = hps_files
    monkeypatch.setattr(img_score, "model_dict", {"model": model, "preprocess_val": preprocess_val})
    monkeypatch.setattr(img_score, "root_path", str(tmp_path))
    images, prompt = smooth_images(n=3, h=47, w=40), "a watercolor fox"  # 47: the crop offset rounds
    expected = torch.tensor([float(s) for s in img_score.score(to_pil(images), prompt, cp=str(ckpt))])
    reward = build_reward("hpsv21", checkpoint=str(ckpt), arch=str(arch))
    ours = reward(images, [prompt] * 3)
    # torchvision resizes the tensor, as we do: measured difference 7.5e-8 on scores ~0.22
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    assert ours.std() > 1e-4  # the images are told apart


def test_hps_v20_and_a_folder_checkpoint(hps_files, tmp_path):
    arch, ckpt, _, _ = hps_files
    (tmp_path / "HPS_v2_compressed.pt").symlink_to(ckpt)
    a = build_reward("hpsv2", checkpoint=str(tmp_path), arch=str(arch))  # a folder holding the v2.0 file name
    b = build_reward("hpsv21", checkpoint=str(ckpt), arch=str(arch))
    x = smooth_images(n=2)
    assert torch.equal(a(x, ["a", "b"]), b(x, ["a", "b"]))
    with pytest.raises(RewardLoadError, match=r"has no HPS_v2.1_compressed.pt.*args.checkpoint"):
        build_reward("hpsv21", checkpoint=str(tmp_path), arch=str(arch))


def _fd_check(reward, x, prompts, rel=1e-4):
    x = x.double().requires_grad_(True)
    (grad,) = torch.autograd.grad(reward(x, prompts).sum(), x)
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        fd = (reward(x + eps * d, prompts) - reward(x - eps * d, prompts)).sum() / (2 * eps)
    assert float(grad.abs().sum()) > 0
    assert float(fd) == pytest.approx(float((grad * d).sum()), rel=rel, abs=1e-8)


def test_hps_gradient_matches_finite_differences(hps_files):
    arch, ckpt, _, _ = hps_files
    reward = build_reward("hpsv21", checkpoint=str(ckpt), arch=str(arch), dtype="float32")
    reward.scorer.model.double()
    reward.scorer.dtype = torch.float64
    _fd_check(reward, smooth_images(n=1, h=12, w=12, seed=3), ["a cat"])


def test_hps_bad_inputs(hps_files, tmp_path, monkeypatch):
    arch, ckpt, _, _ = hps_files
    with pytest.raises(RewardLoadError, match=r"checkpoint '.*nope.pt' does not exist.*args.checkpoint"):
        build_reward("hpsv21", checkpoint=str(tmp_path / "nope.pt"), arch=str(arch))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(RewardLoadError, match="not a readable state dict"):
        build_reward("hpsv21", checkpoint=str(tmp_path / "text.pt"), arch=str(arch))
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(RewardLoadError, match="does not fit the model"):
        build_reward("hpsv21", checkpoint=str(tmp_path / "other.pt"), arch=str(arch))
    with pytest.raises(RewardLoadError, match=r"arch 'ViT-Q-99' is unknown"):
        build_reward("hpsv21", checkpoint=str(ckpt), arch="ViT-Q-99")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RewardLoadError, match=r"cannot get HPS_v2.1_compressed.pt from the hub repo 'xswu/HPSv2'.*"
                                              r"args.checkpoint.*HF_HUB_OFFLINE"):
        build_reward("hpsv21", arch=str(arch))


def test_a_missing_reward_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ImageReward" else real(name, *a))
    with pytest.raises(RewardLoadError, match=r"needs the ImageReward package.*'.\[imagereward\]'"):
        build_reward("imagereward")


# ---------------------------------------------------------------------------------------------
# ImageReward

def test_imagereward_matches_the_packages_score(imagereward_files):
    import ImageReward as RM

    ref = RM.load(str(imagereward_files / "ImageReward.pt"), device="cpu",
                  med_config=str(imagereward_files / "med_config.json"))
    images, prompt = smooth_images(n=2, h=47, w=40, seed=5), "a red fox in the snow"
    with torch.no_grad():
        expected = torch.tensor([ref.score(prompt, im) for im in to_pil(images)])
    reward = build_reward("imagereward", checkpoint=str(imagereward_files))  # med_config found beside it
    ours = reward(images, [prompt] * 2)
    # PIL's bicubic (the package) against torch's antialiased bicubic: measured difference 5.9e-5 on
    # scores -0.20 and -0.18 (the two images differ by 0.025)
    assert torch.allclose(ours, expected, atol=5e-4), (ours - expected).abs().max()
    assert (ours[0] - ours[1]).abs() > 1e-2


def test_imagereward_gradient_matches_finite_differences(imagereward_files):
    reward = build_reward("imagereward", checkpoint=str(imagereward_files / "ImageReward.pt"),
                          med_config=str(imagereward_files / "med_config.json"))
    reward.scorer.model.double()
    reward.scorer.dtype = torch.float64
    _fd_check(reward, smooth_images(n=1, h=12, w=12, seed=6), ["a cat"], rel=1e-3)


def test_imagereward_bad_inputs(imagereward_files, tmp_path):
    torch.save({"visual.proj": torch.zeros(2)}, tmp_path / "ImageReward.pt")
    with pytest.raises(RewardLoadError, match="is not this model's checkpoint"):
        build_reward("imagereward", checkpoint=str(tmp_path / "ImageReward.pt"),
                     med_config=str(imagereward_files / "med_config.json"))
    with pytest.raises(RewardLoadError, match=r"med_config '.*nope.json' does not exist.*args.med_config"):
        build_reward("imagereward", checkpoint=str(imagereward_files), med_config=str(tmp_path / "nope.json"))
    with pytest.raises(RewardLoadError, match=r"cannot get ImageReward.pt from the hub repo 'THUDM/ImageReward'"):
        build_reward("imagereward")


def test_imagereward_without_the_bert_tokenizer_in_the_cache(imagereward_files, tmp_path, monkeypatch):
    import huggingface_hub.constants
    import transformers.utils.hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(tmp_path), raising=False)
    with pytest.raises(RewardLoadError, match=r"'bert-base-uncased', which is not in the Hugging Face cache"):
        build_reward("imagereward", checkpoint=str(imagereward_files))


def test_model_rewards_in_the_score_table(hps_files, imagereward_files, tmp_path):
    """`rayreward score` through the same reward code: hpsv21 and imagereward columns."""
    from rayreward import cli

    arch, ckpt, _, _ = hps_files
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, im in enumerate(to_pil(smooth_images(n=2, seed=7))):
        im.save(imgs / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    rc = cli.main(["score", "--rewards", "hpsv21,imagereward", "--images", str(imgs), "--prompts",
                   str(tmp_path / "prompts.txt"), "--arg", f"hpsv21.checkpoint={ckpt}", "--arg", f"hpsv21.arch={arch}",
                   "--arg", f"imagereward.checkpoint={imagereward_files}", "--out", str(tmp_path / "s.csv")])
    assert rc == 0
    import pandas as pd

    df = pd.read_csv(tmp_path / "s.csv")
    assert {"hpsv21", "imagereward"} <= set(df.columns) and len(df) == 2
    direct = build_reward("hpsv21", checkpoint=str(ckpt), arch=str(arch))(smooth_images(n=2, seed=7), ["a cat", "a dog"])
    assert df.hpsv21.tolist() == pytest.approx(direct.tolist(), abs=1e-5)
