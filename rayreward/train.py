"""The training loop: one function per worker, run by Ray Train (or in-process in tests).

Each step: pick prompts and x_T -> draw the method's step plan -> sample (gradient only where the
plan says) -> decode -> reward -> loss -> backward -> clip -> guarded AdamW step -> log ->
checkpoint. All randomness of step s on rank r comes from a generator seeded by (seed, s, r), so a
resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rayreward import config as config_mod
from rayreward import evaluate, models, sampling
from rayreward.rewards import build_composite

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------
# Small pure pieces.


def reward_loss(r: torch.Tensor, loss_cfg) -> torch.Tensor:
    """Per-sample loss from the reward. Shape: (b,) -> (b,)."""
    if loss_cfg.kind == "linear":
        loss = -r
    elif loss_cfg.kind == "hinge":
        loss = torch.relu(loss_cfg.margin - r)
    else:  # "absolute"
        loss = (r - loss_cfg.margin).abs()
    return loss_cfg.scale * loss


def guarded_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                 grad_clip: float) -> tuple[bool, float]:
    """Clip and step, unless the loss or the gradient norm is not finite: then the step is
    skipped and the parameters stay as they are. Returns (stepped, grad_norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.zeros(())
    finite = bool(torch.isfinite(loss).all()) and bool(torch.isfinite(norm))
    if finite:
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite, float(norm)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or precision == "no":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Output files (rank 0).


class MetricsLog:
    """metrics.csv, appended a row a step; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.rows: list[dict] = []
        if path.is_file():
            with path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) < resume_step]
        self._rewrite()

    def _rewrite(self):
        fields = list(self.rows[0].keys()) if self.rows else []
        with self.path.open("w", newline="") as f:
            if fields:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(self.rows)

    def append(self, row: dict):
        new_header = not self.rows or list(row.keys()) != list(self.rows[0].keys())
        self.rows.append({k: row[k] for k in row})
        if new_header:
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=list(row.keys())).writerow(row)


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclass
class Resume:
    step: int = 0  # the next step to run
    skipped: int = 0
    lora_dir: str | None = None
    optimizer_state: dict | None = None


def read_checkpoint(folder: str | os.PathLike) -> Resume:
    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    opt = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return Resume(int(state["step"]), int(state["skipped"]), str(folder / "lora"), opt)


def write_checkpoint(folder: Path, unet, flavour: str, optimizer, step: int, skipped: int, cfg) -> Path:
    models.save_lora(unet, folder / "lora", flavour)
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    (folder / STATE_FILE).write_text(json.dumps({"step": step, "skipped": skipped, "seed": cfg.train.seed}))
    config_mod.dump(cfg, folder / "config.yaml")
    return folder


@dataclass
class Worker:
    """What one worker holds: models, LoRA, optimizer, reward."""

    cfg: config_mod.Config
    device: torch.device
    rank: int = 0
    world: int = 1
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m  # DDP wrapper from Ray Train
    c: models.Components = field(init=False)

    def __post_init__(self):
        cfg = self.cfg
        self.amp = autocast_dtype(cfg.train.mixed_precision, self.device)
        self.c = models.load_components(cfg.model)
        if self.amp is not None:
            self.c.unet.to(self.amp)
        self.c.to(self.device, self.amp)
        self.params = models.add_lora(self.c.unet, cfg.lora, seed=cfg.train.seed)
        self.unet = self.wrap(self.c.unet)  # the forward pass goes through the wrapped module
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           weight_decay=cfg.optim.weight_decay)
        self.reward = build_composite(cfg.rewards, device=self.device)
        self.schedule = sampling.Schedule.from_scheduler(self.c.scheduler, cfg.sampling.num_steps).to(self.device)
        self.prompts = cfg.training_prompts()

    def restore(self, resume: Resume):
        models.load_lora_weights_into(self.c.unet, resume.lora_dir)
        self.optimizer.load_state_dict(resume.optimizer_state)

    def train_step(self, step: int) -> dict:
        cfg, B = self.cfg, self.cfg.train.batch_size
        t0 = time.perf_counter()
        # 1. this step's prompts, noise and step plan, from (seed, step, rank)
        g = step_generator(cfg.train.seed, step, self.rank)
        prompts = [self.prompts[i] for i in torch.randint(len(self.prompts), (B,), generator=g).tolist()]
        x_T = torch.randn((B, self.c.unet.config.in_channels, *(2 * [cfg.model.resolution // self.c.vae_scale_factor])),
                          generator=g).to(self.device)
        plan = sampling.make_plan(cfg.method, cfg.sampling.num_steps, B, g)
        # 2. sample with gradient where the plan says, decode
        cond = models.encode_prompts(self.c, prompts, cfg.sampling.negative_prompt, cfg.model.resolution, self.device)
        denoise = models.make_denoiser(self.unet, cond, cfg.sampling.guidance_scale, self.amp)
        res = sampling.sample(denoise, self.schedule, x_T, plan, eta=cfg.sampling.eta, generator=g,
                              gradient_checkpointing=cfg.train.gradient_checkpointing)
        images = models.decode(self.c.vae, res.latents)
        t_sample = time.perf_counter()
        # 3. reward and loss (DRaFT-LV: averaged over its copies)
        total, parts = self.reward(images, prompts * res.copies)
        r = res.copy_mean(total)
        loss = reward_loss(r, cfg.loss).mean()
        t_reward = time.perf_counter()
        # 4. backward, clip, guarded step
        loss.backward()
        stepped, gnorm = guarded_step(self.params, self.optimizer, loss.detach(), cfg.optim.grad_clip)
        t_end = time.perf_counter()
        row = {"step": step, "reward_mean": r.mean().item(), "reward_std": r.std().item() if B > 1 else 0.0,
               "loss": loss.item(), "grad_norm": gnorm, "stepped": int(stepped),
               "trained_steps": sum(rec.grad for rec in res.trace),
               "s_sample": t_sample - t0, "s_reward": t_reward - t_sample, "s_backward": t_end - t_reward,
               "s_step": t_end - t0}
        row.update({f"reward/{k}": res.copy_mean(v).mean().item() for k, v in parts.items()})
        return row

    @torch.no_grad()
    def render(self, prompts, seeds) -> torch.Tensor:
        """Images of (prompt, seed) pairs, row-major, with the current LoRA."""
        return evaluate.render(self.c, prompts, seeds, self.cfg.sampling, self.cfg.model.resolution, self.device,
                               self.amp, unet=self.unet)


def run_training(cfg: config_mod.Config, *, device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
                 resume: Resume | None = None, report: Callable[[dict, Path | None], None] | None = None,
                 wrap: Callable = lambda m: m) -> dict:
    """Train for cfg.train.steps; returns the last metrics row. `report(row, checkpoint_dir)` is
    called on every worker the same number of times (every step; with a folder on checkpoint
    steps, rank 0 only)."""
    out = Path(cfg.output_dir)
    resume = resume or Resume()
    w = Worker(cfg, torch.device(device), rank, world, wrap)
    if resume.lora_dir:
        w.restore(resume)
    grid_prompts = cfg.grid.prompts or w.prompts[:4]
    main = rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(out / "metrics.csv", resume.step)
        if resume.step:
            print(f"[rayreward] resuming from the checkpoint at step {resume.step} in {out / 'ray' / cfg.name}"
                  + (" (already complete)" if resume.step >= cfg.train.steps else ""), flush=True)
        else:
            evaluate.save_grid(w.render(grid_prompts, cfg.grid.seeds), grid_prompts, cfg.grid.seeds, out / "grid_start.png")
        print(f"[rayreward] {cfg.method.name} on {cfg.model.name} ({w.c.flavour}), T={cfg.sampling.num_steps}, "
              f"{sum(p.numel() for p in w.params):,} LoRA params, steps {resume.step}..{cfg.train.steps - 1}", flush=True)
    skipped, row = resume.skipped, {}
    for step in range(resume.step, cfg.train.steps):
        row = w.train_step(step)
        skipped += 1 - row["stepped"]
        row["skipped_total"] = skipped
        last = step == cfg.train.steps - 1
        ckpt = None
        if main:
            log.append(row)
            print(f"[rayreward] step {step + 1}/{cfg.train.steps} | reward {row['reward_mean']:+.4f} "
                  f"± {row['reward_std']:.4f} | loss {row['loss']:+.4f} | grad {row['grad_norm']:.2e} | "
                  f"{row['s_step']:.2f} s/step" + ("" if row["stepped"] else " | SKIPPED (non-finite)"), flush=True)
            if (step + 1) % cfg.train.checkpoint_every == 0 or last:
                ckpt = Path(tempfile.mkdtemp(prefix="rayreward-ckpt-"))
                write_checkpoint(ckpt, w.c.unet, w.c.flavour, w.optimizer, step + 1, skipped, cfg)
                evaluate.plot_metrics(out / "metrics.csv", out / "reward_curve.png")
        if report is not None:
            report(row, ckpt)
    if main:
        models.save_lora(w.c.unet, out / "lora", w.c.flavour)
        evaluate.save_grid(w.render(grid_prompts, cfg.grid.seeds), grid_prompts, cfg.grid.seeds, out / "grid_end.png")
        evaluate.plot_metrics(out / "metrics.csv", out / "reward_curve.png")
    return row


# ---------------------------------------------------------------------------------------------
# Ray Train.


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry: everything arrives through `loop_config` (a Config as a dict)."""
    import ray.train
    import ray.train.torch

    cfg = config_mod.from_dict(loop_config)
    ctx = ray.train.get_context()  # [1] who am I
    resume = None
    ckpt = ray.train.get_checkpoint()  # [2] resume from the latest checkpoint, if any
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = read_checkpoint(d)

    def report(row: dict, folder: Path | None) -> None:  # [3] every worker, every step
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if folder is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))

    run_training(cfg, device=ray.train.torch.get_device(), rank=ctx.get_world_rank(),
                 world=ctx.get_world_size(), resume=resume, report=report,
                 wrap=ray.train.torch.prepare_model if ctx.get_world_size() > 1 else (lambda m: m))  # [4] DDP


def fit(cfg: config_mod.Config):
    """Driver: start or join Ray, run the TorchTrainer, return its Result."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(cfg.output_dir).resolve()
    cfg.output_dir = str(out)
    cfg.prompts, cfg.prompt_file = cfg.training_prompts(), None  # the workers get the prompts themselves
    out.mkdir(parents=True, exist_ok=True)
    config_mod.dump(cfg, out / "config.yaml")
    if not ray.is_initialized():
        # Train V2 re-routes worker print() through logging and tees it: each line would show twice
        env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
        if "RAYREWARD_CACHE" in os.environ:
            env["RAYREWARD_CACHE"] = os.environ["RAYREWARD_CACHE"]
        ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": env}, log_to_driver=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu),
        run_config=RunConfig(name=cfg.name, storage_path=str(out / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=0),
                             logging_config=LoggingConfig(log_level="WARNING")),  # our progress line is enough
    )
    return trainer.fit()
