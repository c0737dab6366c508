"""Tiny models of the real classes, loading, and LoRA: diffusers format, resume, scale, mix."""

import warnings

import pytest
import torch
from diffusers import DiffusionPipeline

from rayreward import lora_io, methods, models, sampling
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


# the quickstart's targets mix attention projections, feed-forward and convolutions
QUICKSTART_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                      "conv1", "conv2", "conv_in", "conv_out", "time_emb_proj"]


@pytest.mark.parametrize("targets", [["to_q", "to_k", "to_v", "to_out.0"], QUICKSTART_TARGETS], ids=["attn", "mixed"])
@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_saved_lora_gives_the_same_images_in_a_stock_pipeline(name, targets, tmp_path):
    c = models.load_components(ModelConfig(name=name))
    params = models.add_lora(c.unet, LoraConfig(rank=4, alpha=2.0, target_modules=targets))  # alpha != rank
    _perturb(params, 0)
    lora_io.save_lora(c.unet, tmp_path / "lora", c.flavour)
    prompts, seeds = ["a cat", "a dog"], [0, 1]
    cond = models.encode_prompts(c, prompts, "", 32, "cpu")
    x_T = models.initial_noise(seeds, c, 32, "cpu")
    with torch.no_grad():
        res = sampling.sample(models.make_denoiser(c.unet, cond, 5.0), sampling.Schedule.from_scheduler(c.scheduler, 6),
                              x_T, methods.plan_inference(6))
        ours = models.decode(c.vae, res.latents)
    pipe = DiffusionPipeline.from_pretrained(c.source)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    placed = get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
    assert len(placed) == len(load_file(tmp_path / "lora" / lora_io.LORA_WEIGHT_NAME))  # every saved tensor used
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
    lora_io.save_lora(c.unet, tmp_path, c.flavour)
    saved = [p.detach().clone() for p in params]
    c2 = models.load_components(ModelConfig(name="tiny"))
    params2 = models.add_lora(c2.unet, LoraConfig())
    lora_io.load_lora_weights_into(c2.unet, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(saved, params2))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params2)


def _to_q(unet):
    return unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q


def test_lora_scale_interpolates_and_mix_sums(tmp_path):
    paths = []
    for i in range(2):
        c = models.load_components(ModelConfig(name="tiny"))
        _perturb(models.add_lora(c.unet, LoraConfig(rank=2, alpha=4.0)), 10 + i)
        paths.append(lora_io.save_lora(c.unet, tmp_path / f"l{i}", c.flavour).parent)
    x = torch.randn(3, 64)

    def out(loras):
        c = models.load_components(ModelConfig(name="tiny"))
        lora_io.apply_loras(c.unet, loras)
        with torch.no_grad():
            return _to_q(c.unet)(x)

    base, one, two = out([]), out([(paths[0], 1.0)]), out([(paths[1], 1.0)])
    assert not torch.allclose(base, one)
    assert torch.allclose(out([(paths[0], 0.0)]), base, atol=1e-6)
    assert torch.allclose(out([(paths[0], 0.5)]), (base + one) / 2, atol=1e-5)
    with warnings.catch_warnings(record=True) as said:  # the second adapter is loaded on purpose
        warnings.simplefilter("always")
        mixed = out([(paths[0], 0.7), (paths[1], 0.4)])
    assert not [w for w in said if "peft_config" in str(w.message)]
    assert torch.allclose(mixed, base + 0.7 * (one - base) + 0.4 * (two - base), atol=1e-5)


def test_lora_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-lora"):
        lora_io.lora_file(tmp_path / "no-such-lora")
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="only .safetensors"):
        lora_io.lora_file(bad)


def test_lora_roundtrip_through_our_loader_on_mixed_targets(tmp_path):
    """sample/eval load a LoRA with load_lora: every tensor lands, equal, for the quickstart's targets."""
    c = models.load_components(ModelConfig(name="tiny"))
    _perturb(models.add_lora(c.unet, LoraConfig(target_modules=QUICKSTART_TARGETS)), 3)
    lora_io.save_lora(c.unet, tmp_path, c.flavour)
    from peft.utils import get_peft_model_state_dict

    want = get_peft_model_state_dict(c.unet)
    c2 = models.load_components(ModelConfig(name="tiny"))
    lora_io.load_lora(c2.unet, tmp_path, "x")
    got = get_peft_model_state_dict(c2.unet, adapter_name="x")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_lora_in_the_older_mixed_key_layout_still_loads_whole(tmp_path):
    """Files written before the peft-naming fix mix `lora.down` and `lora_A` keys; they load whole."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    c = models.load_components(ModelConfig(name="tiny"))
    _perturb(models.add_lora(c.unet, LoraConfig(target_modules=QUICKSTART_TARGETS)), 4)
    want = get_peft_model_state_dict(c.unet)
    legacy = convert_state_dict_to_diffusers(dict(want))
    assert any("lora.down" in k for k in legacy) and any("lora_A" in k for k in legacy)  # really mixed
    save_file({f"unet.{k}": v.contiguous() for k, v in legacy.items()}, tmp_path / "old.safetensors")
    c2 = models.load_components(ModelConfig(name="tiny"))
    lora_io.load_lora(c2.unet, tmp_path / "old.safetensors", "x")
    got = get_peft_model_state_dict(c2.unet, adapter_name="x")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_lora_of_another_model_or_with_nan_is_refused(tmp_path):
    sdxl = models.load_components(ModelConfig(name="tiny-sdxl"))
    models.add_lora(sdxl.unet, LoraConfig(target_modules=QUICKSTART_TARGETS))
    lora_io.save_lora(sdxl.unet, tmp_path / "xl", sdxl.flavour)
    c = models.load_components(ModelConfig(name="tiny"))
    with pytest.raises(lora_io.LoraFileError, match="does not fit this model: .* has shape"):
        lora_io.load_lora(c.unet, tmp_path / "xl", "x")

    params = models.add_lora(c.unet, LoraConfig())
    with torch.no_grad():
        params[0][0, 0] = float("nan")
    with pytest.raises(lora_io.LoraFileError, match="NaN or inf"):
        lora_io.save_lora(c.unet, tmp_path / "nan", c.flavour)
    assert not (tmp_path / "nan").exists()  # nothing half-written
    from safetensors.torch import load_file, save_file

    good = lora_io.save_lora(sdxl.unet, tmp_path / "ok", sdxl.flavour)
    state = load_file(good)
    state[next(iter(state))][0] = float("inf")
    save_file(state, tmp_path / "inf.safetensors")
    with pytest.raises(lora_io.LoraFileError, match="NaN or inf"):
        lora_io.load_lora(sdxl.unet, tmp_path / "inf.safetensors", "y")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(lora_io.LoraFileError, match="not a readable safetensors file"):
        lora_io.read_lora_state(tmp_path / "junk.safetensors")


def test_an_unreachable_hub_fails_at_once_instead_of_retrying(monkeypatch):
    """Not offline by HF_HUB_OFFLINE, but the hub does not answer: only the cache is looked at."""
    import time

    from rayreward import hub
    from rayreward.rewards import RewardLoadError
    from rayreward.rewards.clip import pickscore

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_reachable", lambda: False)
    t0 = time.monotonic()
    with pytest.raises(models.ModelLoadError, match="does not answer from this machine"):
        models.load_components(ModelConfig(name="nobody/no-such-model"))
    with pytest.raises(RewardLoadError, match="does not answer from this machine"):
        pickscore(model="nobody/no-such-model", processor="nobody/no-such-model")
    assert time.monotonic() - t0 < 20  # the hub libraries' retries took 75 s for PickScore


def test_a_bf16_unet_runs_without_autocast_and_keeps_the_lora_fp32():
    """The compute-dtype path (bf16 frozen weights, inputs cast once, no autocast): its guided
    output is as close to the fp32 UNet's as bf16 autocast's (the path it replaces), its LoRA
    gradients point the same way, and the LoRA's parameters and gradients stay fp32."""
    import copy

    outs, grads = {}, {}
    c = models.load_components(ModelConfig(name="tiny"))
    params = models.add_lora(c.unet, LoraConfig(rank=4))
    _perturb(params, seed=3, std=0.1)
    cond = models.encode_prompts(c, ["a cat", "a dog"], "", 32, "cpu")
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    for dtype in (None, torch.bfloat16):
        unet = copy.deepcopy(c.unet)
        if dtype is not None:
            for n, p in unet.named_parameters():
                if "lora_" not in n:
                    p.data = p.data.to(dtype)
        out = models.make_denoiser(unet, cond, 5.0, dtype)(x, torch.tensor(500))
        assert out.dtype == torch.float32
        out.pow(2).mean().backward()
        lora = [p for n, p in unet.named_parameters() if "lora_" in n]
        assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
        outs[dtype], grads[dtype] = out.detach(), torch.cat([p.grad.flatten() for p in lora])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = models.make_denoiser(c.unet, cond, 5.0)(x, torch.tensor(500)).float()
    err = lambda y: float((y - outs[None]).norm() / outs[None].norm())  # noqa: E731
    assert err(outs[torch.bfloat16]) < 1.25 * err(autocast), (err(outs[torch.bfloat16]), err(autocast))
    assert torch.nn.functional.cosine_similarity(grads[torch.bfloat16], grads[None], dim=0) > 0.99
