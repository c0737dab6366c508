"""The shapes world's prompt alignment, read by its judge (rayreward/shapes/judge.py)."""

from __future__ import annotations

from rayreward.rewards import Reward


def shapes_alignment(device="cpu", path: str | None = None) -> Reward:
    """Mean log-probability that the judge (the built-in one, or the folder `path`) gives the
    caption's seven labels (each column's kind and colour, the background): 0 when the picture
    shows exactly what the prompt says, lower otherwise. Prompts must be captions of the shapes
    world; any other prompt raises a ValueError that names it."""
    from rayreward.shapes import judge

    model = judge.load(path, device)

    def reward(images, prompts):
        return judge.alignment(model, images, prompts)

    return reward
