"""Stable Diffusion 3 / 3.5: an SD3Transformer2DModel (MMDiT) on two CLIP encoders and T5-XXL
(optional: without it the T5 part is zeros, as the stock pipeline does), a flow-matching Euler
chain with the scheduler's shift, true classifier-free guidance (both branches in one call).

Prompts are encoded by the stock `StableDiffusion3Pipeline.encode_prompt` on the same modules,
so the embeddings are the pipeline's by construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayreward.families import Components, Conditioning, Family, quiet_loading
from rayreward.families.sd import cfg_denoiser


@dataclass(frozen=True)
class SD3(Family):
    max_sequence_length: int = 256  # T5 tokens, the pipeline's default

    def detects(self, index: dict) -> bool:
        return "StableDiffusion3" in str(index.get("_class_name", "")) or ("transformer" in index
                                                                           and "text_encoder_3" in index)

    def load(self, src: str, model_cfg, kw: dict):
        from diffusers import StableDiffusion3Pipeline

        with quiet_loading():
            pipe = StableDiffusion3Pipeline.from_pretrained(src, variant=model_cfg.variant, **kw)
        c = Components(pipe.transformer, pipe.vae, [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
                       [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3], pipe.scheduler, self.name, src)
        c.stock = pipe
        return c

    def encode(self, c, prompts, negative_prompt, resolution, device):
        with torch.no_grad():
            embeds, neg, pooled, neg_pooled = self.pipeline(c).encode_prompt(
                prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=True,
                negative_prompt=[negative_prompt] * len(prompts), max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds, neg, pooled, neg_pooled, family=self.name)

    def denoiser(self, network, cond, guidance_scale, dtype, uncond_grad=True):
        def call(x, t, emb, pooled):
            return network(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=emb,
                           pooled_projections=pooled, return_dict=False)[0]

        return cfg_denoiser(cond, guidance_scale, dtype, call, uncond_grad)

    def schedule(self, c, num_steps, resolution):
        from rayreward.sampling import Schedule

        sc = c.scheduler.config
        mu = None
        if sc.get("use_dynamic_shifting"):  # as StableDiffusion3Pipeline computes it
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            side = resolution // c.vae_scale_factor // c.denoiser.config.patch_size
            mu = calculate_shift(side * side, sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                                 sc.get("base_shift", 0.5), sc.get("max_shift", 1.16))
        return Schedule.from_scheduler(c.scheduler, num_steps, mu=mu)

    def pipeline(self, c):
        from diffusers import StableDiffusion3Pipeline

        if getattr(c, "stock", None) is None or c.stock.transformer is not c.denoiser:
            c.stock = StableDiffusion3Pipeline(
                transformer=c.denoiser, scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoders[0],
                tokenizer=c.tokenizers[0], text_encoder_2=c.text_encoders[1], tokenizer_2=c.tokenizers[1],
                text_encoder_3=c.text_encoders[2], tokenizer_3=c.tokenizers[2])
        return c.stock


# diffusers' DreamBooth LoRA script for SD3 targets the joint attention's projections, both streams
FAMILY = SD3("sd3", "StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel", "transformer", flow=True,
             tags=("sd3", "sd3.5"),
             default_targets=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                              "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"))
