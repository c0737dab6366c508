"""FLUX.2 [klein]: a Flux2Transformer2DModel on a Qwen3 text encoder (the hidden states of three
of its layers, stacked), a flow-matching Euler chain whose shift follows the token count and the
number of steps (`compute_empirical_mu`), and the FLUX.2 VAE, whose latents are patchified 2x2
into channels and batch-normalised.

The chain runs on the patchified latents (b, 4 C, H/2f, W/2f), as the pipeline draws and steps
them; the denoiser flattens them into tokens with their positions (`img_ids`, `txt_ids`, four
coordinates each) and back. Guidance as `Flux2KleinPipeline` does it: the base model takes true
CFG (two branches; the empty negative prompt), a distilled one (`is_distilled`) one call and no
guidance. Prompts are encoded by the stock pipeline's `encode_prompt` on the same modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayreward.families import Components, Conditioning, Family, quiet_loading
from rayreward.families.sd import cfg_denoiser


@dataclass(frozen=True)
class Flux2(Family):
    max_sequence_length: int = 512  # Qwen3 tokens, the pipeline's default
    default_sample_size: int = 128  # the pipeline's: native side = this x the VAE factor

    def detects(self, index: dict) -> bool:
        return str(index.get("_class_name", "")).startswith("Flux2")

    def load(self, src: str, model_cfg, kw: dict):
        from diffusers import Flux2KleinPipeline

        with quiet_loading():
            pipe = Flux2KleinPipeline.from_pretrained(src, variant=model_cfg.variant, **kw)
        c = Components(pipe.transformer, pipe.vae, [pipe.text_encoder], [pipe.tokenizer], pipe.scheduler, self.name, src)
        c.stock = pipe
        return c

    def distilled(self, c) -> bool:
        return bool(self.pipeline(c).config.get("is_distilled", False))

    def encode(self, c, prompts, negative_prompt, resolution, device):
        pipe = self.pipeline(c)
        with torch.no_grad():
            embeds, text_ids = pipe.encode_prompt(prompt=list(prompts), device=device,
                                                  max_sequence_length=self.max_sequence_length)
            neg = None
            if not self.distilled(c):  # the pipeline's negative branch: the empty prompt
                neg, _ = pipe.encode_prompt(prompt=[negative_prompt] * len(prompts), device=device,
                                            max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds, neg, ids=text_ids[:1], family=self.name)

    def denoiser(self, network, cond, guidance_scale, dtype, uncond_grad=True):
        positions: dict[tuple, tuple] = {}  # (batch, h, w) -> (txt_ids, img_ids), built once

        def ids(b: int, h: int, w: int, device):
            if (b, h, w) not in positions:
                img = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
                positions[b, h, w] = (cond.ids.to(device).expand(b, -1, -1), img.to(device).unsqueeze(0).expand(b, -1, -1))
            return positions[b, h, w]

        def call(x, t, emb, extra):
            b, ch, h, w = x.shape
            tokens = x.reshape(b, ch, h * w).permute(0, 2, 1)
            txt_ids, img_ids = ids(b, h, w, x.device)
            out = network(hidden_states=tokens, timestep=t.expand(b).to(tokens.dtype) / 1000, guidance=None,
                          encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            return out[:, : h * w].permute(0, 2, 1).reshape(b, ch, h, w)

        if cond.neg_embeds is None:  # distilled: one call, no guidance
            return cfg_denoiser(cond, 1.0, dtype, call)
        return cfg_denoiser(cond, guidance_scale, dtype, call, uncond_grad)

    def schedule(self, c, num_steps, resolution):
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        from rayreward.sampling import Schedule

        side = self.latent_side(c, resolution)
        sigmas = None if c.scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        return Schedule.from_scheduler(c.scheduler, num_steps, sigmas=sigmas,
                                       mu=compute_empirical_mu(image_seq_len=side * side, num_steps=num_steps))

    def latent_side(self, c, resolution: int) -> int:
        return resolution // (c.vae_scale_factor * 2)

    def decode(self, c, latents: torch.Tensor) -> torch.Tensor:
        """Un-normalise with the VAE's batch-norm statistics, un-patchify, decode (differentiable)."""
        vae = c.vae
        dtype = next(vae.parameters()).dtype
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                             latents.dtype)
        z = latents * std + mean
        b, ch, h, w = z.shape
        z = z.reshape(b, ch // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, ch // 4, h * 2, w * 2)
        images = vae.decode(z.to(dtype)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    def resolution_multiple(self, vae_scale_factor, denoiser_config):
        return vae_scale_factor * 2  # latents are patchified 2x2

    def native_side(self, vae_scale_factor, denoiser_config):
        return self.default_sample_size * vae_scale_factor

    def check(self, cfg, denoiser_config=None, index=None) -> list[str]:
        p = super().check(cfg, denoiser_config, index)
        if index is not None and index.get("is_distilled") and cfg.sampling.guidance_scale > 1:
            p.append(f"sampling.guidance_scale: {cfg.sampling.guidance_scale} is not allowed for {cfg.model.name!r}: a "
                     "distilled FLUX.2 [klein] runs without guidance; need 1 (or use the base model)")
        return p

    def pipeline(self, c):
        from diffusers import Flux2KleinPipeline

        if getattr(c, "stock", None) is None or c.stock.transformer is not c.denoiser:
            c.stock = Flux2KleinPipeline(scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoders[0],
                                         tokenizer=c.tokenizers[0], transformer=c.denoiser)
        return c.stock


FAMILY = Flux2("flux2", "Flux2KleinPipeline", "transformer", "Flux2Transformer2DModel", "transformer", flow=True,
               tags=("flux2", "flux2-klein"),
               default_targets=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                                "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"))
