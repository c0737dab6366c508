"""`rayreward export`: a trained LoRA in the file layouts image UIs load.

`kohya`: the `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha` layout of
kohya's scripts, written by diffusers' own converter (`convert_state_dict_to_kohya`) from the
LoRA's peft-named tensors, with module names in diffusers' naming (as that converter writes them).
One correction to the converter's output: it sets every `.alpha` to the rank, which is right only
when lora.alpha equals lora.rank; the exported alpha is the LoRA's own (from the file's adapter
metadata), so the update keeps its scale alpha / rank. A FLUX.1 LoRA is written in the layout of
Black Forest Labs' checkpoints that kohya's FLUX scripts and ComfyUI use (`lora_unet_double_blocks_3_img_attn_qkv`),
its q, k, v (and a single block's mlp) fused on a block diagonal (`to_kohya_flux`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from rayreward import lora_io, models
from rayreward.config import ConfigError

FORMATS = ("kohya",)


def _alpha(path, prefix: str = "unet") -> float:
    meta = lora_io.lora_metadata(path) or {}
    if meta.get(f"{prefix}.alpha_pattern") or meta.get(f"{prefix}.rank_pattern"):
        raise lora_io.LoraFileError(f"LoRA {str(path)!r}: per-module ranks or alphas cannot be exported to kohya's "
                                   "single alpha per module from this file's metadata")
    if f"{prefix}.lora_alpha" not in meta:
        raise lora_io.LoraFileError(f"LoRA {str(path)!r}: its metadata holds no lora_alpha (a file rayreward did not "
                                   "write?); the kohya layout needs it to keep the update's scale")
    return float(meta[f"{prefix}.lora_alpha"])


# FLUX.1 in the layout of Black Forest Labs' checkpoints, as kohya's scripts and ComfyUI name it:
# kohya module -> the diffusers modules it fuses (in order), per double / single block
FLUX_DOUBLE = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
               "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
               "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
               "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
               "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",)}
FLUX_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
               "modulation_lin": ("norm.linear",)}
FLUX_MLP_RATIO = 4  # FLUX.1's single blocks: proj_mlp is 4x the width


def is_flux1(state: dict) -> bool:
    """A transformer LoRA of FLUX.1: single blocks with separate q, k, v (FLUX.2 fuses them)."""
    return any(k.startswith("single_transformer_blocks.") for k in state) and not any("to_qkv_mlp_proj" in k
                                                                                       for k in state)


def to_kohya_flux(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A FLUX.1 LoRA (peft names, `transformer_blocks.3.attn.to_q.lora_A.weight`) in kohya's BFL
    layout. A fused module (q, k, v -> qkv; q, k, v, mlp -> linear1) gets one LoRA whose down
    matrix stacks the parts' A and whose up matrix holds their B on its block diagonal, so that
    up @ down stacks the parts' updates; its rank is the sum of theirs and its alpha grows with it,
    keeping each update's scale alpha / r. A part the LoRA does not target is a zero block.
    diffusers' own FLUX converter reads such a block-diagonal LoRA back into the separate parts."""
    out: dict[str, torch.Tensor] = {}
    blocks = sorted({(k.split(".")[0], int(k.split(".")[1])) for k in state})
    for kind, i in blocks:
        table, bfl = (FLUX_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (FLUX_SINGLE, "single_blocks")
        for name, parts in table.items():
            pairs = [(state.get(f"{kind}.{i}.{p}.lora_A.weight"), state.get(f"{kind}.{i}.{p}.lora_B.weight"))
                     for p in parts]
            present = [(a, b) for a, b in pairs if a is not None]
            if not present:
                continue
            r, fan_in = present[0][0].shape
            # each part's output width: q, k, v share one; a single block's mlp is FLUX_MLP_RATIO x that
            attn = [b.shape[0] for (a, b), p in zip(pairs, parts) if a is not None and p != "proj_mlp"]
            width = attn[0] if attn else present[0][1].shape[0] // FLUX_MLP_RATIO
            dims = [width * FLUX_MLP_RATIO if p == "proj_mlp" else width for p in parts]
            down = torch.zeros(r * len(parts), fan_in)
            up = torch.zeros(sum(dims), r * len(parts))
            row = 0
            for j, ((a, b), d) in enumerate(zip(pairs, dims)):
                if a is not None:
                    down[j * r:(j + 1) * r] = a
                    up[row:row + d, j * r:(j + 1) * r] = b
                row += d
            key = f"lora_unet_{bfl}_{i}_{name}"
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down.contiguous(), up.contiguous()
            out[f"{key}.alpha"] = torch.tensor(alpha * len(parts))
    return out


def to_kohya(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya-layout tensors and safetensors metadata of a rayreward LoRA file or folder."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    raw = lora_io.read_lora_state(path)
    if lora_io.lora_prefix(path) != "unet":
        family = lora_io.lora_family(path)
        if family != "flux" and not (family is None and is_flux1(raw)):
            raise lora_io.LoraFileError(f"LoRA {str(path)!r} is a transformer LoRA of SD3 or FLUX.2; --format kohya "
                                        "writes SD / SDXL UNet LoRAs and FLUX.1 LoRAs, for now: load the diffusers file "
                                        "itself (the stock pipelines and ComfyUI read it)")
        kohya = to_kohya_flux(raw, _alpha(path, "transformer"))
        ranks = sorted({int(v.shape[0]) for k, v in kohya.items() if k.endswith(".lora_down.weight")})
        meta = {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(ranks[0] if len(ranks) == 1 else ranks),
                "ss_network_alpha": str(_alpha(path, "transformer")), "rayreward_source": str(lora_io.lora_file(path)),
                "rayreward_format": json.dumps({"format": "kohya", "module_names": "flux-bfl"})}
        return kohya, meta
    state = {f"unet.{k}": v for k, v in raw.items()}
    alpha = _alpha(path)
    kohya = convert_state_dict_to_kohya(state)
    kohya = {k: (torch.tensor(alpha) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}
    ranks = sorted({int(v.shape[0]) for k, v in kohya.items() if k.endswith(".lora_down.weight")})
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[0] if len(ranks) == 1 else ranks),
            "ss_network_alpha": str(alpha), "rayreward_source": str(lora_io.lora_file(path)),
            "rayreward_format": json.dumps({"format": "kohya", "module_names": "diffusers"})}
    return kohya, meta


def export_lora(path: str | os.PathLike, fmt: str, out: str | os.PathLike, force: bool = False) -> Path:
    """Write the LoRA at `path` in format `fmt` (one of FORMATS) to the file `out`: a new file,
    or with `force` one that replaces an existing file (never the LoRA being read), written whole
    (a temporary file in the same folder, then a rename)."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ConfigError([f"--format: {fmt!r} is unknown; allowed: {', '.join(FORMATS)}"])
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError([f"--out: {str(out)!r} is not allowed; the file name must end in .safetensors"])
    source = lora_io.lora_file(path)
    if out.exists() or out.is_symlink():
        if out.resolve() == source.resolve():
            raise ConfigError([f"--out: {str(out)!r} is the LoRA being exported ({str(source)!r}); write the export "
                               "to another file"])
        if not force:
            raise ConfigError([f"--out: {str(out)!r} exists; choose a new file, or add --force to replace it"])
        if not out.is_file() or out.is_symlink():
            raise ConfigError([f"--out: {str(out)!r} is not a regular file; --force replaces only a file"])
    tensors, meta = to_kohya(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
