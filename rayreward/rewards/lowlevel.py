"""Low-level rewards computed from the pixels alone: symmetry, brightness, contrast, sharpness.

They need no model and no download, which makes them the CPU quickstart's rewards and a probe of
the low-level structure that DRTune's early trained steps reach (symmetry above all).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayreward.rewards import Reward


def _luma(images: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma. Shape: (b, 3, h, w) -> (b, h, w)."""
    r, g, b = images.unbind(1)
    return 0.299 * r + 0.587 * g + 0.114 * b


def symmetry(device="cpu") -> Reward:
    """-mean |img - hflip(img)|: 0 for a mirror-symmetric image, lower otherwise."""

    def reward(images, prompts):
        return -(images - images.flip(-1)).abs().mean(dim=(1, 2, 3))

    return reward


def brightness(device="cpu", target: float | None = None) -> Reward:
    """Mean luma; with `target`, -|mean luma - target|."""

    def reward(images, prompts):
        mean = _luma(images).mean(dim=(1, 2))
        return mean if target is None else -(mean - target).abs()

    return reward


def contrast(device="cpu") -> Reward:
    """Standard deviation of luma within each image."""

    def reward(images, prompts):
        return _luma(images).flatten(1).std(dim=1)

    return reward


def sharpness(device="cpu") -> Reward:
    """Mean absolute Laplacian of luma: high-frequency energy."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)

    def reward(images, prompts):
        lap = F.conv2d(_luma(images).unsqueeze(1), kernel.to(images), padding=1)
        return lap.abs().mean(dim=(1, 2, 3))

    return reward
