"""`rayreward export --format kohya`: read back by diffusers' own kohya reader (weights and alphas
equal), and loaded by a stock pipeline it gives the images of the diffusers-format LoRA."""

import pytest
import torch
from diffusers import DiffusionPipeline

from rayreward import cli, config, export, lora_io, models

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]  # attention and convolutions


def trained_like(name: str, folder, rank: int = 4, alpha: float = 2.0):
    """A LoRA with alpha != rank (scale 0.5), every weight moved so that it changes the images."""
    c = models.load_components(config.ModelConfig(name=name))
    params = models.add_lora(c.unet, config.LoraConfig(rank=rank, alpha=alpha, target_modules=TARGETS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    lora_io.save_lora(c.unet, folder, c.flavour)
    return models.resolve_source(config.ModelConfig(name=name))


def images(source, lora=None, **kw) -> torch.Tensor:
    pipe = DiffusionPipeline.from_pretrained(str(source))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora), **kw)
    return pipe("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt",
                height=32, width=32).images


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_a_kohya_export_gives_the_same_images_in_a_stock_pipeline(name, tmp_path):
    source = trained_like(name, tmp_path / "lora")
    assert cli.main(["export", "--lora", str(tmp_path / "lora"), "--format", "kohya",
                     "--out", str(tmp_path / "ui" / "mine.safetensors")]) == 0
    ours = images(source, tmp_path / "lora")
    kohya = images(source, tmp_path / "ui", weight_name="mine.safetensors")
    assert (ours - images(source)).abs().max() > 1e-2  # the LoRA does change the images
    assert torch.allclose(kohya, ours, atol=1e-5), (kohya - ours).abs().max()
    # what the converter alone writes (alpha = rank: twice this LoRA's scale) does not (docs/guide/lora.md's 0.21 and 0.16)
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    raw = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora_io.read_lora_state(tmp_path / "lora").items()})
    save_file(raw, str(tmp_path / "ui" / "raw.safetensors"))
    assert (images(source, tmp_path / "ui", weight_name="raw.safetensors") - ours).abs().max() > 0.05  # 0.21, 0.16


def test_the_kohya_file_reads_back_to_the_same_weights_and_alpha(tmp_path):
    trained_like("tiny", tmp_path / "lora", rank=4, alpha=2.0)
    out = export.export_lora(tmp_path / "lora", "kohya", tmp_path / "k.safetensors")
    keys = list(export.to_kohya(tmp_path / "lora")[0])
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    from diffusers import StableDiffusionPipeline

    back, alphas = StableDiffusionPipeline.lora_state_dict(str(out))  # diffusers' own kohya reader
    ours = lora_io.read_lora_state(tmp_path / "lora")
    from diffusers.utils import convert_unet_state_dict_to_peft  # its older naming -> peft's

    converted = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in back.items()})
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], ours[k]) for k in ours)
    assert len(alphas) == len(ours) // 2 and set(alphas.values()) == {2.0}  # the LoRA's alpha, not its rank


def test_export_bad_inputs(tmp_path, capsys):
    trained_like("tiny", tmp_path / "lora")
    assert cli.main(["export", "--lora", str(tmp_path / "nope"), "--format", "kohya", "--out", str(tmp_path / "a.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["export", "--lora", str(tmp_path / "lora"), "--format", "kohya", "--out", str(tmp_path / "a.pt")]) == 2
    assert "--out: " in capsys.readouterr().err and not (tmp_path / "a.pt").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--lora", str(tmp_path / "lora"), "--format", "a1111", "--out", str(tmp_path / "a.safetensors")])
    assert e.value.code == 2 and "invalid choice: 'a1111'" in capsys.readouterr().err
    assert export.FORMATS == ("kohya",)  # the CLI's choices


def _flux_lora(tmp_path, targets):
    from rayreward import config, lora_io, models

    c = models.load_components(config.ModelConfig(name="tiny-flux"))
    for i, p in enumerate(models.add_lora(c.denoiser, config.LoraConfig(rank=2, alpha=3.0, target_modules=targets))):
        torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(i))
    lora_io.save_lora(c.denoiser, tmp_path / "lora", "flux")
    return c


def test_a_flux_lora_in_kohya_s_bfl_layout_loads_into_the_stock_pipeline_with_the_same_images(tmp_path):
    """FLUX.1: exported with q, k, v fused (block diagonal), read back by diffusers' own FLUX kohya
    converter (FluxPipeline.load_lora_weights): the same pictures as the diffusers-format file.
    (diffusers' converter fixes FLUX.1's real single-block widths, so the tiny model's LoRA here
    is on the double blocks; the single blocks' fusion is checked on its own below.)"""
    from diffusers import FluxPipeline

    from rayreward import config, render

    double = [f"transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                                                     "attn.to_add_out", "ff.net.0.proj", "ff_context.net.2")]
    c = _flux_lora(tmp_path, double)
    out = export.export_lora(tmp_path / "lora", "kohya", tmp_path / "flux_kohya.safetensors")
    from safetensors.torch import load_file

    keys = load_file(out).keys()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight" in keys
    pipes = []
    for source in (tmp_path / "lora", out):
        pipe = FluxPipeline.from_pretrained(c.source)
        pipe.load_lora_weights(str(source.parent if source == out else source),
                               **({"weight_name": out.name} if source == out else {}))
        pipes.append(pipe)
    sampling = config.SamplingConfig(num_steps=3, guidance_scale=3.5)
    a, b = (render.render(models_of(p), ["a cat"], [0], sampling, 32, "cpu") for p in pipes)
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def models_of(pipe):
    from rayreward.families import Components

    return Components(pipe.transformer, pipe.vae, [pipe.text_encoder, pipe.text_encoder_2],
                      [pipe.tokenizer, pipe.tokenizer_2], pipe.scheduler, "flux", "pipe")


def test_flux_single_blocks_fuse_q_k_v_and_the_mlp_into_one_update():
    """linear1's fused LoRA: (alpha' / r') up @ down stacks the parts' (alpha / r) B A, a zero
    block where a part has no LoRA (proj_mlp here)."""
    g = torch.Generator().manual_seed(0)
    r, fan_in, w, alpha = 2, 8, 6, 3.0
    state = {}
    for p in ("attn.to_q", "attn.to_k", "attn.to_v"):
        state[f"single_transformer_blocks.1.{p}.lora_A.weight"] = torch.randn(r, fan_in, generator=g)
        state[f"single_transformer_blocks.1.{p}.lora_B.weight"] = torch.randn(w, r, generator=g)
    kohya = export.to_kohya_flux(state, alpha)
    key = "lora_unet_single_blocks_1_linear1"
    down, up, a2 = kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"], float(kohya[f"{key}.alpha"])
    fused = a2 / down.shape[0] * up @ down
    parts = [alpha / r * state[f"single_transformer_blocks.1.{p}.lora_B.weight"]
             @ state[f"single_transformer_blocks.1.{p}.lora_A.weight"] for p in ("attn.to_q", "attn.to_k", "attn.to_v")]
    want = torch.cat(parts + [torch.zeros(w * export.FLUX_MLP_RATIO, fan_in)])
    assert up.shape == (3 * w + 4 * w, 4 * r) and torch.allclose(fused, want, atol=1e-6)
