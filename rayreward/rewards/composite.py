"""The composite reward (a weighted sum of named rewards), the losses, and `reward_and_loss`: the
one function that turns images into a loss, the same in a training worker and in a reward actor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rayreward.errors import RewardCallError, first_line
from rayreward.rewards import Reward, build_reward
from rayreward.sampling import copy_mean


@dataclass
class CompositeReward:
    """A weighted sum of named rewards; each component is returned for logging."""

    names: list[str]
    weights: list[float]
    fns: list[Reward]

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Shape: images (b, 3, h, w) in [0, 1] -> total (b,), {name: (b,)}."""
        parts = {}
        total = images.new_zeros(images.shape[0])
        for name, w, fn in zip(self.names, self.weights, self.fns):
            try:
                r = fn(images, prompts)
            except Exception as e:  # the reward's own code: say so, with its exception
                raise RewardCallError(f"reward {name} raised {type(e).__name__}: {first_line(e)} (in the reward's own "
                                      "code, not in rayreward)") from e
            if not isinstance(r, torch.Tensor):
                raise RewardCallError(f"reward {name} returned a {type(r).__name__}, not a tensor; a reward returns "
                                      f"a torch tensor of shape ({images.shape[0]},) computed from `images` with torch ops")
            r = r.float()
            if r.shape != total.shape:
                raise ValueError(f"reward {name} returned shape {tuple(r.shape)} for {images.shape[0]} images; a reward "
                                 f"returns one value per image, shape ({images.shape[0]},)")
            parts[name] = r
            total = total + w * r
        return total, parts


def build_composite(specs, device="cpu") -> CompositeReward:
    """From a list of RewardSpec (name, weight, args)."""
    fns = [build_reward(s.name, device=device, **s.args) for s in specs]
    return CompositeReward(component_names(specs), [float(s.weight) for s in specs], fns)


def component_names(specs) -> list[str]:
    """The components' names in logs (metrics.csv's reward/NAME): a repeated name gets _2, _3, ..."""
    names, seen = [], {}
    for s in specs:
        seen[s.name] = seen.get(s.name, 0) + 1
        names.append(s.name if seen[s.name] == 1 else f"{s.name}_{seen[s.name]}")
    return names


def reward_loss(r: torch.Tensor, loss_cfg) -> torch.Tensor:
    """Per-sample loss from the reward. Shape: (b,) -> (b,)."""
    if loss_cfg.kind == "linear":
        loss = -r
    elif loss_cfg.kind == "hinge":
        loss = torch.relu(loss_cfg.margin - r)
    else:  # "absolute"
        loss = (r - loss_cfg.margin).abs()
    return loss_cfg.scale * loss


def reward_and_loss(reward: CompositeReward, loss_cfg, images: torch.Tensor, prompts: Sequence[str], copies: int = 1):
    """The batch loss and its rewards, the same in-process and in a reward actor.

    Shape: images (copies * b, 3, h, w) -> loss (), reward (b,), components {name: (b,)}.
    DRaFT-LV averages the loss over its `copies` images of one sample: each copy's loss is taken
    on its own reward, then averaged (a hinge or absolute loss of the copies' mean reward would
    differ). The logged rewards are the copies' means."""
    total, parts = reward(images, list(prompts) * copies)
    loss = copy_mean(reward_loss(total, loss_cfg), copies).mean()
    return loss, copy_mean(total, copies), {k: copy_mean(v, copies) for k, v in parts.items()}
