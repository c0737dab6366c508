"""Shared test helpers, and user-style rewards loaded by 'helpers:name' (tests/ is on the path)."""

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def rows(path: Path) -> list[dict]:
    """metrics.csv as a list of dicts."""
    with open(path) as f:
        return list(csv.DictReader(f))


def quick_cfg(out: Path, *overrides: str):
    """experiments/tiny.yaml shrunk for tests: T = 4, 2 steps of batch 2, one grid cell."""
    from rayreward import config

    return config.load(ROOT / "experiments/tiny.yaml",
                       [f"output_dir={out}", "train.steps=2", "train.batch_size=2", "sampling.num_steps=4",
                        "method.early_stop_m=2", "grid.seeds=[0]", "grid.prompts=[a cat]", *overrides])


def make_worker(cfg, device: str = "cpu", rank: int = 0, world: int = 1):
    """A training Worker scoring in-process (what serving.reward_client gives for mode local)."""
    from rayreward import serving, train

    return train.Worker(cfg, torch.device(device), serving.LocalReward(cfg.rewards, cfg.loss, device), rank, world)


def mean_red(device="cpu", scale: float = 1.0):
    """scale * mean of the red channel."""
    return lambda images, prompts: scale * images[:, 0].mean(dim=(1, 2))


def nan_on_step(device="cpu", bad_calls=(1,)):
    """Symmetry, but NaN on the listed call numbers (0-based): exercises the non-finite guard."""
    calls = {"n": 0}

    def reward(images, prompts):
        r = -(images - images.flip(-1)).abs().mean(dim=(1, 2, 3))
        bad = calls["n"] in bad_calls
        calls["n"] += 1
        return r * torch.nan if bad else r

    return reward


def detached_mean(device="cpu"):
    """A reward computed off the graph (a common user mistake): no gradient reaches the images."""
    return lambda images, prompts: images.detach().mean(dim=(1, 2, 3))


def zero_gradient(device="cpu"):
    """A reward on the graph whose gradient is zero everywhere."""
    return lambda images, prompts: (images * 0).mean(dim=(1, 2, 3)) + 1.0


# Images and a small HPS architecture shared by the reward tests.

def smooth_images(n=3, h=48, w=40, seed=0) -> torch.Tensor:
    """Smooth random images, already quantised to uint8 levels (as PIL sees them)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 6, 5, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


def to_pil(images: torch.Tensor) -> list:
    arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


TINY_HPS = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


class LinearDenoiser(torch.nn.Module):
    """A toy denoiser of the sampler tests: out = w[n] * x + c[n], n the chain position of t (a
    DDIM integer t or a flow t = 1000 sigma), with its own (w, c) per position, so the gradients
    of w and c show which steps trained. Records each call's (position, input, input requires grad)."""

    def __init__(self, schedule, seed: int = 0):
        super().__init__()
        T = schedule.num_steps
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(0.3 * torch.rand(T, generator=g, dtype=torch.float64) - 0.15)
        self.c = torch.nn.Parameter(0.1 * torch.randn(T, generator=g, dtype=torch.float64))
        self.index = {float(t): i for i, t in enumerate(schedule.timesteps)}
        self.inputs: list[tuple[int, torch.Tensor, bool]] = []

    def forward(self, x, t):
        i = self.index[float(t)]
        self.inputs.append((i + 1, x, x.requires_grad))
        return self.w[i] * x + self.c[i]
