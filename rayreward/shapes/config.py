"""`rayreward pretrain`'s settings, checked as the CLI names them, and where a VAE lives."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rayreward.errors import ConfigError


def vae_folder(path: str | Path) -> Path | None:
    """The VAE folder of a pretrained pipeline folder (its vae/), or the folder itself when it is
    one; None when neither holds a config.json."""
    for folder in (Path(path) / "vae", Path(path)):
        if (folder / "config.json").is_file():
            return folder
    return None


@dataclass
class PretrainConfig:
    """`rayreward pretrain`'s settings (rayreward/shapes/pretrain.py): the shapes model from scratch."""

    out: str  # the folder to write
    part: str = "model"  # "model": the diffusers pipeline; "judge": the alignment classifier (rayreward/shapes/judge.py)
    unet_steps: int = 6000  # UNet + text encoder optimizer steps
    vae_steps: int = 800  # VAE optimizer steps
    judge_steps: int = 2500  # the judge's optimizer steps
    vae_from: str = ""  # reuse this pretrained folder's VAE (or a VAE folder) and skip the VAE phase
    init_from: str = ""  # start from this pretrained model (UNet, text encoder and VAE): fine-tune it, no VAE phase
    placed_only: bool = False  # draw the world without unplaced shapes (the `shapes` model's world)
    batch_size: int = 32
    lr: float = 5e-4  # UNet and text encoder (AdamW, cosine decay to 10 %)
    vae_lr: float = 1e-3
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)
    workers: int = 0  # processes drawing batches ahead (0: drawn in the training process)
    device: str = "cpu"  # or "cuda"; fp32 weights (bf16 autocast on CUDA), saved in fp16

    def check(self) -> None:
        flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731  (the CLI's names)
        bad = [f"{flag(k)}: {getattr(self, k)} is not allowed; need an integer >= 1"
               for k in ("unet_steps", "vae_steps", "judge_steps", "batch_size") if getattr(self, k) < 1]
        if self.vae_from and vae_folder(self.vae_from) is None:
            bad.append(f"--vae-from: {self.vae_from!r} holds no VAE (config.json, or vae/config.json)")
        if self.init_from and not (Path(self.init_from) / "model_index.json").is_file():
            bad.append(f"--init-from: {self.init_from!r} is not a pretrained model folder (no model_index.json)")
        if self.init_from and self.vae_from:
            bad.append("--init-from and --vae-from: give one (--init-from takes the VAE of the model it starts from)")
        if self.part not in ("model", "judge"):
            bad.append(f"--part: {self.part!r} is not allowed; allowed: model, judge")
        bad += [f"{flag(k)}: {getattr(self, k)} is not allowed; need an integer >= 0"
                for k in ("threads", "workers") if getattr(self, k) < 0]
        bad += [f"{flag(k)}: {getattr(self, k)} is not allowed; need a finite number > 0" for k in ("lr", "vae_lr")
                if not (math.isfinite(getattr(self, k)) and getattr(self, k) > 0)]
        if bad:
            raise ConfigError(bad)
