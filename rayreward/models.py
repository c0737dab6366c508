"""diffusers components shared by every model family: loading (hub id or local folder, the
family detected from model_index.json), the prompt conditioning, the denoiser, decoding, LoRA.

What differs between families (SD 1.x/2.x, SDXL, SD3/SD3.5) lives in `rayreward/families/`,
one module each; the functions here dispatch to the family of the components. The built-in
tiny models (`rayreward.tiny`) are real pipeline folders in the cache, loaded like any local
model; the shipped `shapes` model is one in the package. LoRA files are in `rayreward.lora_io`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rayreward import families, hub, tiny
from rayreward.families import Components, Conditioning  # noqa: F401  (what a family loads and encodes)
from rayreward.errors import ModelLoadError, first_line
from rayreward.sampling import Denoiser


# ---------------------------------------------------------------------------------------------
# Loading.


ASSETS = Path(__file__).parent / "assets"
# the shipped shapes models (rayreward pretrain): `shapes` draws a caption where it says (the
# quickstart's), `shapes-layout` also draws captions without a place anywhere, from the noise
SHAPES_MODELS = {"shapes": ASSETS / "shapes-model", "shapes-layout": ASSETS / "shapes-layout-model"}


def resolve_source(model_cfg) -> str:
    if model_cfg.name in SHAPES_MODELS:
        folder = SHAPES_MODELS[model_cfg.name]
        if not tiny.complete(folder):
            raise ModelLoadError(f"model.name: {model_cfg.name!r}: the built-in model is missing from {folder} (an "
                                 "install without the package data?); reinstall rayreward, or train one with "
                                 "`rayreward pretrain --out DIR` and set model.name to DIR")
        return str(folder)
    if model_cfg.name == "tiny":
        return str(tiny.folder("sd", model_cfg.seed))
    if model_cfg.name in ("tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2"):
        return str(tiny.folder(model_cfg.name.removeprefix("tiny-"), model_cfg.seed))
    return str(Path(model_cfg.name).expanduser()) if Path(model_cfg.name).expanduser().is_dir() else model_cfg.name


def load_components(model_cfg) -> Components:
    """The denoiser, VAE, text encoder(s), tokenizer(s) and scheduler from `model.name`, as its
    family (`model.flavour`, or detected from model_index.json) loads them."""
    from diffusers import DiffusionPipeline

    src = resolve_source(model_cfg)
    local_only = not Path(src).is_dir() and hub.offline()
    kw = dict(revision=model_cfg.revision, local_files_only=local_only)
    try:
        index = DiffusionPipeline.load_config(src, **kw)
        name = families.detect(index) if model_cfg.flavour == "auto" else model_cfg.flavour
        c = families.get(name).load(src, model_cfg, kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"model.name={model_cfg.name!r}: could not load the diffusers pipeline from {src!r} ({type(e).__name__}: "
            f"{first_line(e)}){'; ' + hub.why_offline() if local_only else ''}. Set "
            "model.name to a local diffusers folder, or make the hub reachable (HF_HUB_OFFLINE unset) or its files "
            "present in the hub cache."
        ) from None
    c.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", c.flavour == "sdxl"))
    for m in [c.denoiser, c.vae, *c.text_encoders]:
        if m is not None:
            m.eval().requires_grad_(False)
    return c


# ---------------------------------------------------------------------------------------------
# Prompts, the guided denoiser, decoding.


def encode_prompts(c: Components, prompts: Sequence[str], negative_prompt: str, resolution: int, device) -> Conditioning:
    """Prompt embeddings as the family's stock pipeline computes them (no gradient)."""
    return c.family.encode(c, prompts, negative_prompt, resolution, device)


class PromptCache:
    """Prompt embeddings computed once per prompt: a batch encodes only the prompts it has not
    seen (in one call), the rest are read back. Keyed by (prompt, negative prompt, resolution)
    for one model (a worker's); at most `max_prompts` are kept (least recently used go first), so
    a long prompt file cannot fill the memory. `device`: where the text encoders run (the CPU
    when they are offloaded); the embeddings are moved to `target`."""

    def __init__(self, c: Components, device, target, max_prompts: int = 4096):
        import collections

        self.c, self.device, self.target, self.max = c, device, target, max_prompts
        self.rows: collections.OrderedDict = collections.OrderedDict()
        self.calls = 0  # encoder calls made (tests and the console)

    FIELDS = ("embeds", "neg_embeds", "pooled", "neg_pooled", "time_ids")

    def __call__(self, prompts: Sequence[str], negative_prompt: str, resolution: int) -> Conditioning:
        keys = [(p, negative_prompt, resolution) for p in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self.rows))
        if missing:
            self.calls += 1
            got = encode_prompts(self.c, [k[0] for k in missing], negative_prompt, resolution, self.device)
            for i, k in enumerate(missing):
                row = {f: None if getattr(got, f) is None else getattr(got, f)[i:i + 1].to(self.target)
                       for f in self.FIELDS}
                row["ids"] = None if got.ids is None else got.ids.to(self.target)
                row["family"] = got.family
                self.rows[k] = row
        for k in keys:
            self.rows.move_to_end(k)
        rows = [self.rows[k] for k in keys]
        while len(self.rows) > max(self.max, len(set(keys))):
            self.rows.popitem(last=False)
        cat = {f: None if rows[0][f] is None else torch.cat([r[f] for r in rows]) for f in self.FIELDS}
        return Conditioning(**cat, family=rows[0]["family"], ids=rows[0]["ids"])


def make_denoiser(network: torch.nn.Module, cond: Conditioning, guidance_scale: float,
                  dtype: torch.dtype | None = None, uncond_grad: bool = True) -> Denoiser:
    """denoise(x_t, t) -> guided model output, in fp32, as the family of `cond` calls its network
    (`network`: the denoiser, or its torch.compile). `dtype`: the network's weight dtype when it is
    not fp32 (families.sd.cfg_denoiser says why there is no autocast); `uncond_grad` False runs
    CFG's unconditional branch without gradient (sampling.uncond_grad)."""
    return families.get(cond.family).denoiser(network, cond, guidance_scale, dtype, uncond_grad)


def make_schedule(c: Components, num_steps: int, resolution: int):
    """The family's chain of `num_steps` positions (DDIM, or flow-matching Euler with its shift)."""
    return c.family.schedule(c, num_steps, resolution)


def compile_unet(unet: torch.nn.Module, mode: str) -> torch.nn.Module:
    """The UNet to call in the chain: itself ("off"), or torch.compile of it in `mode`. The
    compiled module shares the UNet's parameters (LoRA included), which AdamW updates in place,
    so a compiled graph (or a CUDA graph of "reduce-overhead") sees every update without a
    recompile; saving and loading LoRAs still go through the UNet itself."""
    if mode == "off":
        return unet
    return torch.compile(unet, mode=mode, dynamic=False)


decode = families.vae_decode  # latents -> images through a VAE's scaling and shift


def decode_latents(c: Components, latents: torch.Tensor) -> torch.Tensor:
    """The chain's latents -> images in [0, 1], as the family decodes them. Differentiable."""
    return c.family.decode(c, latents)


def initial_noise(seeds: Sequence[int], c: Components, resolution: int, device) -> torch.Tensor:
    """x_T, one seeded draw per sample (CPU generator: the same on every device)."""
    h = c.family.latent_side(c, resolution)
    ch = c.family.latent_channels(c)
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
