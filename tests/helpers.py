"""Shared test helpers, and user-style rewards loaded by 'helpers:name' (tests/ is on the path)."""

import csv
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def rows(path: Path) -> list[dict]:
    """metrics.csv as a list of dicts."""
    with open(path) as f:
        return list(csv.DictReader(f))


def quick_cfg(out: Path, *overrides: str):
    """The quickstart shrunk for tests: T = 4, 2 steps of batch 2, one grid cell."""
    from rayreward import config

    return config.load(ROOT / "experiments/quickstart.yaml",
                       [f"output_dir={out}", "train.steps=2", "train.batch_size=2", "sampling.num_steps=4",
                        "method.early_stop_m=2", "grid.seeds=[0]", "grid.prompts=[a cat]", *overrides])


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
