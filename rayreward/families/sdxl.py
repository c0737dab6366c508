"""SDXL: the SD UNet with two CLIP encoders (hidden states concatenated), the second's pooled
embedding and six time ids as added conditioning; an empty negative prompt is a zero embedding
when the pipeline says so (`force_zeros_for_empty_prompt`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayreward.families import Conditioning
from rayreward.families.sd import SD


@dataclass(frozen=True)
class SDXL(SD):
    def detects(self, index: dict) -> bool:
        return "unet" in index and ("text_encoder_2" in index or "XL" in str(index.get("_class_name", "")))

    def encode(self, c, prompts, negative_prompt, resolution, device):
        embeds, pooled = self._encode(c, prompts, device)
        if c.force_zeros_for_empty_prompt and not negative_prompt:
            neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            neg, neg_pooled = self._encode(c, [negative_prompt] * len(prompts), device)
        # original size, crop top-left, target size
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device,
                                dtype=embeds.dtype).repeat(len(prompts), 1)
        return Conditioning(embeds, neg, pooled, neg_pooled, time_ids, family=self.name)

    def pipeline(self, c):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoders[0], text_encoder_2=c.text_encoders[1],
                                         tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1], unet=c.denoiser,
                                         scheduler=c.scheduler, force_zeros_for_empty_prompt=c.force_zeros_for_empty_prompt)


FAMILY = SDXL("sdxl", "StableDiffusionXLPipeline", "unet", "UNet2DConditionModel", "unet", flow=False,
              tags=("stable-diffusion-xl",))
