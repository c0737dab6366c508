"""Model families: each renders what its stock diffusers pipeline renders, its LoRA files load
whole into that pipeline, and what a family does not have is refused before Ray starts."""

import pytest
import torch

from rayreward import budget, config, families, lora_io, methods, models, render, sampling
from rayreward.errors import LoraFileError


FLOW = ["tiny-sd3", "tiny-flux", "tiny-flux2"]


@pytest.fixture(scope="module")
def sd3():
    return models.load_components(config.ModelConfig(name="tiny-sd3"))


def stock_images(pipe, prompts, x_T, T, guidance, side):
    """The stock pipeline's images from our x_T (FLUX takes it packed into 2x2 tokens, and has no
    negative prompt: it is guidance-distilled)."""
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=T, guidance_scale=guidance, height=side, width=side, output_type="pt")
    with torch.no_grad():
        if type(pipe).__name__ == "Flux2KleinPipeline":  # its negative branch is always the empty prompt
            return pipe(prompt=list(prompts), latents=x_T.clone(), **kw).images
        if type(pipe).__name__ == "FluxPipeline":
            b, ch, h, w = x_T.shape
            return pipe(list(prompts), latents=pipe._pack_latents(x_T.clone(), b, ch, h, w), **kw).images
        return pipe(list(prompts), negative_prompt=[""] * len(prompts), latents=x_T.clone(), **kw).images


def test_the_family_is_detected_from_the_pipeline_folder(sd3):
    assert sd3.flavour == "sd3" and type(sd3.denoiser).__name__ == "SD3Transformer2DModel"
    assert type(sd3.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert models.load_components(config.ModelConfig(name="tiny")).flavour == "sd"
    assert families.detect({"_class_name": "Flux2KleinPipeline", "transformer": []}) == "flux2"
    assert families.detect({"_class_name": "FluxPipeline", "transformer": []}) == "flux"
    assert families.detect({"_class_name": "StableDiffusionXLPipeline", "unet": [], "text_encoder_2": []}) == "sdxl"
    with pytest.raises(ValueError, match="is not a family rayreward knows"):
        families.detect({"_class_name": "SomethingElsePipeline", "prior": []})
    assert set(families.NAMES) == set(families._registry())  # the light list matches the registry


@pytest.mark.parametrize("name", FLOW)
def test_a_flow_chain_renders_what_the_stock_pipeline_renders(name):
    """Same x_T, prompts, guidance and steps: our prompt encoding, flow chain (SD3's shift, FLUX's
    mu), guidance (SD3's CFG, FLUX's embedding), FLUX's packing and the decode, against the stock
    pipeline's __call__ on the same modules."""
    c = models.load_components(config.ModelConfig(name=name))
    T, side, prompts, seeds = 5, 32, ["a red circle", "a blue square"], [3]
    ours = render.render(c, prompts, seeds, config.SamplingConfig(num_steps=T, guidance_scale=4.0), side, "cpu")
    x_T = models.initial_noise([3, 3], c, side, "cpu")
    stock = stock_images(c.family.pipeline(c), prompts, x_T, T, 4.0, side)
    assert ours.shape == stock.shape == (2, 3, side, side)
    # FLUX.2's pipeline runs its two CFG branches as two calls, we batch them: float noise only
    assert torch.allclose(ours, stock.float(), atol=1e-5), float((ours - stock).abs().max())


@pytest.mark.parametrize("name", FLOW)
def test_a_flow_lora_loads_whole_into_the_stock_pipeline_and_renders_the_same(name, tmp_path):
    import diffusers

    c = models.load_components(config.ModelConfig(name=name))
    params = models.add_lora(c.denoiser, config.LoraConfig(target_modules=list(c.family.default_targets)))
    for i, p in enumerate(params):
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(i))
    path = lora_io.save_lora(c.denoiser, tmp_path, c.flavour)
    saved = lora_io.read_lora_state(path)
    assert lora_io.lora_prefix(path) == "transformer" and len(saved) == len(params)
    assert any(".add_q_proj." in k for k in saved) and any(".to_add_out." in k for k in saved)  # both streams

    pipe = getattr(diffusers, c.family.pipeline_class).from_pretrained(c.source)
    pipe.load_lora_weights(tmp_path)
    from peft.utils import get_peft_model_state_dict

    placed = get_peft_model_state_dict(pipe.transformer, adapter_name=pipe.transformer.active_adapters()[0])
    assert set(placed) == set(saved) and all(torch.equal(placed[k], saved[k]) for k in saved)  # every tensor placed

    T, side, prompts = 4, 32, ["a green triangle"]
    ours = render.render(c, prompts, [5], config.SamplingConfig(num_steps=T, guidance_scale=3.0), side, "cpu")
    stock = stock_images(pipe, prompts, models.initial_noise([5], c, side, "cpu"), T, 3.0, side)
    assert torch.allclose(ours, stock.float(), atol=1e-5)
    base = models.load_components(config.ModelConfig(name=name))
    plain = render.render(base, prompts, [5], config.SamplingConfig(num_steps=T, guidance_scale=3.0), side, "cpu")
    assert (ours - plain).abs().max() > 1e-3  # the LoRA does change the picture


def test_a_lora_of_another_family_is_refused_naming_both(sd3, tmp_path):
    sd = models.load_components(config.ModelConfig(name="tiny"))
    models.add_lora(sd.denoiser, config.LoraConfig())
    path = lora_io.save_lora(sd.denoiser, tmp_path / "sd", "sd")
    with pytest.raises(LoraFileError, match="is a LoRA of a unet .* this model's denoiser is a transformer"):
        lora_io.load_lora(sd3.denoiser, path, "x")
    # two transformer families: the family the file records names the mismatch
    models.add_lora(sd3.denoiser, config.LoraConfig(), adapter_name="mine")
    sd3_lora = lora_io.save_lora(sd3.denoiser, tmp_path / "sd3", "sd3", adapter_name="mine")
    assert lora_io.lora_family(sd3_lora) == "sd3"
    flux = models.load_components(config.ModelConfig(name="tiny-flux"))
    with pytest.raises(LoraFileError, match="was trained on a sd3 model and this model is flux"):
        lora_io.load_lora(flux.denoiser, sd3_lora, "x", family="flux")
    sd3.denoiser.delete_adapters(["mine"])


@pytest.mark.parametrize("sets, needle", [
    (["sampling.eta=0.5"], "sampling.eta: 0.5 is not allowed for 'tiny-sd3' (sd3, a flow-matching model)"),
    (["model.resolution=256"], "model.resolution: 256 is more than 4x the native side of 'tiny-sd3' (32 px)"),
])
def test_what_a_flow_family_does_not_have_is_refused_before_ray(sets, needle):
    """(A FLUX.1 [schnell] run with guidance is refused too: its transformer has no guidance input.)"""
    with pytest.raises(config.ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        budget.check(config.from_dict({"model": {"name": "tiny-sd3"}}, sets))


def test_a_resolution_off_the_transformer_patches_is_refused():
    """SD3's real shapes: VAE factor 8, patch 2, so sides are multiples of 16 (520 is not)."""
    sk = budget.skeleton(config.ModelConfig(name="tiny-sd3"))
    real = budget.Skeleton(sk.denoiser, sk.family, sk.family.resolution_multiple(8, {"patch_size": 2}), 8, 128, 1024, 0)
    with pytest.raises(config.ConfigError, match="model.resolution: 520 is not a multiple of 16"):
        budget.check(config.from_dict({"model": {"name": "tiny-sd3", "resolution": 520}}), real)


def test_the_flow_schedule_of_a_family_is_its_scheduler_s(sd3):
    sch = models.make_schedule(sd3, 6, 32)
    assert sch.is_flow and sch.num_steps == 6
    ref = type(sd3.scheduler).from_config(sd3.scheduler.config)
    ref.set_timesteps(6)
    assert torch.allclose(sch.timesteps, ref.timesteps.float()) and torch.allclose(sch.sigma, ref.sigmas[:-1])
    res = sampling.sample(lambda x, t: torch.zeros_like(x), sch, torch.ones(1, 16, 4, 4), methods.plan_inference(6))
    assert torch.equal(res.latents, torch.ones(1, 16, 4, 4))  # zero velocity: the chain stays put


def test_sample_and_eval_take_an_sd3_lora(tmp_path, capsys):
    from helpers import ROOT

    from rayreward import cli

    c = models.load_components(config.ModelConfig(name="tiny-sd3"))
    for i, p in enumerate(models.add_lora(c.denoiser, config.LoraConfig())):
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(i))
    lora_io.save_lora(c.denoiser, tmp_path / "lora", "sd3")
    cfg = str(ROOT / "experiments/sd35/tiny.yaml")
    assert cli.main(["sample", "--config", cfg, "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "s.png"),
                     "--prompt", "a cat", "--seeds", "0"]) == 0
    assert cli.main(["eval", "--config", cfg, "--lora", str(tmp_path / "lora"), "--rewards", "symmetry",
                     "--out", str(tmp_path / "eval"), "--prompts", "builtin:animals", "--seeds", "0"]) == 0
    assert (tmp_path / "s.png").is_file() and (tmp_path / "eval/summary.csv").is_file()
    assert "wrote" in capsys.readouterr().out


def test_a_distilled_flux2_klein_refuses_guidance():
    sk = budget.skeleton(config.ModelConfig(name="tiny-flux2"))
    cfg = config.from_dict({"model": {"name": "tiny-flux2"}, "sampling": {"guidance_scale": 4.0}})
    assert sk.family.check(cfg, dict(sk.denoiser.config), sk.index) == []  # the base model: CFG
    distilled = dict(sk.index, is_distilled=True)
    assert "a distilled FLUX.2 [klein] runs without guidance; need 1" in \
        sk.family.check(cfg, dict(sk.denoiser.config), distilled)[0]


def test_a_flux_model_without_guidance_input_refuses_guidance():
    sk = budget.skeleton(config.ModelConfig(name="tiny-flux"))
    schnell = dict(sk.denoiser.config, guidance_embeds=False)
    cfg = config.from_dict({"model": {"name": "tiny-flux"}, "sampling": {"guidance_scale": 3.5}})
    assert sk.family.check(cfg, dict(sk.denoiser.config)) == []  # [dev]: guidance is an input
    assert "a FLUX.1 model without a guidance input ([schnell]) runs without guidance; need 1" in \
        sk.family.check(cfg, schnell)[0]
    assert sk.multiple == 4 and sk.native == 256  # VAE factor 2 x 2x2 packing; the pipeline's 128 latents


def test_cfg_without_the_unconditional_gradient_keeps_the_values_and_drops_that_branch_s_share():
    """sampling.uncond_grad: false. Guided output (1 - w) u + w c: the same values, and the
    parameter gradient w dc/dp instead of (1 - w) du/dp + w dc/dp."""
    from rayreward.families import Conditioning
    from rayreward.families.sd import cfg_denoiser

    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
    cond = Conditioning(*(torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2)),
                        *(torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(2)), family="sd3")

    def call(x, t, emb, pooled):
        return p * x * emb.mean(dim=(1, 2)).view(-1, 1, 1, 1) + pooled.sum(1).view(-1, 1, 1, 1)

    x, t, w = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64), torch.tensor(500.0), 4.0
    both = cfg_denoiser(cond, w, None, call)(x, t)
    (d_both,) = torch.autograd.grad(both.sum(), p)
    text_only = cfg_denoiser(cond, w, None, call, uncond_grad=False)(x, t)
    (d_text,) = torch.autograd.grad(text_only.sum(), p)
    assert torch.allclose(both, text_only)
    dc = (x * cond.embeds.mean(dim=(1, 2)).view(-1, 1, 1, 1)).sum()
    du = (x * cond.neg_embeds.mean(dim=(1, 2)).view(-1, 1, 1, 1)).sum()
    assert torch.allclose(d_both, (1 - w) * du + w * dc) and torch.allclose(d_text, w * dc)
    with torch.no_grad():  # without a gradient to take, one batched call as before
        assert torch.allclose(cfg_denoiser(cond, w, None, call, uncond_grad=False)(x, t), both)


def test_prompt_embeddings_are_computed_once_per_prompt_and_match_a_fresh_encoding(sd3):
    cache = models.PromptCache(sd3, "cpu", "cpu", max_prompts=3)
    a = cache(["a cat", "a dog", "a cat"], "", 32)
    assert cache.calls == 1 and a.embeds.shape[0] == 3
    fresh = models.encode_prompts(sd3, ["a cat", "a dog", "a cat"], "", 32, "cpu")
    for f in models.PromptCache.FIELDS:
        want, got = getattr(fresh, f), getattr(a, f)
        assert (want is None and got is None) or torch.equal(want, got), f
    cache(["a dog", "a cat"], "", 32)
    assert cache.calls == 1  # nothing new to encode
    cache(["a tree", "a car"], "", 32)  # a fourth and fifth prompt: the least recently used goes
    assert cache.calls == 2 and len(cache.rows) == 3 and ("a dog", "", 32) not in cache.rows


def test_offloaded_text_encoders_stay_on_the_cpu_and_train_the_same(tmp_path):
    """model.offload_text_encoders keeps the encoders where they are; on a CPU worker it is the
    same run (on a GPU the encoders stay on the CPU and the embeddings move)."""
    from helpers import make_worker, quick_cfg

    w = make_worker(quick_cfg(tmp_path, "model.name=tiny-sd3", "model.offload_text_encoders=true"))
    assert all(next(e.parameters()).device.type == "cpu" for e in w.c.text_encoders)
    stats, _, _ = w.forward_backward(0)
    plain = make_worker(quick_cfg(tmp_path / "b", "model.name=tiny-sd3"))
    stats_plain, _, _ = plain.forward_backward(0)
    assert stats.reward_mean == pytest.approx(stats_plain.reward_mean, abs=1e-6)
    assert w.prompt_cache.calls == 1
