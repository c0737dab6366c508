"""Stable Diffusion 1.x / 2.x: a UNet2DConditionModel on one CLIP text encoder, a DDIM chain
(epsilon or v-prediction), classifier-free guidance in one batched UNet call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rayreward.families import Components, Conditioning, Family


@dataclass(frozen=True)
class SD(Family):
    def detects(self, index: dict) -> bool:
        return "unet" in index and "text_encoder_2" not in index and "XL" not in str(index.get("_class_name", ""))

    def load(self, src: str, model_cfg, kw: dict):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", variant=model_cfg.variant, **kw)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", variant=model_cfg.variant, **kw)
        encoders = [CLIPTextModel.from_pretrained(src, subfolder="text_encoder", variant=model_cfg.variant, **kw)]
        tokenizers = [CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)]
        if self.name == "sdxl":
            encoders.append(CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2",
                                                                        variant=model_cfg.variant, **kw))
            tokenizers.append(CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw))
        scheduler = DDIMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
        return Components(unet, vae, encoders, tokenizers, scheduler, self.name, src)

    @torch.no_grad()
    def _encode(self, c, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, pooled = [], None
        for tok, enc in zip(c.tokenizers, c.text_encoders):
            ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            if self.name == "sd":
                return enc(ids)[0], None
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder (with projection) gives the pooled text_embeds
        return torch.cat(hidden, dim=-1), pooled

    def encode(self, c, prompts, negative_prompt, resolution, device):
        embeds, _ = self._encode(c, prompts, device)
        neg, _ = self._encode(c, [negative_prompt] * len(prompts), device)
        return Conditioning(embeds, neg, family=self.name)

    def denoiser(self, network, cond, guidance_scale, dtype, uncond_grad=True):
        """CFG runs both branches in one UNet call when guidance_scale > 1 (as diffusers does)."""
        return cfg_denoiser(cond, guidance_scale, dtype,
                            lambda x, t, emb, extra: network(x, t, encoder_hidden_states=emb, added_cond_kwargs=extra).sample,
                            uncond_grad)

    def pipeline(self, c):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                                       unet=c.denoiser, scheduler=c.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


def cfg_denoiser(cond, guidance_scale: float, dtype, call, uncond_grad: bool = True):
    """denoise(x_t, t) -> guided model output, in fp32, for a network called as
    call(x, t, embeds, extra) where `extra` holds the family's other conditioning (SDXL's pooled
    embeds and time ids: `added_cond_kwargs`; SD3's `pooled_projections`). Both CFG branches run
    in one call; a batch that is a multiple of the prompts' (DRaFT-LV copies) repeats the
    conditioning, built once per batch layout.

    `dtype`: the network's weight dtype when it is not fp32 (bf16/fp16 on a GPU). The latents and
    the conditioning are cast to it and it runs without autocast, as the stock pipelines do:
    autocast re-dispatches every op of a network whose weights already have that dtype, which was
    measured at ~40% of a bf16 UNet call. The fp32 LoRA layers cast their own input (peft).

    `uncond_grad` False (`sampling.uncond_grad: false`): when a gradient is being taken, the
    unconditional branch runs in its own call under no_grad, so only the text branch keeps
    activations for backward (about half the denoiser's share of the memory; two calls instead of
    one batched call). The gradient then omits the unconditional branch's share (1 - w of the
    guided output's dependence on the LoRA): an approximation, not the exact gradient."""
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
                    pooled = torch.cat([rep(cond.neg_pooled), pooled])
                if time_ids is not None:
                    time_ids = torch.cat([time_ids, time_ids])
            cast = (lambda v: v) if dtype is None else (lambda v: None if v is None else v.to(dtype))
            extra = None
            if pooled is not None:
                extra = {"text_embeds": cast(pooled), "time_ids": cast(time_ids)} if time_ids is not None else cast(pooled)
            cache[reps] = (cast(emb), extra)
        return cache[reps]

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb, extra = conditioning(x.shape[0] // n_prompts)
        x = x if dtype is None else x.to(dtype)
        if cfg and not uncond_grad and torch.is_grad_enabled():
            half = emb.shape[0] // 2
            text = call(x, t, emb[half:], _half(extra, 1)).float()
            with torch.no_grad():
                uncond = call(x, t, emb[:half], _half(extra, 0)).float()
            return torch.lerp(uncond, text, guidance_scale)
        if cfg:
            x = torch.cat([x, x])
        out = call(x, t, emb, extra).float()
        if not cfg:
            return out
        uncond, text = out.chunk(2)
        return torch.lerp(uncond, text, guidance_scale)  # uncond + w * (text - uncond), one kernel

    return denoise


def _half(extra, i: int):
    """The unconditional (0) or text (1) half of a CFG batch's extra conditioning."""
    if extra is None:
        return None
    if isinstance(extra, dict):
        return {k: v.chunk(2)[i] for k, v in extra.items()}
    return extra.chunk(2)[i]


FAMILY = SD("sd", "StableDiffusionPipeline", "unet", "UNet2DConditionModel", "unet", flow=False)
