"""Tiny random-initialised models of the real classes, built offline and cached: the `tiny`,
`tiny-sdxl`, `tiny-sd3`, `tiny-flux` and `tiny-flux2` pipelines (`model.name`) and the tiny CLIP of the CLIP rewards (`model: tiny`).

One builder for all of them (`cached`): a model is built once into
`$RAYREWARD_CACHE` (default ~/.cache/rayreward) under a name that holds its kind, seed, version
and the library versions that decide the saved layout, written to a temporary folder and renamed
into place (atomic: many workers may ask at once). Inside a distributed worker group, where
transformers' `save_pretrained` writes weights from rank 0 only, it builds in a fresh interpreter
(`python -m rayreward.tiny KIND SEED`); the driver builds before the workers start anyway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from rayreward.errors import ModelLoadError

VERSIONS = {"sd": 1, "sdxl": 1, "sd3": 1, "flux": 1, "flux2": 1, "clip": 1}  # bump one when its architecture changes, so caches are rebuilt


def cache_dir() -> Path:
    return Path(os.environ.get("RAYREWARD_CACHE", Path.home() / ".cache" / "rayreward"))


def format_tag() -> str:
    """The library versions that decide the saved files' layout (transformers 4 and 5 name CLIP's
    weights differently): part of every cache name, so a cache written under another stack is not
    read back."""
    import diffusers
    import transformers

    return f"tf{transformers.__version__.split('.')[0]}-df{'.'.join(diffusers.__version__.split('.')[:2])}"


def complete(folder: Path) -> bool:
    """A pipeline folder (model_index.json) with weights for each model component, or a single
    model's folder (config.json) with its weights."""
    if (folder / "model_index.json").is_file():
        index = json.loads((folder / "model_index.json").read_text())
        weights = {"unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
        return all(any((folder / name).glob("*.safetensors")) for name in index if name in weights)
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def folder(kind: str, seed: int = 0) -> Path:
    """The cached folder of tiny model `kind` ("sd", "sdxl", "sd3", "flux", "flux2" or "clip") from `seed`, built on first use."""
    if kind not in BUILDERS:
        raise ValueError(f"tiny model {kind!r} is unknown; allowed: {', '.join(BUILDERS)}")
    target = cache_dir() / f"tiny-{kind}-seed{seed}-v{VERSIONS[kind]}-{format_tag()}"
    if complete(target):
        return target
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        subprocess.run([sys.executable, "-m", "rayreward.tiny", kind, str(seed)], check=True)
        if not complete(target):
            raise ModelLoadError(f"the tiny model's build in a subprocess left {target} incomplete")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        BUILDERS[kind](seed, tmp)
        if not complete(tmp):
            raise ModelLoadError(f"the tiny model's build left {tmp} incomplete (is the disk full?)")
        os.rename(tmp, target)
    except OSError:
        if not complete(target):  # not: another process finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# The models.


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the standard BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer(folder: Path, max_length: int = 32):
    """A CLIPTokenizer whose vocabulary is the byte alphabet (each char, and char + '</w>')."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _text_config(tok) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=len(tok), max_position_embeddings=tok.model_max_length,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build_pipeline(flavour: str, seed: int):
    """Random-initialised tiny SD-1.x ('sd') or SDXL ('sdxl') pipeline of the real classes."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if flavour not in ("sd", "sdxl"):
        raise ValueError(f"tiny model flavour {flavour!r} is unknown; allowed: sd, sdxl")
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        tok = tokenizer(Path(tmp) / "tok")
        text_cfg = dict(_text_config(tok), projection_dim=32)
        unet_cfg = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                        norm_num_groups=8, attention_head_dim=8)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=8, sample_size=32)
        if flavour == "sd":
            unet = UNet2DConditionModel(cross_attention_dim=32, **unet_cfg)
            te = CLIPTextModel(CLIPTextConfig(**text_cfg))
            return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        # cross attention sees both encoders' hidden states (32 + 32); the added embedding sees
        # 6 time ids * 8 + the pooled projection (32)
        unet = UNet2DConditionModel(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True, **unet_cfg)
        te1 = CLIPTextModel(CLIPTextConfig(**text_cfg))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=scheduler)


def _flow_vae(scaling_factor: float, shift_factor: float):
    """A tiny VAE of 16 latent channels with a flow family's scaling and shift (SD3, FLUX.1)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=False, use_post_quant_conv=False)


def _t5(tok, width: int):
    """A one-layer T5 encoder of `width` on the byte tokenizer."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=width, d_kv=width // 4, d_ff=64, num_layers=1,
                                   num_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))


def build_sd3(seed: int):
    """Random-initialised tiny SD3 pipeline of the real classes: an SD3Transformer2DModel (16
    latent channels, patch 2), a VAE with SD3's scaling and shift, two CLIP encoders with
    projection and a T5 encoder (the byte tokenizer for all three), the flow-matching scheduler
    with SD3's shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        tok = tokenizer(Path(tmp) / "tok")
        text_cfg = dict(_text_config(tok), projection_dim=32)
        # CLIP hidden states 32 + 32 = T5's 64 = joint_attention_dim; pooled 32 + 32 = 64
        transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                            caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
        vae, t5 = _flow_vae(1.5305, 0.0609), _t5(tok, 64)
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)), tokenizer=tok,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)), tokenizer_2=tok,
            text_encoder_3=t5, tokenizer_3=tok)


def build_flux(seed: int):
    """Random-initialised tiny FLUX.1 [dev] pipeline of the real classes: a FluxTransformer2DModel
    with a guidance embedding (16 latent channels, packed 2x2 into 64), a VAE with FLUX's scaling
    and shift, CLIP (pooled) and T5 encoders on the byte tokenizer, the resolution-shifted
    flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        tok = tokenizer(Path(tmp) / "tok")
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        vae, t5 = _flow_vae(0.3611, 0.1159), _t5(tok, 32)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
        return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                            text_encoder=CLIPTextModel(CLIPTextConfig(**_text_config(tok))), tokenizer=tok,
                            text_encoder_2=t5, tokenizer_2=tok)


CHAT_TEMPLATE = ("{% for m in messages %}<|startoftext|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|endoftext|>{% endif %}")


def build_flux2(seed: int):
    """Random-initialised tiny FLUX.2 [klein] (base) pipeline of the real classes: a
    Flux2Transformer2DModel (8 latent channels, patchified 2x2 into 32), an AutoencoderKLFlux2
    with its batch norm, a Qwen3ForCausalLM of 27 layers (the pipeline reads layers 9, 18 and 27)
    on the byte tokenizer with a chat template, the flow-matching scheduler."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        tok = tokenizer(Path(tmp) / "tok")
        tok.chat_template = CHAT_TEMPLATE
        qwen = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=8, max_position_embeddings=1024, pad_token_id=tok.pad_token_id))
        # three Qwen3 layers of 16 stacked: the transformer's joint_attention_dim is 48
        transformer = Flux2Transformer2DModel(patch_size=1, in_channels=32, num_layers=1, num_single_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                              timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
                                              guidance_embeds=False)
        vae = AutoencoderKLFlux2(block_out_channels=(16, 32), latent_channels=8, layers_per_block=1,
                                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                 norm_num_groups=8, sample_size=32, mid_block_add_attention=False)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=qwen, tokenizer=tok, transformer=transformer)


def _save_clip(seed: int, out: Path) -> None:
    """A tiny CLIPModel with its tokenizer and image processor (32 px images)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        tok = tokenizer(Path(tmp) / "tok")
        vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                      image_size=32, patch_size=8)
        model = CLIPModel(CLIPConfig(text_config=_text_config(tok), vision_config=vision, projection_dim=16))
        model.save_pretrained(out, is_main_process=True)
        tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)


BUILDERS = {
    "sd": lambda seed, out: build_pipeline("sd", seed).save_pretrained(out),
    "sdxl": lambda seed, out: build_pipeline("sdxl", seed).save_pretrained(out),
    "sd3": lambda seed, out: build_sd3(seed).save_pretrained(out),
    "flux": lambda seed, out: build_flux(seed).save_pretrained(out),
    "flux2": lambda seed, out: build_flux2(seed).save_pretrained(out),
    "clip": _save_clip,
}


if __name__ == "__main__":  # python -m rayreward.tiny KIND SEED: build one into the cache
    print(folder(sys.argv[1], int(sys.argv[2])))
