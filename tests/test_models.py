"""Tiny models of the real classes, loading, and LoRA: diffusers format, resume, scale, mix."""

import pytest
import torch
from diffusers import DiffusionPipeline

from rayreward import models, sampling
from rayreward.config import LoraConfig, ModelConfig


def _perturb(params, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(std * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name,flavour,encoders", [("tiny", "sd", 1), ("tiny-sdxl", "sdxl", 2)])
def test_tiny_models_load_like_any_diffusers_folder(name, flavour, encoders):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    c = models.load_components(ModelConfig(name=name))
    assert c.flavour == flavour and len(c.text_encoders) == encoders
    assert isinstance(c.unet, UNet2DConditionModel) and isinstance(c.text_encoders[0], CLIPTextModel)
    assert not any(p.requires_grad for p in c.unet.parameters())
    # the same folder loads by path with flavour "auto"
    again = models.load_components(ModelConfig(name=c.source))
    assert again.flavour == flavour
    cond = models.encode_prompts(c, ["a cat"], "", 32, "cpu")
    if flavour == "sdxl":
        assert cond.pooled.shape == (1, 32) and cond.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]
        assert torch.count_nonzero(cond.neg_embeds) == 0  # force_zeros_for_empty_prompt


def test_missing_hub_model_offline_is_a_clear_error(monkeypatch):
    import diffusers.utils.constants
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import time by the hub libraries, so also:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(diffusers.utils.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(models.ModelLoadError, match="model.name='nobody/no-such-model'"):
        models.load_components(ModelConfig(name="nobody/no-such-model"))


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_saved_lora_gives_the_same_images_in_a_stock_pipeline(name, tmp_path):
    c = models.load_components(ModelConfig(name=name))
    params = models.add_lora(c.unet, LoraConfig(rank=4, alpha=2.0))  # alpha != rank: metadata matters
    _perturb(params, 0)
    models.save_lora(c.unet, tmp_path / "lora", c.flavour)
    prompts, seeds = ["a cat", "a dog"], [0, 1]
    cond = models.encode_prompts(c, prompts, "", 32, "cpu")
    x_T = models.initial_noise(seeds, c, 32, "cpu")
    with torch.no_grad():
        res = sampling.sample(models.make_denoiser(c.unet, cond, 5.0), sampling.Schedule.from_scheduler(c.scheduler, 6),
                              x_T, sampling.plan_inference(6))
        ours = models.decode(c.vae, res.latents)
    pipe = DiffusionPipeline.from_pretrained(c.source)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        theirs = pipe(prompts, num_inference_steps=6, guidance_scale=5.0, latents=x_T.clone(), output_type="pt",
                      height=32, width=32).images
        pipe.unload_lora_weights()
        base = pipe(prompts, num_inference_steps=6, guidance_scale=5.0, latents=x_T.clone(), output_type="pt",
                    height=32, width=32).images
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert (ours - base).abs().max() > 1e-2  # and the LoRA does change the images


def test_lora_roundtrip_for_resume(tmp_path):
    c = models.load_components(ModelConfig(name="tiny"))
    params = models.add_lora(c.unet, LoraConfig())
    _perturb(params, 1)
    models.save_lora(c.unet, tmp_path, c.flavour)
    saved = [p.detach().clone() for p in params]
    c2 = models.load_components(ModelConfig(name="tiny"))
    params2 = models.add_lora(c2.unet, LoraConfig())
    models.load_lora_weights_into(c2.unet, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(saved, params2))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params2)


def _to_q(unet):
    return unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q


def test_lora_scale_interpolates_and_mix_sums(tmp_path):
    paths = []
    for i in range(2):
        c = models.load_components(ModelConfig(name="tiny"))
        _perturb(models.add_lora(c.unet, LoraConfig(rank=2, alpha=4.0)), 10 + i)
        paths.append(models.save_lora(c.unet, tmp_path / f"l{i}", c.flavour).parent)
    x = torch.randn(3, 64)

    def out(loras):
        c = models.load_components(ModelConfig(name="tiny"))
        models.apply_loras(c.unet, loras)
        with torch.no_grad():
            return _to_q(c.unet)(x)

    base, one, two = out([]), out([(paths[0], 1.0)]), out([(paths[1], 1.0)])
    assert not torch.allclose(base, one)
    assert torch.allclose(out([(paths[0], 0.0)]), base, atol=1e-6)
    assert torch.allclose(out([(paths[0], 0.5)]), (base + one) / 2, atol=1e-5)
    mixed = out([(paths[0], 0.7), (paths[1], 0.4)])
    assert torch.allclose(mixed, base + 0.7 * (one - base) + 0.4 * (two - base), atol=1e-5)


def test_lora_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-lora"):
        models.lora_file(tmp_path / "no-such-lora")
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="only .safetensors"):
        models.lora_file(bad)
