"""`rayreward export`: a trained LoRA in the file layouts image UIs load.

`kohya`: the `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha` layout of
kohya's scripts, written by diffusers' own converter (`convert_state_dict_to_kohya`) from the
LoRA's peft-named tensors, with module names in diffusers' naming (as that converter writes them).
One correction to the converter's output: it sets every `.alpha` to the rank, which is right only
when lora.alpha equals lora.rank; the exported alpha is the LoRA's own (from the file's adapter
metadata), so the update keeps its scale alpha / rank.
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


def _alpha(path) -> float:
    meta = lora_io.lora_metadata(path) or {}
    if meta.get("unet.alpha_pattern") or meta.get("unet.rank_pattern"):
        raise lora_io.LoraFileError(f"LoRA {str(path)!r}: per-module ranks or alphas cannot be exported to kohya's "
                                   "single alpha per module from this file's metadata")
    if "unet.lora_alpha" not in meta:
        raise lora_io.LoraFileError(f"LoRA {str(path)!r}: its metadata holds no lora_alpha (a file rayreward did not "
                                   "write?); the kohya layout needs it to keep the update's scale")
    return float(meta["unet.lora_alpha"])


def to_kohya(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya-layout tensors and safetensors metadata of a rayreward LoRA file or folder."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    raw = lora_io.read_lora_state(path)
    if lora_io.lora_prefix(path) != "unet":
        raise lora_io.LoraFileError(f"LoRA {str(path)!r} is a transformer LoRA (SD3); --format kohya writes SD / SDXL "
                                    "UNet LoRAs only, for now: load the diffusers file itself")
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
