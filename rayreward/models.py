"""diffusers components: loading (hub id or local folder), prompts, the denoiser, decoding.

SD 1.x/2.x and SDXL load through the same code path. The built-in `tiny` / `tiny-sdxl` models
(`rayreward.tiny`) are real pipeline folders in the cache, loaded like any local model; the
shipped `shapes` model is one in the package. LoRA (add, save, load) is in `rayreward.lora`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rayreward import hub, tiny
from rayreward.errors import ModelLoadError, first_line
from rayreward.sampling import Denoiser


@dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list  # SD: [CLIPTextModel]; SDXL: [CLIPTextModel, CLIPTextModelWithProjection]
    tokenizers: list
    scheduler: object  # diffusers DDIMScheduler
    flavour: str  # "sd" or "sdxl"
    source: str  # the folder or hub id it came from
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt is a zero embedding

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device, dtype: torch.dtype | None = None) -> "Components":
        for m in [self.unet, self.vae, *self.text_encoders]:
            m.to(device)
        if dtype is not None:  # frozen parts only; LoRA parameters stay fp32
            for m in [self.vae, *self.text_encoders]:
                m.to(dtype)
        return self


# ---------------------------------------------------------------------------------------------
# Loading.


SHAPES_MODEL = Path(__file__).parent / "assets" / "shapes-model"  # `model.name: shapes` (rayreward pretrain)


def resolve_source(model_cfg) -> str:
    if model_cfg.name == "shapes":
        if not tiny.complete(SHAPES_MODEL):
            raise ModelLoadError(f"model.name: 'shapes': the built-in model is missing from {SHAPES_MODEL} (an "
                                 "install without the package data?); reinstall rayreward, or train one with "
                                 "`rayreward pretrain --out DIR` and set model.name to DIR")
        return str(SHAPES_MODEL)
    if model_cfg.name == "tiny":
        return str(tiny.folder("sd", model_cfg.seed))
    if model_cfg.name == "tiny-sdxl":
        return str(tiny.folder("sdxl", model_cfg.seed))
    return str(Path(model_cfg.name).expanduser()) if Path(model_cfg.name).expanduser().is_dir() else model_cfg.name


def load_components(model_cfg) -> Components:
    """UNet, VAE, text encoder(s), tokenizer(s) and a DDIM scheduler from `model.name`."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    src = resolve_source(model_cfg)
    local_only = not Path(src).is_dir() and hub.offline()
    kw = dict(revision=model_cfg.revision, local_files_only=local_only)
    try:
        index = DiffusionPipeline.load_config(src, **kw)
        flavour = model_cfg.flavour
        if flavour == "auto":
            flavour = "sdxl" if "text_encoder_2" in index else "sd"
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", variant=model_cfg.variant, **kw)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", variant=model_cfg.variant, **kw)
        encoders = [CLIPTextModel.from_pretrained(src, subfolder="text_encoder", variant=model_cfg.variant, **kw)]
        tokenizers = [CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)]
        if flavour == "sdxl":
            encoders.append(CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", variant=model_cfg.variant, **kw))
            tokenizers.append(CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw))
        scheduler = DDIMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"model.name={model_cfg.name!r}: could not load the diffusers pipeline from {src!r} ({type(e).__name__}: "
            f"{first_line(e)}){'; ' + hub.why_offline() if local_only else ''}. Set "
            "model.name to a local diffusers folder, or make the hub reachable (HF_HUB_OFFLINE unset) or its files "
            "present in the hub cache."
        ) from None
    for m in [unet, vae, *encoders]:
        m.eval().requires_grad_(False)
    return Components(unet, vae, encoders, tokenizers, scheduler, flavour, src,
                      force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", flavour == "sdxl")))


# ---------------------------------------------------------------------------------------------
# Prompts, the guided denoiser, decoding.


@dataclass
class Conditioning:
    """Text conditioning of a batch. Shape: embeds (b, L, D); SDXL pooled (b, P), time_ids (b, 6)."""

    embeds: torch.Tensor
    neg_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    neg_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


@torch.no_grad()
def _encode(c: Components, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden, pooled = [], None
    for tok, enc in zip(c.tokenizers, c.text_encoders):
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        if c.flavour == "sd":
            return enc(ids)[0], None
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder (with projection) gives the pooled text_embeds
    return torch.cat(hidden, dim=-1), pooled


def encode_prompts(c: Components, prompts: Sequence[str], negative_prompt: str, resolution: int, device) -> Conditioning:
    """Prompt embeddings as the stock diffusers pipelines compute them (same tokenizer padding)."""
    embeds, pooled = _encode(c, prompts, device)
    if c.flavour == "sdxl" and c.force_zeros_for_empty_prompt and not negative_prompt:
        neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        neg, neg_pooled = _encode(c, [negative_prompt] * len(prompts), device)
    time_ids = None
    if c.flavour == "sdxl":  # original size, crop top-left, target size
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device,
                                dtype=embeds.dtype).repeat(len(prompts), 1)
    return Conditioning(embeds, neg, pooled, neg_pooled, time_ids)


def make_denoiser(unet: torch.nn.Module, cond: Conditioning, guidance_scale: float,
                  dtype: torch.dtype | None = None) -> Denoiser:
    """denoise(x_t, t) -> guided model output, in fp32. CFG runs both branches in one UNet call
    when guidance_scale > 1 (as diffusers does); a batch that is a multiple of the prompts'
    (DRaFT-LV copies) repeats the conditioning.

    `dtype`: the UNet's weight dtype when it is not fp32 (bf16/fp16 on a GPU). The latents and the
    conditioning are cast to it and the UNet runs without autocast, as the stock pipelines do:
    autocast re-dispatches every op of a UNet whose weights already have that dtype, which was
    measured at ~40% of a bf16 UNet call. The fp32 LoRA layers cast their own input (peft), so
    the LoRA's parameters and gradients stay fp32. The conditioning for each batch layout is
    built once per denoiser, not at every step."""
    cfg = guidance_scale > 1.0
    n_prompts = cond.embeds.shape[0]
    cache: dict[int, tuple[torch.Tensor, dict | None]] = {}

    def conditioning(reps: int) -> tuple[torch.Tensor, dict | None]:
        if reps not in cache:
            def rep(v):
                return None if v is None else v.repeat(reps, *([1] * (v.dim() - 1)))
            emb, pooled, time_ids = rep(cond.embeds), rep(cond.pooled), rep(cond.time_ids)
            if cfg:
                emb = torch.cat([rep(cond.neg_embeds), emb])
                if pooled is not None:
                    pooled, time_ids = torch.cat([rep(cond.neg_pooled), pooled]), torch.cat([time_ids, time_ids])
            cast = (lambda v: v) if dtype is None else (lambda v: None if v is None else v.to(dtype))
            added = None if pooled is None else {"text_embeds": cast(pooled), "time_ids": cast(time_ids)}
            cache[reps] = (cast(emb), added)
        return cache[reps]

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb, added = conditioning(x.shape[0] // n_prompts)
        x = x if dtype is None else x.to(dtype)
        if cfg:
            x = torch.cat([x, x])
        out = unet(x, t, encoder_hidden_states=emb, added_cond_kwargs=added).sample.float()
        if not cfg:
            return out
        uncond, text = out.chunk(2)
        return torch.lerp(uncond, text, guidance_scale)  # uncond + w * (text - uncond), one kernel

    return denoise


def compile_unet(unet: torch.nn.Module, mode: str) -> torch.nn.Module:
    """The UNet to call in the chain: itself ("off"), or torch.compile of it in `mode`. The
    compiled module shares the UNet's parameters (LoRA included), which AdamW updates in place,
    so a compiled graph (or a CUDA graph of "reduce-overhead") sees every update without a
    recompile; saving and loading LoRAs still go through the UNet itself."""
    if mode == "off":
        return unet
    return torch.compile(unet, mode=mode, dynamic=False)


def decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1]. Shape: (b, 4, h, w) -> (b, 3, h * f, w * f). Differentiable."""
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    dtype = next(vae.parameters()).dtype
    images = vae.decode((latents / scale + shift).to(dtype)).sample.float()
    return (images / 2 + 0.5).clamp(0, 1)


def initial_noise(seeds: Sequence[int], c: Components, resolution: int, device) -> torch.Tensor:
    """x_T, one seeded draw per sample (CPU generator: the same on every device)."""
    h = resolution // c.vae_scale_factor
    ch = c.unet.config.in_channels
    return torch.cat([torch.randn((1, ch, h, h), generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


# ---------------------------------------------------------------------------------------------
# LoRA (peft) on the UNet: add, save in the diffusers format, load back, scale and mix.


def add_lora(unet: torch.nn.Module, lora_cfg, adapter_name: str = "default", seed: int = 0) -> list[torch.nn.Parameter]:
    """Freeze the UNet, add a LoRA adapter (A gaussian from `seed`, B zero), return its fp32
    parameters. The seeded init makes runs repeatable and every worker start alike."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, init_lora_weights="gaussian",
                                    target_modules=list(lora_cfg.target_modules)), adapter_name=adapter_name)
    params = [p for n, p in unet.named_parameters() if "lora_" in n and f".{adapter_name}." in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params
