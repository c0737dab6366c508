"""What a run asks of its model and its device, checked on the driver before Ray starts.

Validation (`config.validate`) knows the fields; this module knows the model too. From the
pipeline folder's configs alone (the denoiser is built on torch's `meta` device: no weights are
read, no memory is taken) it refuses:

- LoRA targets that match no module of the denoiser, and a rank above the smallest width among
  the matched layers (the update of a layer of width w has rank <= w: a larger r only costs memory);
- a resolution that the VAE (and a transformer's patches) cannot map to whole latents, or above
  4x the model's native side; a setting the model's family does not have (eta on a flow chain);
- a step whose memory, at least, exceeds the device's: weights, the LoRA with its gradient and
  AdamW state, and the decoder's full-resolution activations of the batch (the part that grows
  with batch and resolution). The estimate is a lower bound: a run it refuses cannot fit; one it
  accepts may still not (the denoiser's own activations are not counted).

A model this machine does not hold (a hub id not in the cache) is not checked here; the workers
load it and fail, if at all, with the loader's message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rayreward.errors import ConfigError

GiB = 1024**3
MAX_NATIVE_FACTOR = 4  # resolution <= this x the model's native side
# when the device a worker will get is not visible from the driver: no accelerator has more
# (B300: 288 GB), no CPU node of a cluster has more than this many bytes of RAM
UNKNOWN_GPU_BYTES = 288 * 10**9
UNKNOWN_NODE_BYTES = 4 * 1024**4


@dataclass
class Skeleton:
    """The parts of a model that decide what a step costs, read from its configs."""

    denoiser: object  # torch.nn.Module on the meta device
    family: object  # rayreward.families.Family
    multiple: int  # image sides must be a multiple of this (the VAE factor x a transformer's patch)
    vae_scale_factor: int
    vae_channels: int  # channels of the decoder's last (full-resolution) block
    native: int  # the model's native image side, in pixels
    weight_bytes: int  # the pipeline folder's weight files (0 when unknown)
    index: dict | None = None  # its model_index.json


_SKELETONS: dict[tuple, Skeleton] = {}  # read once per process (a reused Tune trial actor checks many trials)


def _stamp(src: str) -> tuple:
    """What a cached skeleton was read from: the model folder's config files and their times."""
    folder = Path(src)
    if not folder.is_dir():
        return ()
    return tuple(sorted((str(f.relative_to(folder)), f.stat().st_mtime_ns) for f in folder.glob("**/*.json")))


def skeleton(model_cfg) -> Skeleton | None:
    """The model's skeleton from its folder (or the hub cache), None when its configs are not here.
    Kept per process for the same folder and config files."""
    from rayreward import models

    try:
        src = models.resolve_source(model_cfg)
    except (OSError, ValueError):
        return None
    key = (str(src), model_cfg.revision, model_cfg.flavour, _stamp(src))
    if key not in _SKELETONS:
        sk = _read_skeleton(model_cfg, src)
        if sk is None:
            return None
        _SKELETONS[key] = sk
    return _SKELETONS[key]


def _read_skeleton(model_cfg, src) -> Skeleton | None:
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DiffusionPipeline

    from rayreward import families, hub

    try:
        kw = dict(revision=model_cfg.revision, local_files_only=not Path(src).is_dir() or hub.offline())
        index = DiffusionPipeline.load_config(src, **kw)
        family = families.get(families.detect(index) if model_cfg.flavour == "auto" else model_cfg.flavour)
        cls = getattr(diffusers, family.denoiser_class)
        net_cfg = cls.load_config(src, subfolder=family.denoiser_folder, **kw)
        vae_cfg = AutoencoderKL.load_config(src, subfolder="vae", **kw)
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        net = cls.from_config(net_cfg)
    factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    weights = sum(f.stat().st_size for f in Path(src).rglob("*.safetensors")) if Path(src).is_dir() else 0
    return Skeleton(net, family, family.resolution_multiple(factor, net_cfg), factor,
                    int(vae_cfg["block_out_channels"][0]), family.native_side(factor, net_cfg), weights, dict(index))


def lora_layers(denoiser, targets) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) width of every layer a LoRA with these targets lands on (peft's
    matching: the path, or a suffix of it after a dot)."""
    import torch

    hits = {}
    for name, mod in denoiser.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(mod, torch.nn.Linear):
            hits[name] = (mod.in_features, mod.out_features)
        elif isinstance(mod, torch.nn.Conv2d):
            hits[name] = (mod.in_channels, mod.out_channels)
    return hits


def device_bytes(cfg) -> tuple[int, str]:
    """(bytes, what) of the memory one worker's device has, as far as the driver can tell."""
    import torch

    if cfg.train.use_gpu:
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, f"this machine's {torch.cuda.get_device_name(0)}"
        return UNKNOWN_GPU_BYTES, "the largest GPU made (the workers' GPUs are not visible from here)"
    if os.environ.get("RAY_ADDRESS"):
        return UNKNOWN_NODE_BYTES, "the most RAM a cluster node has (the workers' nodes are not visible from here)"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM (a local Ray)"


def step_bytes(cfg, sk: Skeleton, layers: dict[str, tuple[int, int]]) -> dict[str, int]:
    """A lower bound of one worker's memory for one training step, by part (bytes)."""
    cuda = cfg.train.use_gpu and cfg.train.mixed_precision != "no"
    act = 2 if cuda else 4  # activations in bf16/fp16 on a GPU, fp32 on CPU
    rows = cfg.train.batch_size * (cfg.method.lv_copies if cfg.method.name == "draft_lv" else 1)
    side = cfg.model.resolution
    lora = sum(cfg.lora.rank * (i + o) for i, o in layers.values())
    return {
        "weights": sk.weight_bytes,
        "LoRA, its gradient and AdamW state (fp32)": 4 * 4 * lora,
        # the decoder's last block at full resolution: its input kept for backward and the
        # recomputed output (with vae_checkpointing), plus the fp32 images and their gradient
        "decoder activations at full resolution": rows * side * side * (2 * sk.vae_channels * act + 2 * 3 * 4),
    }


def check(cfg, sk: Skeleton | None = None, training: bool = True) -> None:
    """ConfigError (every problem at once) for LoRA targets, rank, resolution or memory that the
    model and device cannot take; `training` False (sample, eval): the resolution only. Nothing
    is checked for a model whose configs are not here."""
    sk = sk if sk is not None else skeleton(cfg.model)
    if sk is None:
        return
    p: list[str] = []
    layers = lora_layers(sk.denoiser, cfg.lora.target_modules) if training else {}
    if training and not layers:
        p.append(f"lora.target_modules: {list(cfg.lora.target_modules)} match no Linear or Conv2d layer of "
                 f"{cfg.model.name!r}'s denoiser; name modules it has, e.g. to_q, to_k, to_v, to_out.0")
    elif training:
        width = min(min(w) for w in layers.values())
        if cfg.lora.rank > width:
            narrow = next(n for n, w in layers.items() if min(w) == width)
            p.append(f"lora.rank: {cfg.lora.rank} is larger than the narrowest targeted layer ({narrow}, width "
                     f"{width}) of {cfg.model.name!r}; need 1 <= rank <= {width} (a rank above a layer's width "
                     "adds memory, not expressiveness)")
    side = cfg.model.resolution
    if side % sk.multiple:
        p.append(f"model.resolution: {side} is not a multiple of {sk.multiple} ({cfg.model.name!r}: "
                 f"{sk.family.name}, its latents and patches); need a multiple of {sk.multiple}")
    p += sk.family.check(cfg, dict(sk.denoiser.config), sk.index)
    if side > MAX_NATIVE_FACTOR * sk.native:
        p.append(f"model.resolution: {side} is more than {MAX_NATIVE_FACTOR}x the native side of "
                 f"{cfg.model.name!r} ({sk.native} px); need <= {MAX_NATIVE_FACTOR * sk.native} "
                 f"(it was trained at {sk.native})")
    if training and not p:
        parts = step_bytes(cfg, sk, layers)
        have, what = device_bytes(cfg)
        need = sum(parts.values())
        if need > have:
            detail = ", ".join(f"{k} {v / GiB:.3g} GiB" for k, v in parts.items() if v)
            p.append(f"train.batch_size={cfg.train.batch_size}, model.resolution={side}, lora.rank={cfg.lora.rank}: "
                     f"one training step needs at least {need / GiB:.3g} GiB per worker ({detail}), more than "
                     f"{have / GiB:.3g} GiB, {what}; lower train.batch_size or model.resolution, or use more "
                     "workers with a smaller batch each")
    if p:
        raise ConfigError(p)
