"""CLIP-based rewards against the reference (PIL) scoring path, gradients by finite differences, errors.

The tiny CLIPModel is the real class, random-initialised and saved as a folder (`model: tiny`).
"""

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from rayreward import tiny
from rayreward.rewards import RewardLoadError
from rayreward.rewards import clip as reward_models
from rayreward.rewards import build_reward

from helpers import make_worker, smooth_images, to_pil


def reference_embeddings(folder, images, prompt):
    """PickScore's published scoring code: AutoProcessor (PIL) -> get_*_features -> normalise."""
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        img = reward_models._features(model.get_image_features(**processor(images=to_pil(images), return_tensors="pt")))
        txt = reward_models._features(model.get_text_features(
            **processor(text=[prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")))
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return model, img, txt


# torch's antialiased bicubic and PIL's bicubic differ by a fraction of a grey level: PickScore
# (its logit scale, 14.3 here, multiplies embedding differences) moved by at most 1.1e-2 on scores ~2.9
# over 3 seeds
TOL = 2e-2


def test_pickscore_matches_the_reference_scoring():
    folder = tiny.folder("clip")
    images, prompt = smooth_images(), "a photo of a cat"
    model, img, txt = reference_embeddings(folder, images, prompt)
    expected = model.logit_scale.exp() * (txt @ img.T)[0]
    ours = build_reward("pickscore", model="tiny", processor="tiny")(images, [prompt] * len(images))
    assert torch.allclose(ours, expected, atol=TOL), (ours - expected).abs().max()


def test_clip_embeddings_match_the_reference_and_clipscore_is_its_clamped_cosine():
    folder = tiny.folder("clip")
    images, prompt = smooth_images(seed=1), "a dog"
    _, img, txt = reference_embeddings(folder, images, prompt)
    reward = build_reward("clipscore", model="tiny")
    ours_img, ours_txt = reward.scorer.image_embeds(images).detach(), reward.scorer.text_embeds([prompt])
    assert torch.allclose(ours_img, img, atol=2e-3), (ours_img - img).abs().max()  # measured <= 8.7e-4
    assert torch.allclose(ours_txt, txt, atol=1e-6)
    cos = (ours_img @ ours_txt.T)[:, 0]
    assert torch.allclose(reward(images, [prompt] * 3), 2.5 * cos.clamp(min=0))


def test_aesthetic_matches_the_reference_pipeline(tmp_path):
    folder = tiny.folder("clip")
    head = reward_models.AestheticMLP(16)
    torch.save(head.state_dict(), tmp_path / "head.pth")  # the LAION .pth layout: a plain state dict
    images = smooth_images(seed=2)
    _, img, _ = reference_embeddings(folder, images, "")
    with torch.no_grad():
        expected = head.eval()(img).squeeze(-1)
    ours = build_reward("aesthetic", head=str(tmp_path / "head.pth"), model="tiny")(images, [""] * len(images))
    assert torch.allclose(ours, expected, atol=TOL / 10), (ours - expected).abs().max()


@pytest.mark.parametrize("name", ["pickscore", "aesthetic"])
def test_image_gradient_matches_finite_differences(name, tmp_path):
    torch.save(reward_models.AestheticMLP(16).state_dict(), tmp_path / "head.pth")
    args = {"processor": "tiny"} if name == "pickscore" else {"head": str(tmp_path / "head.pth")}
    reward = build_reward(name, model="tiny", **args)
    # the image path in float64; the text tower stays float32 (transformers 4.x cannot build
    # CLIP's causal mask in float64), it is a constant here
    reward.scorer.model.vision_model.double()
    reward.scorer.model.visual_projection.double()
    reward.scorer.dtype = torch.float64
    x = smooth_images(n=1, h=12, w=12, seed=3).double().requires_grad_(True)
    prompts = ["a cat"]
    (grad,) = torch.autograd.grad(reward(x, prompts).sum(), x)
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        fd = (reward(x + eps * d, prompts) - reward(x - eps * d, prompts)).sum() / (2 * eps)
    assert float(fd) == pytest.approx(float((grad * d).sum()), rel=1e-4, abs=1e-8)


def test_reward_model_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(RewardLoadError, match=r"head '.*missing.pth' does not exist.*args.head"):
        build_reward("aesthetic", head=str(tmp_path / "missing.pth"), model="tiny")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(RewardLoadError, match="not a readable state dict"):
        build_reward("aesthetic", head=str(tmp_path / "text.pth"), model="tiny")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(RewardLoadError, match="not in the LAION MLP layout"):
        build_reward("aesthetic", head=str(tmp_path / "other.pth"), model="tiny")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RewardLoadError, match=r"pickscore: cannot load 'nobody/no-clip'.*args.model"):
        build_reward("pickscore", model="nobody/no-clip", processor="tiny")
    with pytest.raises(ValueError, match="dtype 'float8' is unknown"):
        build_reward("clipscore", model="tiny", dtype="float8")


def test_training_against_a_model_reward_updates_the_lora(tmp_path):
    """experiments/quickstart_pickscore.yaml, shortened: checkpoint folder -> reward -> LoRA update."""
    from helpers import ROOT, rows

    from rayreward import config, train

    cfg = config.load(ROOT / "experiments/quickstart_pickscore.yaml",
                      [f"output_dir={tmp_path}", "train.steps=2", "train.batch_size=2", "grid.seeds=[0]"])
    w = make_worker(cfg, "cpu")
    before = [p.detach().clone() for p in w.params]
    row = w.train_step(0)
    assert row["stepped"] == 1 and row["grad_norm"] > 0
    assert {"reward/pickscore", "reward/symmetry"} <= set(row)
    assert any(not torch.equal(a, b) for a, b in zip(before, w.params))
    train.run_training(cfg)
    assert len(rows(tmp_path / "metrics.csv")) == 2
