"""The reward protocol, the registry, composite rewards and the built-in low-level rewards.

Protocol: a reward is a callable `reward(images, prompts) -> Tensor[B]` where `images` is a float
tensor in [0, 1] of shape (B, 3, H, W), and the result is differentiable with respect to
`images`. A factory registered with `@register_reward("name")` builds one from keyword arguments
(the `args` of a `RewardSpec`) plus `device`.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F


class Reward(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


RewardFactory = Callable[..., Reward]
REGISTRY: dict[str, RewardFactory] = {}
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    def deco(factory: RewardFactory) -> RewardFactory:
        assert name not in REGISTRY, f"reward {name!r} registered twice"
        REGISTRY[name] = factory
        return factory

    return deco


def is_import_path(name: str) -> bool:
    """True for a user reward given as 'package.module:factory'."""
    return bool(_IMPORT_PATH.match(name))


def build_reward(name: str, device: str | torch.device = "cpu", **args) -> Reward:
    """Build the reward `name` (registered, or 'module:factory') with its factory arguments."""
    if name in REGISTRY:
        factory = REGISTRY[name]
    elif is_import_path(name):
        module_name, attr = name.split(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {name!r}: cannot import {attr} from {module_name}: {e}") from None
    else:
        raise KeyError(f"reward {name!r} is unknown; allowed: {', '.join(sorted(REGISTRY))} or 'module:function'")
    try:
        inspect.signature(factory).bind(device=device, **args)
    except TypeError as e:
        raise ValueError(f"reward {name!r}: bad args {args}: {e}") from None
    return factory(device=device, **args)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma. Shape: (b, 3, h, w) -> (b, h, w)."""
    r, g, b = images.unbind(1)
    return 0.299 * r + 0.587 * g + 0.114 * b


@register_reward("symmetry")
def symmetry(device="cpu") -> Reward:
    """-mean |img - hflip(img)|: 0 for a mirror-symmetric image, lower otherwise."""

    def reward(images, prompts):
        return -(images - images.flip(-1)).abs().mean(dim=(1, 2, 3))

    return reward


@register_reward("brightness")
def brightness(device="cpu", target: float | None = None) -> Reward:
    """Mean luma; with `target`, -|mean luma - target|."""

    def reward(images, prompts):
        mean = _luma(images).mean(dim=(1, 2))
        return mean if target is None else -(mean - target).abs()

    return reward


@register_reward("contrast")
def contrast(device="cpu") -> Reward:
    """Standard deviation of luma within each image."""

    def reward(images, prompts):
        return _luma(images).flatten(1).std(dim=1)

    return reward


@register_reward("sharpness")
def sharpness(device="cpu") -> Reward:
    """Mean absolute Laplacian of luma: high-frequency energy."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)

    def reward(images, prompts):
        lap = F.conv2d(_luma(images).unsqueeze(1), kernel.to(images), padding=1)
        return lap.abs().mean(dim=(1, 2, 3))

    return reward


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
            r = fn(images, prompts).float()
            if r.shape != total.shape:
                raise ValueError(f"reward {name} returned shape {tuple(r.shape)} for {images.shape[0]} images; a reward "
                                 f"returns one value per image, shape ({images.shape[0]},)")
            parts[name] = r
            total = total + w * r
        return total, parts


def build_composite(specs, device="cpu") -> CompositeReward:
    """From a list of RewardSpec (name, weight, args). Repeated names get a suffix in logs."""
    names, seen = [], {}
    for s in specs:
        seen[s.name] = seen.get(s.name, 0) + 1
        names.append(s.name if seen[s.name] == 1 else f"{s.name}_{seen[s.name]}")
    fns = [build_reward(s.name, device=device, **s.args) for s in specs]
    return CompositeReward(names, [float(s.weight) for s in specs], fns)


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
    from rayreward.sampling import copy_mean

    total, parts = reward(images, list(prompts) * copies)
    loss = copy_mean(reward_loss(total, loss_cfg), copies).mean()
    return loss, copy_mean(total, copies), {k: copy_mean(v, copies) for k, v in parts.items()}


from rayreward import reward_models  # noqa: E402,F401  (registers pickscore, clipscore, aesthetic, hpsv2, hpsv21, imagereward)
