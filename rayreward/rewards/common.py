"""What the model rewards share: loading weights (hub ids or local paths, offline-aware, no pickled
code), the dtype argument, and the differentiable image preprocessing that replaces the reference
processors' PIL path so that gradients reach the images."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from rayreward import hub
from rayreward.errors import RewardLoadError, first_line

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def load_pretrained(what: str, fn, source: str, key: str):
    """fn(source): a reward's model or processor, from a folder or the hub (the local cache only
    when the hub is unreachable). `what` names the reward and `key` its args field; a command-line
    flag ("--diversity-clip") as `what` names itself in both places."""
    local_only = not Path(source).expanduser().exists() and hub.offline()
    flag = what.startswith("--")
    try:
        return fn(source, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise RewardLoadError(
            f"{what if flag else 'reward ' + what}: cannot load {source!r} ({first_line(e)})"
            f"{'; ' + hub.why_offline() if local_only else ''}. Set {what if flag else 'rewards[].args.' + key} to a "
            "local folder or file holding it, or make the hub reachable (unset HF_HUB_OFFLINE) to download it once."
        ) from None


def dtype_of(name: str) -> torch.dtype:
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in allowed:
        raise ValueError(f"dtype {name!r} is unknown; allowed: {', '.join(allowed)}")
    return allowed[name]


def read_state_dict(what: str, path: Path) -> dict:
    """A state dict from .pt/.pth (weights_only: no pickled code runs) or .safetensors; `what`
    starts the error message of an unreadable file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise RewardLoadError(f"{what} is not a readable state dict ({type(e).__name__}: "
                              f"{first_line(e)})") from None


def fetch(what: str, source: str, filename: str, key: str) -> Path:
    """A checkpoint file: `source` is the file itself, a folder holding `filename`, or a hub repo id."""
    p = Path(source).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if (p / filename).is_file():
            return p / filename
        raise RewardLoadError(f"reward {what}: folder {source!r} has no {filename}. Set rewards[].args.{key} to the "
                              f"file itself or a folder holding {filename}")
    if source.startswith((".", "/", "~")) or source.endswith((".pt", ".pth", ".bin", ".safetensors", ".json")):
        raise RewardLoadError(f"reward {what}: {key} {source!r} does not exist. Set rewards[].args.{key} to a local "
                              f"{filename} or a hub repo id")
    from huggingface_hub import hf_hub_download

    local_only = hub.offline()
    try:
        return Path(hf_hub_download(source, filename, local_files_only=local_only))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, missing file: all the same user error
        first = first_line(e) + (f"; {hub.why_offline()}" if local_only else "")
        raise RewardLoadError(
            f"reward {what}: cannot get {filename} from the hub repo {source!r} ({type(e).__name__}: {first}). Set "
            f"rewards[].args.{key} to a local copy of {filename}, or make the hub reachable (unset HF_HUB_OFFLINE) to "
            "download it once") from None


def load_state(what: str, path: Path) -> dict:
    """A state dict from .pt/.pth (weights_only: no pickled code runs) or .safetensors; a
    {'state_dict': ...} wrapper (HPS checkpoints) is unwrapped."""
    state = read_state_dict(f"reward {what}: {str(path)!r}", path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise RewardLoadError(f"reward {what}: {str(path)!r} holds no state dict of tensors")
    return state


def resize_crop_normalize(images: torch.Tensor, size: int, crop: int, mean: Sequence[float], std: Sequence[float],
                          crop_rounding: str = "floor") -> torch.Tensor:
    """Differentiable "resize the shortest edge, center crop, normalise", bicubic with antialias.

    Sizes follow the reference processors exactly: the long edge is int(size * long / short) (both
    transformers' and torchvision's rule); the crop's offset is floor((h - crop) / 2) in
    transformers' processors and round() in torchvision's CenterCrop (`crop_rounding="round"`).
    Shape: (b, 3, h, w) in [0, 1] -> (b, 3, crop, crop).
    """
    h, w = images.shape[-2:]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    x = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    if crop_rounding == "floor":
        top, left = (new_h - crop) // 2, (new_w - crop) // 2
    else:
        top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    x = x[..., top:top + crop, left:left + crop]
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
