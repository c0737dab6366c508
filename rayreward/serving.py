"""Reward clients (in-process or in Ray actors), the reward actor, and the gradient round trip.

A worker scores through a client with two calls: `client(images, prompts, copies)` -> (loss,
rewards, components), with a gradient path to the images, and `client.score_only(images,
prompts)` -> {component: scores} for evaluation. `LocalReward` computes in this process;
`RemoteReward` sends the images to `RewardServer` actors. Which one a run uses is decided once,
from `reward_server.mode`, by `reward_client`; `RewardClient` types what a worker calls.

The driver starts `RewardServer` actors (`start_reward_actors`, with their own resources:
GPUs, or a custom resource that only reward nodes advertise) and passes their handles to the
training workers. A worker sends
`images.detach()` and the prompts; the actor computes the loss with its frozen reward, back-
propagates to the images, and returns the loss, the rewards and dL/dimages. The worker continues
with `images.backward(dL/dimages)` through `RemoteLoss`: the loss is a function of the images
alone, so one round trip per batch suffices. A dead actor is restarted by Ray and the call
retried (`max_restarts`, `max_task_retries`). docs/design.md ("Rewards") has the protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch

from rayreward import files, runtime
from rayreward.config import LossConfig, RewardSpec
from rayreward.errors import ClusterError, first_line
from rayreward.rewards.composite import build_composite, reward_and_loss


class RewardClient(Protocol):
    """What a training worker and `eval` call, wherever the reward runs."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 copies: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, rewards, components) of a batch of images in [0, 1], Shape: (B, 3, H, W); the
        loss has a gradient path to `images`. `copies`: the batch holds that many consecutive
        re-noised copies of each sample (DRaFT-LV), whose losses are averaged."""

    def score_only(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """{component: scores, Shape: (B,)}, without gradient."""


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

        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "calls": self.calls, "device": str(self.device),
                "restarted": ctx.was_current_actor_reconstructed}


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


# ---------------------------------------------------------------------------------------------
# Reward actors, and the one decision of where rewards run.


def start_reward_actors(cfg) -> list:
    """Start `reward_server.replicas` RewardServer actors with their resources (the driver does);
    fail within train.start_timeout_s if they cannot be placed or built."""
    import ray

    rs = cfg.reward_server
    device = "cuda" if rs.num_gpus > 0 else "cpu"
    actor = ray.remote(RewardServer).options(
        num_cpus=rs.num_cpus, num_gpus=rs.num_gpus, resources=dict(rs.resources) or None,
        max_restarts=rs.max_restarts, max_task_retries=rs.max_restarts, max_concurrency=1)
    specs = [vars(s) for s in cfg.rewards]
    fault = os.environ.get(runtime.FAULT_REWARD_CALLS_ENV)
    actors = [actor.remote(specs, vars(cfg.loss), device, int(fault) if fault and i == 0 else None)
              for i in range(rs.replicas)]
    try:
        ray.get([a.pid.remote() for a in actors], timeout=cfg.train.start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        for a in actors:
            ray.kill(a)
        raise ClusterError(f"the reward actors did not start within train.start_timeout_s={cfg.train.start_timeout_s:g} s "
                           f"(each asks for {rs.num_cpus:g} CPU, {rs.num_gpus:g} GPU, {dict(rs.resources)}); see "
                           "`ray status`") from None
    return actors


def stop_reward_actors(actors: list, record: Path | None = None) -> None:
    """End the reward actors; with `record`, first write their state (restarts) there as JSON."""
    import ray

    if record is not None:
        try:
            states = ray.get([a.info.remote() for a in actors], timeout=30)
        except Exception as e:  # a dead or unreachable actor must not hide the run's own outcome
            states = [{"error": f"{type(e).__name__}: {first_line(e)}"}]
        files.write_text(record, json.dumps(states, indent=1))
        for i, st in enumerate(states):
            if st.get("restarted"):
                print(f"[rayreward] reward server {i} died and was restarted during the run", flush=True)
    for a in actors:
        ray.kill(a)


@contextlib.contextmanager
def reward_client(cfg, device, rank: int = 0, actors: list | None = None) -> Iterator[RewardClient]:
    """The one decision of where rewards run, from `reward_server.mode`: "local", in this process
    on `device`; "remote", in reward actors: `actors` (started by the driver), else actors started
    here and ended on exit (an in-process run, or `eval` after `driver.init_ray`; without a Ray
    yet, Ray starts a local one on the first actor). Yields a LocalReward or a RemoteReward."""
    if cfg.reward_server.mode == "local":
        yield LocalReward(cfg.rewards, cfg.loss, device)
        return
    if actors:
        yield RemoteReward(actors, rank)
        return
    own = start_reward_actors(cfg)
    try:
        yield RemoteReward(own, rank)
    finally:
        stop_reward_actors(own)
