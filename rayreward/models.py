"""diffusers components: loading (hub id or local folder), the tiny family, prompts, LoRA.

SD 1.x/2.x and SDXL load through the same code path. The built-in `tiny` / `tiny-sdxl` models
are the same classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel(+WithProjection),
CLIPTokenizer), random-initialised from a seed and saved once as a real diffusers pipeline folder
in the cache, then loaded like any local model: nothing is downloaded.
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

from rayreward import hub
from rayreward.runtime import first_line
from rayreward.sampling import Denoiser

TINY_VERSION = 1  # bump when the tiny architecture changes, so caches are rebuilt
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the source and the config key."""


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
# The tiny family.


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


def _tiny_tokenizer(folder: Path, max_length: int = 32):
    """A CLIPTokenizer whose vocabulary is the byte alphabet (each char, and char + '</w>')."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def build_tiny_pipeline(flavour: str, seed: int):
    """Random-initialised tiny SD-1.x ('sd') or SDXL ('sdxl') pipeline of the real classes."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        tok = _tiny_tokenizer(Path(tmp) / "tok")
        text_cfg = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                        vocab_size=len(tok), max_position_embeddings=tok.model_max_length, projection_dim=32,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
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
        if flavour != "sdxl":
            raise ValueError(f"tiny model flavour {flavour!r} is unknown; allowed: sd, sdxl")
        # cross attention sees both encoders' hidden states (32 + 32); the added embedding sees
        # 6 time ids * 8 + the pooled projection (32)
        unet = UNet2DConditionModel(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True, **unet_cfg)
        te1 = CLIPTextModel(CLIPTextConfig(**text_cfg))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=scheduler)


def cache_dir() -> Path:
    return Path(os.environ.get("RAYREWARD_CACHE", Path.home() / ".cache" / "rayreward"))


def format_tag() -> str:
    """The library versions that decide the saved files' layout (transformers 4 and 5 name CLIP's
    weights differently): part of every tiny-model cache name, so a cache written under another
    stack is not read back."""
    import diffusers
    import transformers

    return f"tf{transformers.__version__.split('.')[0]}-df{'.'.join(diffusers.__version__.split('.')[:2])}"


def _complete(folder: Path) -> bool:
    """Every component of the pipeline folder has its config and weights."""
    if not (folder / "model_index.json").is_file():
        return False
    weights = {"unet", "vae", "text_encoder", "text_encoder_2"}
    index = json.loads((folder / "model_index.json").read_text())
    return all(any((folder / name).glob("*.safetensors")) for name in index if name in weights)


def tiny_model_dir(flavour: str, seed: int) -> Path:
    """The cached folder of a tiny pipeline, built on first use (atomic: safe with many workers)."""
    target = cache_dir() / f"tiny-{flavour}-seed{seed}-v{TINY_VERSION}-{format_tag()}"
    if _complete(target):
        return target
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # transformers' save_pretrained writes weights from distributed rank 0 only: inside a
        # worker group, build in a fresh interpreter that has no process group
        subprocess.run([sys.executable, "-m", "rayreward.models", flavour, str(seed)], check=True)
        if not _complete(target):
            raise ModelLoadError(f"the tiny model's build in a subprocess left {target} incomplete")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    build_tiny_pipeline(flavour, seed).save_pretrained(tmp)
    if not _complete(tmp):
        raise ModelLoadError(f"the tiny model's build left {tmp} incomplete (is the disk full?)")
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Loading.


SHAPES_MODEL = Path(__file__).parent / "assets" / "shapes-model"  # `model.name: shapes` (rayreward pretrain)


def resolve_source(model_cfg) -> str:
    if model_cfg.name == "shapes":
        if not _complete(SHAPES_MODEL):
            raise ModelLoadError(f"model.name: 'shapes': the built-in model is missing from {SHAPES_MODEL} (an "
                                 "install without the package data?); reinstall rayreward, or train one with "
                                 "`rayreward pretrain --out DIR` and set model.name to DIR")
        return str(SHAPES_MODEL)
    if model_cfg.name == "tiny":
        return str(tiny_model_dir("sd", model_cfg.seed))
    if model_cfg.name == "tiny-sdxl":
        return str(tiny_model_dir("sdxl", model_cfg.seed))
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


def _pipeline_class(flavour: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if flavour == "sdxl" else StableDiffusionPipeline


class LoraFileError(ValueError):
    """A LoRA file that cannot be used as asked: non-finite, or not fitting the model."""


def _check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise LoraFileError(f"{what}: {len(bad)} of {len(state)} LoRA tensors hold NaN or inf (first: {bad[0]}); "
                            "a non-finite LoRA renders black images. Use an earlier checkpoint "
                            "(OUTPUT_DIR/ray/NAME/checkpoint_*/lora) or a lower optim.lr")


def save_lora(unet: torch.nn.Module, folder: str | os.PathLike, flavour: str, adapter_name: str = "default") -> Path:
    """Write `pytorch_lora_weights.safetensors` (rank and alpha in its metadata), so a stock
    pipeline's `load_lora_weights(folder)` loads it.

    Every key is in peft's naming (`unet.<module>.lora_A.weight` / `lora_B`), for every target
    module type. The older diffusers naming (`lora.down` / `lora.up`) is not used because
    diffusers' converter renames only some module types (attention projections, not
    convolutions), and its loader picks one naming from the file's first key: a mixed file
    loaded with part of its weights silently unused. A non-finite LoRA is refused."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    _check_finite(state, f"saving the LoRA to {str(folder)!r}")
    meta = unet.peft_config[adapter_name].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    Path(folder).mkdir(parents=True, exist_ok=True)
    _pipeline_class(flavour).save_lora_weights(str(folder), unet_lora_layers=state, unet_lora_adapter_metadata=meta,
                                               safe_serialization=True)
    return Path(folder) / LORA_WEIGHT_NAME


def lora_file(path: str | os.PathLike) -> Path:
    """The safetensors file of a LoRA given as a file or a folder; a clear error otherwise."""
    p = Path(path).expanduser()
    f = p / LORA_WEIGHT_NAME if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"LoRA {str(path)!r}: no such file (expected a folder holding {LORA_WEIGHT_NAME} or a .safetensors file)")
    if f.suffix != ".safetensors":
        raise LoraFileError(f"LoRA {str(path)!r}: only .safetensors LoRA files are loaded (no pickled checkpoints)")
    return f


def read_lora_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A LoRA file's UNet tensors in peft naming (`<module>.lora_A.weight`), checked finite.
    Files in the older diffusers naming (`lora.down`/`lora.up`, also mixed) are converted."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = lora_file(path)
    try:
        state = load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise LoraFileError(f"LoRA {str(path)!r}: {f} is not a readable safetensors file ({e})") from None
    state = {k.removeprefix("unet."): v for k, v in state.items() if not k.startswith(("text_encoder", "te_"))}
    if not state:
        raise LoraFileError(f"LoRA {str(path)!r}: {f} holds no UNet LoRA weights")
    _check_finite(state, f"LoRA {str(path)!r}")
    # converted key by key, so a file mixing both namings is read whole
    out = {}
    for k, v in state.items():
        out.update(convert_unet_state_dict_to_peft({k: v}))
    return out


def _assert_all_used(unet: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str, path) -> None:
    """Every tensor of the file must now sit in the adapter, equal: peft only warns about keys
    it could not place, which would leave part of a LoRA silently unused."""
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    unused = [k for k, v in state.items() if k not in loaded or loaded[k].shape != v.shape
              or not torch.equal(loaded[k].detach().float().cpu(), v.float())]
    if unused:
        raise LoraFileError(f"LoRA {str(path)!r} does not fit this model: {len(unused)} of {len(state)} saved tensors "
                            f"were not loaded (first: {unused[0]}). Was it trained on another base model or with "
                            "other lora.target_modules?")
    missing = [k for k in loaded if k not in state]
    if missing:
        raise LoraFileError(f"LoRA {str(path)!r} does not fit this model: it has no weights for {len(missing)} of "
                            f"the adapter's tensors (first: {missing[0]}); lora.rank or lora.target_modules differ")


def load_lora(unet: torch.nn.Module, path: str | os.PathLike, adapter_name: str) -> None:
    """Add the LoRA at `path` to the UNet as a new adapter; every saved weight must be used."""
    state = read_lora_state(path)
    _check_shapes(unet, state, path)
    unet.load_lora_adapter({f"unet.{k}": v for k, v in state.items()}, prefix="unet", adapter_name=adapter_name,
                           metadata=_lora_metadata(path))
    _assert_all_used(unet, state, adapter_name, path)


def _check_shapes(unet: torch.nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """Each saved lora_A/lora_B must fit its module's input/output size (a LoRA of another base
    model would fail deep inside peft with a list of every mismatch)."""
    modules = dict(unet.named_modules())
    for key, v in state.items():
        name, _, kind = key.rpartition(".lora_")
        m = modules.get(name)
        if m is None:
            raise LoraFileError(f"LoRA {str(path)!r} does not fit this model: it has weights for {name!r}, which "
                                "this UNet does not have. Was it trained on another base model?")
        base = getattr(m, "base_layer", m)
        fan_in = getattr(base, "in_features", getattr(base, "in_channels", None))
        fan_out = getattr(base, "out_features", getattr(base, "out_channels", None))
        want = fan_in if kind.startswith("A") else fan_out
        got = v.shape[1] if kind.startswith("A") else v.shape[0]
        if want is not None and (got != want or v.dim() != (4 if isinstance(base, torch.nn.Conv2d) else 2)):
            raise LoraFileError(f"LoRA {str(path)!r} does not fit this model: {key} has shape {tuple(v.shape)}, "
                                f"but {name} is a {type(base).__name__} of {fan_in} -> {fan_out}. Was it trained on "
                                "another base model?")


def _lora_metadata(path) -> dict | None:
    """The adapter config saved in the file's metadata (rank, alpha, targets), if any."""
    from safetensors import safe_open

    with safe_open(str(lora_file(path)), framework="pt") as f:
        meta = f.metadata() or {}
    raw = meta.get("lora_adapter_metadata")
    return json.loads(raw) if raw else None  # keys "unet.r", ...: the loader strips its prefix


def load_lora_weights_into(unet: torch.nn.Module, source: str | os.PathLike | dict, adapter_name: str = "default",
                           what: str = "checkpoint") -> None:
    """Copy saved LoRA weights (a file/folder, or a state already read by `read_lora_state`) into
    an existing adapter (resume); names and shapes must match, every tensor must be used."""
    from peft.utils import set_peft_model_state_dict

    state, path = (source, what) if isinstance(source, dict) else (read_lora_state(source), source)
    _check_shapes(unet, state, path)
    set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    _assert_all_used(unet, state, adapter_name, path)


def apply_loras(unet: torch.nn.Module, loras: Sequence[tuple[str, float]]) -> list[str]:
    """Load several LoRAs and activate them with weights: one LoRA with weight s interpolates
    base (0) <-> tuned (1); several are mixed as a weighted sum of their updates."""
    names = []
    for i, (path, _) in enumerate(loras):
        names.append(f"lora{i}")
        load_lora(unet, path, names[-1])
    if names:
        unet.set_adapters(names, [float(w) for _, w in loras])
    return names


if __name__ == "__main__":  # python -m rayreward.models {sd|sdxl} SEED: build a tiny model's cache
    print(tiny_model_dir(sys.argv[1], int(sys.argv[2])))
