"""Reward clients (in-process or in Ray actors), the reward actor, and the gradient round trip.

A worker scores through a client with two calls: `client(images, prompts, copies)` -> (loss,
rewards, components), with a gradient path to the images, and `client.score_only(images,
prompts)` -> {component: scores} for evaluation. `LocalReward` computes in this process;
`RemoteReward` sends the images to `RewardServer` actors. Which one a run uses is decided once,
from `reward_server.mode`, by `runtime.reward_client`.

The driver starts `RewardServer` actors (`runtime.start_reward_actors`, with their own resources:
GPUs, or a custom resource that only reward nodes advertise) and passes their handles to the
training workers. A worker sends
`images.detach()` and the prompts; the actor computes the loss with its frozen reward, back-
propagates to the images, and returns the loss, the rewards and dL/dimages. The worker continues
with `images.backward(dL/dimages)` through `RemoteLoss`: the loss is a function of the images
alone, so one round trip per batch suffices. A dead actor is restarted by Ray and the call
retried (`max_restarts`, `max_task_retries`). docs/design.md ("Rewards") has the protocol.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from rayreward.config import LossConfig, RewardSpec
from rayreward.rewards.composite import build_composite, reward_and_loss


class RewardServer:
    """A reward model host: loads its rewards once, serves `score` calls. Run as a Ray actor."""

    def __init__(self, specs: list[dict], loss: dict, device: str = "cpu", fail_after_calls: int | None = None):
        """`fail_after_calls` is a test hook (set by runtime from RAYREWARD_FAULT_REWARD_CALLS)."""
        import ray

        self.device = torch.device(device)
        self.local = LocalReward([RewardSpec(**s) for s in specs], LossConfig(**loss), self.device)
        self.calls = 0
        # fault injection (tests): die once, in the first life of the actor only
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.fail_after_calls = None if restarted else fail_after_calls

    def score(self, images: torch.Tensor, prompts: Sequence[str], copies: int = 1) -> dict:
        """Shape: images (copies * b, 3, h, w) in [0, 1] -> loss (), reward (b,), grad like images."""
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            os._exit(1)
        self.calls += 1
        x = images.to(self.device, torch.float32).requires_grad_(True)
        loss, r, parts = self.local(x, prompts, copies)
        (grad,) = torch.autograd.grad(loss, x)
        return {"loss": loss.detach().cpu(), "reward": r.detach().cpu(), "grad": grad.cpu(),
                "parts": {k: v.detach().cpu() for k, v in parts.items()}}

    def score_only(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        """Evaluation: each reward's score, no gradient. Shape: (b, 3, h, w) -> {name: (b,)}."""
        return self.local.score_only(images, prompts)

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        import ray

        return {"pid": os.getpid(), "calls": self.calls, "device": str(self.device),
                "restarted": ray.get_runtime_context().was_current_actor_reconstructed}


class RemoteLoss(torch.autograd.Function):
    """loss = f(images) computed elsewhere: forward returns the value, backward the given grad."""

    @staticmethod
    def forward(ctx, images: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return loss.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return g * grad, None, None


class LocalReward:
    """The rewards in this process: the composite reward of `specs` and the loss of `loss_cfg`."""

    def __init__(self, specs, loss_cfg: LossConfig, device):
        self.reward = build_composite(specs, device=device)
        self.loss_cfg, self.device = loss_cfg, torch.device(device)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], copies: int = 1):
        return reward_and_loss(self.reward, self.loss_cfg, images, prompts, copies)

    @torch.no_grad()
    def score_only(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        """Each reward's score, no gradient. Shape: (b, 3, h, w) -> {name: (b,)} on the CPU."""
        _, parts = self.reward(images.to(self.device, torch.float32), list(prompts))
        return {k: v.float().cpu() for k, v in parts.items()}


class RemoteReward:
    """The rewards in `RewardServer` actors: the same calls as `LocalReward`. Worker `rank`'s
    n-th call goes to replica (rank + n) % replicas."""

    def __init__(self, actors: list, rank: int = 0):
        self.actors, self.rank, self.calls = actors, rank, 0

    def _next(self):
        """The replica for this call: (rank + calls) % replicas."""
        actor = self.actors[(self.rank + self.calls) % len(self.actors)]
        self.calls += 1
        return actor

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], copies: int = 1):
        import ray

        out = ray.get(self._next().score.remote(images.detach().cpu(), list(prompts), copies))
        dev = images.device
        loss = RemoteLoss.apply(images, out["loss"].to(dev), out["grad"].to(dev, images.dtype))
        return loss, out["reward"].to(dev), {k: v.to(dev) for k, v in out["parts"].items()}

    def score_only(self, images: torch.Tensor, prompts: Sequence[str]) -> dict:
        import ray

        return ray.get(self._next().score_only.remote(images.detach().cpu(), list(prompts)))
