"""Model families, one module each: how a family loads, encodes prompts, calls its denoiser,
schedules its chain and maps latents to images. The sampler and the methods are the same for all.

| family | module | denoiser | chain | guidance |
|---|---|---|---|---|
| `sd` (SD 1.x/2.x) | `sd.py` | UNet2DConditionModel | DDIM (epsilon or v) | CFG |
| `sdxl` | `sdxl.py` | UNet2DConditionModel + pooled text, time ids | DDIM | CFG |
| `sd3` (SD3, SD3.5) | `sd3.py` | SD3Transformer2DModel | flow-matching Euler, shift | CFG |
| `flux` (FLUX.1 dev, schnell) | `flux.py` | FluxTransformer2DModel, 2x2 packed tokens | flow-matching Euler, mu from the token count | distilled: guidance embedding, one call |
| `flux2` (FLUX.2 klein) | `flux2.py` | Flux2Transformer2DModel on Qwen3, patchified latents | flow-matching Euler, empirical mu | base: CFG; distilled: one call |

A family is detected from a pipeline folder's `model_index.json` (`_class_name`, then its
components: each family's `detects`); `model.flavour` names one to skip detection. Adding a
family is one module here with a `Family` subclass as `FAMILY`, its name in `NAMES`, and its
test (a tiny model of it is one builder in `rayreward/tiny.py`): the trainer, `sample`, `eval`,
the LoRA files and the budget check read everything from the `Family`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

    from rayreward.sampling import Denoiser, Schedule


# ---------------------------------------------------------------------------------------------
# What a family loads and what its prompt encoding gives.


@dataclass
class Components:
    denoiser: "torch.nn.Module"  # the network of the chain: a UNet (SD, SDXL) or a transformer (SD3)
    vae: "torch.nn.Module"
    text_encoders: list  # SD: [CLIP]; SDXL: [CLIP, CLIP with projection]; SD3: [CLIP, CLIP, T5 or None]
    tokenizers: list
    scheduler: object  # diffusers DDIMScheduler (SD, SDXL) or FlowMatchEulerDiscreteScheduler (SD3)
    flavour: str  # the model family: a key of rayreward.families (sd, sdxl, sd3)
    source: str  # the folder or hub id it came from
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt is a zero embedding
    stock: object = None  # the family's stock pipeline on these modules, once built (families.Family.pipeline)

    @property
    def family(self) -> "Family":
        return get(self.flavour)

    @property
    def unet(self) -> "torch.nn.Module":
        """The denoiser under its SD / SDXL name."""
        return self.denoiser

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device, dtype=None, text_encoders: bool = True) -> "Components":
        """Move the models to `device` (the frozen ones to `dtype` too; LoRA parameters stay fp32).
        `text_encoders` False leaves them where they are (model.offload_text_encoders: on the CPU)."""
        encoders = [e for e in self.text_encoders if e is not None] if text_encoders else []
        for m in [self.denoiser, self.vae, *encoders]:
            m.to(device)
        if dtype is not None:
            for m in [self.vae, *encoders]:
                m.to(dtype)
        return self


@dataclass
class Conditioning:
    """Text conditioning of a batch. Shape: embeds (b, L, D); pooled (b, P) (SDXL, SD3), time_ids
    (b, 6) (SDXL). `family`: whose denoiser reads it."""

    embeds: "torch.Tensor"
    neg_embeds: "torch.Tensor"
    pooled: "torch.Tensor | None" = None
    neg_pooled: "torch.Tensor | None" = None
    time_ids: "torch.Tensor | None" = None
    family: str = "sd"
    ids: "torch.Tensor | None" = None  # FLUX: the text tokens' positions (txt_ids)


# ---------------------------------------------------------------------------------------------
# The family interface.


@dataclass(frozen=True)
class Family:
    """What differs between model families. Subclasses override the methods; the fields are data."""

    name: str
    pipeline_class: str  # the stock diffusers pipeline: LoRA files, model cards, parity tests
    denoiser_folder: str  # the pipeline folder's denoiser: "unet" or "transformer"
    denoiser_class: str  # its diffusers class
    lora_prefix: str  # the key prefix of its LoRA files ("unet." / "transformer.")
    flow: bool  # a flow-matching chain (no eta, no v-prediction)
    tags: tuple[str, ...] = ()  # model card tags
    default_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' LoRA scripts'

    # -- what each family implements -----------------------------------------------------------
    def detects(self, index: dict) -> bool:
        """Whether a pipeline folder (its model_index.json) is of this family; exactly one family
        answers yes for a folder rayreward can load."""
        raise NotImplementedError

    def load(self, src: str, model_cfg, kw: dict) -> "Components":
        raise NotImplementedError

    def encode(self, c: "Components", prompts: Sequence[str], negative_prompt: str, resolution: int,
               device) -> "Conditioning":
        raise NotImplementedError

    def denoiser(self, network, cond: "Conditioning", guidance_scale: float, dtype,
                 uncond_grad: bool = True) -> "Denoiser":
        raise NotImplementedError

    def schedule(self, c: "Components", num_steps: int, resolution: int) -> "Schedule":
        from rayreward.sampling import Schedule

        return Schedule.from_scheduler(c.scheduler, num_steps)

    def latent_channels(self, c: "Components") -> int:
        return int(c.denoiser.config.in_channels)

    def latent_side(self, c: "Components", resolution: int) -> int:
        """The side of the chain's latents for an image side of `resolution` pixels."""
        return resolution // c.vae_scale_factor

    def decode(self, c: "Components", latents: "torch.Tensor") -> "torch.Tensor":
        """The chain's latents -> images in [0, 1], differentiable."""
        return vae_decode(c.vae, latents)

    def resolution_multiple(self, vae_scale_factor: int, denoiser_config: dict) -> int:
        """Sides must be a multiple of this (the VAE factor, times a transformer's patch size)."""
        return vae_scale_factor * int(denoiser_config.get("patch_size", 1) or 1)

    def native_side(self, vae_scale_factor: int, denoiser_config: dict) -> int:
        return int(denoiser_config["sample_size"]) * vae_scale_factor

    def pipeline(self, c: "Components"):
        """The stock pipeline on the same modules (nothing is copied)."""
        raise NotImplementedError

    def check(self, cfg, denoiser_config: dict | None = None, index: dict | None = None) -> list[str]:
        """Problems with settings this family (and this model of it: its denoiser's config, its
        model_index.json) does not have, as 'field: value ...; allowed ...' lines."""
        if not self.flow:
            return []
        p = []
        if cfg.sampling.eta != 0:
            p.append(f"sampling.eta: {cfg.sampling.eta} is not allowed for {cfg.model.name!r} ({self.name}, a "
                     "flow-matching model): its Euler chain is an ODE with no step noise; need 0")
        return p


def vae_decode(vae, latents: "torch.Tensor") -> "torch.Tensor":
    """Latents -> images in [0, 1] through the VAE's scaling and shift factors (SD, SDXL, SD3,
    FLUX.1). Shape: (b, c, h, w) -> (b, 3, h * f, w * f). Differentiable."""
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    dtype = next(vae.parameters()).dtype
    images = vae.decode((latents / scale + shift).to(dtype)).sample.float()
    return (images / 2 + 0.5).clamp(0, 1)


@contextlib.contextmanager
def quiet_loading():
    """No "Loading pipeline components" bar: the run prints one line when its model is loaded."""
    from diffusers.utils import logging as dlog

    was = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            dlog.enable_progress_bar()


# The families, each the module rayreward/families/<name>.py holding a `FAMILY`: adding one is its
# module and its name here (config validation reads this tuple without importing the modules).
NAMES = ("sd", "sdxl", "sd3", "flux", "flux2")


def _registry() -> dict[str, Family]:
    import importlib

    return {name: importlib.import_module(f"rayreward.families.{name}").FAMILY for name in NAMES}  # FAMILIES' keys, without importing the modules (config validation stays light)


def get(name: str) -> Family:
    families = _registry()
    if name not in families:
        raise ValueError(f"model family {name!r} is unknown; allowed: {', '.join(families)}")
    return families[name]


def detect(index: dict) -> str:
    """The family of a pipeline folder from its model_index.json: the one whose `detects` says so."""
    found = [name for name, f in _registry().items() if f.detects(index)]
    if len(found) == 1:
        return found[0]
    cls = str(index.get("_class_name", ""))
    raise ValueError(f"a {cls or 'pipeline'} with components {sorted(k for k in index if not k.startswith('_'))} "
                     + (f"is not a family rayreward knows ({', '.join(NAMES)})" if not found else
                        f"matches several families ({', '.join(found)}); set model.flavour"))
