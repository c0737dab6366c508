"""Low-level rewards computed from the pixels alone: symmetry, brightness, contrast, sharpness,
centring (a layout reward: where the content's mass is, whatever its colour or size).

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


def centring(device="cpu", threshold: float = 0.1) -> Reward:
    """-distance of the drawn content's centre of mass from the image centre, in units of the side:
    0 when the shapes are centred, down to -0.71 (a corner). A reward only a layout change raises.

    The content's mass at a pixel is how far its colour is from the background's (the per-channel
    median of the image's 1-pixel border), in the most distant channel, less `threshold`: fading a
    shape (towards the background), recolouring it or shrinking it about its own centre leaves the
    centre of mass where it was, so none of those pays; moving the shape does. Faint noise below
    the threshold has no mass (else a uniformly noisy background would pull the centre to the
    middle), and an image with no content scores as if its mass were in a corner, the worst, so
    fading a shape away does not pay either. Exact on a uniform background (white, black, gray);
    a striped one weighs in with its stripes."""
    if not 0 <= threshold < 1:
        raise ValueError(f"centring: threshold={threshold} is not allowed; need 0 <= threshold < 1")

    def reward(images, prompts):
        c = centre_of_mass(images, threshold)
        return -((c - 0.5).square().sum(dim=1) + 1e-12).sqrt()

    return reward


def centre_of_mass(images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Where the drawn content is: its centre of mass, x and y as fractions of the side (0, 0 when
    there is none). Shape: (b, 3, h, w) -> (b, 2). Mass: a pixel's colour distance from the
    background (the per-channel median of the 1-pixel border), in its most distant channel, less
    `threshold`. Differentiable."""
    b, _, h, w = images.shape
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values.view(b, 3, 1, 1)
    mass = F.relu((images - background).abs().amax(dim=1) - threshold)  # (b, h, w)
    ys = (torch.arange(h, device=images.device, dtype=images.dtype) + 0.5) / h
    xs = (torch.arange(w, device=images.device, dtype=images.dtype) + 0.5) / w
    total = mass.sum(dim=(1, 2)) + 1e-6
    return torch.stack([(mass.sum(dim=1) * xs).sum(dim=1) / total, (mass.sum(dim=2) * ys).sum(dim=1) / total], dim=1)
