"""FLUX.1 ([dev], [schnell]): a FluxTransformer2DModel on CLIP-L (pooled) and T5-XXL, a
flow-matching Euler chain whose shift follows the image's token count (`mu`), latents packed
2x2 into tokens with their positions (`img_ids`, `txt_ids`).

Guidance as the model was distilled: [dev] takes the guidance scale as an input embedding, one
transformer call per step and no classifier-free guidance; [schnell] has no guidance input and
runs with guidance_scale 1. The sampler sees unpacked latents (b, c, h, w); the denoiser packs
before the call and unpacks the velocity (a permutation, so the chain's arithmetic is the
pipeline's). Prompts are encoded by the stock `FluxPipeline.encode_prompt` on the same modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayreward.families import Components, Conditioning, Family, quiet_loading


@dataclass(frozen=True)
class Flux(Family):
    max_sequence_length: int = 512  # T5 tokens, FluxPipeline's default
    default_sample_size: int = 128  # the pipeline's: native side = this x the VAE factor

    def detects(self, index: dict) -> bool:
        cls = str(index.get("_class_name", ""))
        return cls.startswith("Flux") and not cls.startswith("Flux2")

    def load(self, src: str, model_cfg, kw: dict):
        from diffusers import FluxPipeline

        with quiet_loading():
            pipe = FluxPipeline.from_pretrained(src, variant=model_cfg.variant, **kw)
        c = Components(pipe.transformer, pipe.vae, [pipe.text_encoder, pipe.text_encoder_2],
                       [pipe.tokenizer, pipe.tokenizer_2], pipe.scheduler, self.name, src)
        c.stock = pipe
        return c

    def encode(self, c, prompts, negative_prompt, resolution, device):
        with torch.no_grad():
            embeds, pooled, text_ids = self.pipeline(c).encode_prompt(
                prompt=list(prompts), prompt_2=None, device=device, max_sequence_length=self.max_sequence_length)
        # guidance-distilled: no negative branch (the negative prompt is not used)
        return Conditioning(embeds, embeds, pooled, pooled, ids=text_ids, family=self.name)

    def denoiser(self, network, cond, guidance_scale, dtype, uncond_grad=True):  # no CFG: uncond_grad moot
        n_prompts = cond.embeds.shape[0]
        distilled = bool(network.config.guidance_embeds)
        cache: dict[tuple, tuple] = {}  # (batch, h, w) -> the call's inputs besides x and t

        def inputs(b: int, h: int, w: int, device):
            """The conditioning, the token positions and the guidance of a batch layout, built once."""
            key = (b, h, w)
            if key not in cache:
                reps = b // n_prompts
                ids_dtype = torch.float32 if dtype is None else dtype

                def rep(v):
                    return v.repeat(reps, *([1] * (v.dim() - 1))).to(ids_dtype)
                img_ids = torch.zeros(h // 2, w // 2, 3, device=device)
                img_ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
                img_ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
                guidance = torch.full((b,), float(guidance_scale), device=device) if distilled else None
                cache[key] = (rep(cond.embeds), rep(cond.pooled), cond.ids.to(device, ids_dtype),
                              img_ids.reshape(-1, 3).to(ids_dtype), guidance)
            return cache[key]

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            b, ch, h, w = x.shape
            emb, pooled, txt_ids, img_ids, guidance = inputs(b, h, w, x.device)
            x = x if dtype is None else x.to(dtype)
            tokens = x.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, ch * 4)
            out = network(hidden_states=tokens, timestep=t.expand(b).to(tokens.dtype) / 1000, guidance=guidance,
                          pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=img_ids,
                          return_dict=False)[0]
            out = out.view(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)
            return out.float()

        return denoise

    def schedule(self, c, num_steps, resolution):
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        from rayreward.sampling import Schedule

        sc = c.scheduler.config
        side = resolution // c.vae_scale_factor // 2  # tokens per side after packing
        mu = calculate_shift(side * side, sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                             sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
        sigmas = None if sc.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        return Schedule.from_scheduler(c.scheduler, num_steps, sigmas=sigmas, mu=mu)

    def latent_channels(self, c) -> int:
        return int(c.denoiser.config.in_channels) // 4

    def resolution_multiple(self, vae_scale_factor, denoiser_config):
        return vae_scale_factor * 2  # latents are packed 2x2

    def native_side(self, vae_scale_factor, denoiser_config):
        return self.default_sample_size * vae_scale_factor

    def check(self, cfg, denoiser_config: dict | None = None, index: dict | None = None) -> list[str]:
        p = super().check(cfg, denoiser_config, index)
        if denoiser_config is not None and not denoiser_config.get("guidance_embeds") and cfg.sampling.guidance_scale != 1:
            p.append(f"sampling.guidance_scale: {cfg.sampling.guidance_scale} is not allowed for {cfg.model.name!r}: "
                     "a FLUX.1 model without a guidance input ([schnell]) runs without guidance; need 1")
        return p

    def pipeline(self, c):
        from diffusers import FluxPipeline

        if getattr(c, "stock", None) is None or c.stock.transformer is not c.denoiser:
            c.stock = FluxPipeline(transformer=c.denoiser, scheduler=c.scheduler, vae=c.vae,
                                   text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                                   text_encoder_2=c.text_encoders[1], tokenizer_2=c.tokenizers[1])
        return c.stock


# diffusers' DreamBooth LoRA script for FLUX: attention of both streams and the feed-forwards
FAMILY = Flux("flux", "FluxPipeline", "transformer", "FluxTransformer2DModel", "transformer", flow=True,
              tags=("flux",),
              default_targets=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                               "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                               "ff_context.net.0.proj", "ff_context.net.2"))
