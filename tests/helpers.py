"""User-style rewards for tests, loaded by 'helpers:name' (tests/ is on the path)."""

import torch


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
