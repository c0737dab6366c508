"""Rewards: the protocol, and the registry of the built-in ones.

Protocol: a reward is a callable `reward(images, prompts) -> Tensor[B]` where `images` is a float
tensor in [0, 1] of shape (B, 3, H, W), and the result is differentiable with respect to
`images`. A factory builds one from keyword arguments (the `args` of a config's `rewards[]`
entry) plus `device`. docs/design.md ("Rewards") describes how a reward is hosted and weighted.

Registration is explicit: `REGISTRY` below maps each built-in name to the 'module:factory' that
builds it, and the module is imported only when such a reward is built. So naming and validating
rewards (config.py) imports no torch, and an optional package (hpsv2, image-reward) is needed
only by the reward that uses it. Adding a reward: write its factory (in a module of this package
or a new one) and add its line here. A user reward needs no registration at all: name it in the
config as 'package.module:factory'.

The package's modules: `lowlevel` (symmetry, brightness, contrast, sharpness, centring), `clip` (PickScore,
CLIPScore, aesthetic on transformers' CLIP), `packages` (HPSv2/v2.1, ImageReward from their
reference packages), `world` (the shapes world's prompt alignment, read by its judge), `common` (loading and differentiable preprocessing they share), `composite`
(the weighted sum, the losses, and the one function that turns images into a loss).
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from rayreward.errors import RewardLoadError  # noqa: F401  (the reward modules raise it from here)

if TYPE_CHECKING:
    import torch

REGISTRY: dict[str, str] = {
    "symmetry": "rayreward.rewards.lowlevel:symmetry",
    "brightness": "rayreward.rewards.lowlevel:brightness",
    "contrast": "rayreward.rewards.lowlevel:contrast",
    "sharpness": "rayreward.rewards.lowlevel:sharpness",
    "centring": "rayreward.rewards.lowlevel:centring",
    "pickscore": "rayreward.rewards.clip:pickscore",
    "clipscore": "rayreward.rewards.clip:clipscore",
    "aesthetic": "rayreward.rewards.clip:aesthetic",
    "hpsv2": "rayreward.rewards.packages:hpsv2",
    "hpsv21": "rayreward.rewards.packages:hpsv21",
    "imagereward": "rayreward.rewards.packages:imagereward",
    "shapes_alignment": "rayreward.rewards.world:shapes_alignment",
}

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class Reward(Protocol):
    def __call__(self, images: "torch.Tensor", prompts: Sequence[str]) -> "torch.Tensor": ...


RewardFactory = Callable[..., Reward]


def is_import_path(name: str) -> bool:
    """True for a user reward given as 'package.module:factory'."""
    return bool(_IMPORT_PATH.match(name))


def known(name: str) -> bool:
    """A name a config may give: registered, or a 'module:factory' path (imported when built)."""
    return name in REGISTRY or is_import_path(name)


def unknown_message(where: str, name: str) -> str:
    return f"{where}: {name!r} is unknown; allowed: {', '.join(sorted(REGISTRY))} or a 'module:function' path"


def factory_of(name: str) -> RewardFactory:
    """The factory of a registered name or of a 'module:factory' path."""
    if name not in REGISTRY and not is_import_path(name):
        raise KeyError(unknown_message("reward", name))
    module_name, attr = REGISTRY.get(name, name).split(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {name!r}: cannot import {attr} from {module_name}: {e}") from None


def check_args(specs) -> list[str]:
    """Problems of each reward's `args` against its factory's signature (unknown or missing
    arguments), and of a factory that cannot be imported: what the driver checks before Ray
    starts, instead of a worker finding it after the model loaded."""
    problems = []
    for i, spec in enumerate(specs):
        try:
            factory = factory_of(spec.name)
        except (KeyError, ValueError) as e:
            problems.append(f"rewards[{i}].name: {str(e).strip(chr(34))}")
            continue
        params = inspect.signature(factory).parameters
        try:
            inspect.signature(factory).bind(device="cpu", **spec.args)
        except TypeError as e:
            allowed = [k for k, v in params.items() if k != "device" and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
            problems.append(f"rewards[{i}].args {dict(spec.args)}: {e} for reward {spec.name}; allowed: "
                            f"{', '.join(allowed) or 'none'}")
    return problems


def build_reward(name: str, device: Any = "cpu", **args) -> Reward:
    """Build the reward `name` (registered, or 'module:factory') with its factory arguments."""
    factory = factory_of(name)
    try:
        inspect.signature(factory).bind(device=device, **args)
    except TypeError as e:
        raise ValueError(f"reward {name!r}: bad args {args}: {e}") from None
    return factory(device=device, **args)
