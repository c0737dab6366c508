"""The training loop: one function per worker, run by Ray Train (`driver.train_loop_per_worker`) or
in-process in tests and benchmarks.

Each step: pick prompts and x_T -> draw the method's step plan -> sample (gradient only where the
plan says) -> decode -> reward -> loss -> backward -> clip -> guarded AdamW step -> log ->
checkpoint. A sample's prompt and noise depend only on (seed, step, global sample index) and the
step plan on (seed, step), so a resumed run draws exactly what the uninterrupted run would have,
and N workers x B samples compute what 1 worker x N*B samples does (docs/design.md, "Randomness").
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rayreward import config as config_mod
from rayreward import lora_io, methods, models, render, runtime, sampling, serving
from rayreward.errors import RewardCallError, RewardGradientError, first_line
from rayreward.outputs import RunOutputs, lora_files
from rayreward.runfolder import Resume, write_checkpoint



# ---------------------------------------------------------------------------------------------
# Small pure pieces.


def guarded_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, loss: torch.Tensor | float,
                 grad_clip: float, trained: bool = True) -> tuple[bool, float]:
    """Clip and step, unless nothing was trained (`trained` False: no worker ran a grad-carrying
    UNet call, so AdamW must not move the LoRA on momentum alone) or the loss or the gradient norm
    is not finite: then the step is skipped and the parameters stay as they are.
    Returns (stepped, grad_norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.zeros(())
    finite = bool(torch.isfinite(torch.as_tensor(loss)).all()) and bool(torch.isfinite(norm))
    stepped = finite and trained
    if stepped:
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stepped, float(norm)


# ---------------------------------------------------------------------------------------------
# The loop.


def _reward_failed(where: str, e: RewardCallError) -> RewardCallError:
    """The reward's error, said where it happened (a step, a grid); a remote reward's arrives
    inside Ray's RayTaskError, whose `cause` is the reward's own."""
    return RewardCallError(f"{where}: {first_line(getattr(e, 'cause', None) or e)}")


def backward_checked(loss: torch.Tensor, images: torch.Tensor, cfg: config_mod.Config) -> None:
    """The backward of the first step that trains anything, checking that the reward can train:
    the loss depends on the images and, for the linear loss, its gradient with respect to them is
    not zero (a saturated hinge may legitimately give zero). Raises RewardGradientError."""
    def no_gradient(what: str) -> RewardGradientError:
        names = ", ".join(s.name for s in cfg.rewards)
        return RewardGradientError(
            f"reward {names}: {what}, so training would change nothing. A reward must be computed from `images` "
            "with differentiable torch ops (no .detach(), .item(), numpy or PIL, and not under torch.no_grad()).")

    if not bool(torch.isfinite(loss.detach()).all()):
        names = ", ".join(s.name for s in cfg.rewards)
        raise RewardGradientError(f"reward {names}: the loss is {float(loss.detach()):g} on the first trained step: "
                                  "a reward returned NaN or inf for these images")
    if not loss.requires_grad:
        raise no_gradient("the loss does not depend on the images (no gradient path)")
    images.retain_grad()
    loss.backward()
    g = images.grad
    if cfg.loss.kind == "linear" and (g is None or not bool(g.abs().sum() > 0)):
        raise no_gradient("its gradient with respect to the images is zero on the first step")


def _seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across processes)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class GradSync:
    """Data parallelism by hand: the LoRA gradients and the step's statistics of all workers
    are averaged in one all-reduce of one flat tensor, after backward.

    Why not DDP: its bucketed all-reduce fires from autograd hooks and assumes one forward per
    backward; a sampling chain makes a varying number of grad-carrying UNet calls per step
    (DRTune's early stop, AlignProp's truncation), which DDP either rejects or, with
    static_graph, reduces at the wrong moment. One explicit all-reduce after backward is exact
    for any number of calls (docs/design.md, "Data parallelism")."""

    def __init__(self, params: list[torch.nn.Parameter], world: int):
        import torch.distributed as dist

        self.params, self.world, self.dist = params, world, dist
        self.active = world > 1 and dist.is_available() and dist.is_initialized()

    def broadcast_from_rank0(self) -> None:
        if self.active:
            for p in self.params:
                self.dist.broadcast(p.data, src=0)

    def average(self, stats: "StepStats") -> "StepStats":
        """Average every worker's LoRA gradients (in place; a worker without a gradient adds
        zeros) and its step statistics; returns the averaged statistics."""
        if not self.active:
            return stats
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        packed = stats.pack()
        flat = torch.cat([g.flatten() for g in grads] + [packed.to(grads[0])])
        self.dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in self.params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return stats.unpack(flat[offset:])

    def slowest(self, seconds: float) -> float:
        """The largest of every worker's `seconds` (one scalar all-reduce)."""
        if not self.active:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return float(t)

    def max_divergence(self) -> float:
        """Largest difference of a LoRA fingerprint (sum, sum of squares) between workers."""
        if not self.active:
            return 0.0
        fp = torch.stack([sum(p.detach().double().sum() for p in self.params),
                          sum(p.detach().double().pow(2).sum() for p in self.params)])
        lo, hi = fp.clone(), fp.clone()
        self.dist.all_reduce(lo, op=self.dist.ReduceOp.MIN)
        self.dist.all_reduce(hi, op=self.dist.ReduceOp.MAX)
        return float((hi - lo).abs().max())


@dataclass
class StepStats:
    """One step's statistics on one worker; `GradSync.average` averages them over workers in the
    same all-reduce as the gradients (packed into a flat tensor and out again)."""

    loss: float
    reward_mean: float  # E[r] over the batch
    reward_sq: float  # E[r^2], for the global standard deviation
    trained_calls: float  # grad-carrying UNet calls (0: this worker trained nothing)
    parts: dict[str, float] = field(default_factory=dict)  # each reward component's batch mean

    def pack(self) -> torch.Tensor:
        head = [self.loss, self.reward_mean, self.reward_sq, self.trained_calls]
        return torch.tensor(head + list(self.parts.values()), dtype=torch.float64)

    def unpack(self, flat: torch.Tensor) -> "StepStats":
        """The same statistics with the values of `flat` (from `pack`, averaged)."""
        v = [float(x) for x in flat.double().cpu()]
        return StepStats(*v[:4], parts=dict(zip(self.parts, v[4:])))


@dataclass
class StepTimes:
    """Where one step's time went on this worker (seconds, perf_counter)."""

    started: float  # perf_counter at the step's start
    sample: float  # prompts, noise, plan, the sampling chain and the VAE decode
    reward: float  # the reward and loss (in-process, or the round trip to a reward actor)


class Worker:
    """What one worker holds for a run: models with the LoRA, optimizer, gradient sync, the
    reward client (in-process or remote, chosen by serving.reward_client) and the schedule."""

    cfg: config_mod.Config
    device: torch.device
    rank: int
    world: int
    amp: torch.dtype | None  # the frozen weights' dtype (bf16/fp16 on CUDA; None: fp32); the LoRA stays fp32
    c: models.Components  # UNet (with LoRA), VAE, text encoder(s), tokenizer(s), scheduler
    unet: torch.nn.Module  # what the chain calls: c.denoiser, or its torch.compile (train.compile)
    params: list[torch.nn.Parameter]  # the LoRA parameters, the only ones trained
    sync: GradSync
    optimizer: torch.optim.AdamW
    score: Callable  # (images, prompts, copies) -> (loss, rewards, components): a serving.*Reward
    schedule: sampling.Schedule
    prompts: list[str]  # the training prompts

    def __init__(self, cfg: config_mod.Config, device: torch.device, score: Callable, rank: int = 0, world: int = 1,
                 components: models.Components | None = None):
        """`components`: models already in memory (benchmarks build real-shape pipelines in code);
        default: loaded from cfg.model."""
        self.cfg, self.device, self.score, self.rank, self.world = cfg, device, score, rank, world
        self.amp = runtime.compute_dtype(cfg.train.mixed_precision, device)
        t0 = time.perf_counter()
        self.c = components if components is not None else models.load_components(cfg.model)
        if rank == 0 and components is None:
            print(f"[rayreward] model {cfg.model.name} loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        if self.amp is not None:
            self.c.denoiser.to(self.amp)
        offload = cfg.model.offload_text_encoders and device.type != "cpu"
        self.c.to(device, self.amp, text_encoders=not offload)
        # prompt embeddings once per prompt, by the text encoders on the device or (offloaded) the CPU
        self.prompt_cache = models.PromptCache(self.c, torch.device("cpu") if offload else device, device)
        self.params = models.add_lora(self.c.denoiser, cfg.lora, seed=cfg.train.seed)
        if cfg.train.vae_checkpointing:  # diffusers recomputes the decoder's blocks in backward
            self.c.vae.enable_gradient_checkpointing()
        self.unet = models.compile_unet(self.c.denoiser, cfg.train.compile)
        self.sync = GradSync(self.params, world)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        self.schedule = models.make_schedule(self.c, cfg.sampling.num_steps, cfg.model.resolution).to(device)
        self.prompts = cfg.training_prompts()
        self._reward_checked = False  # the first grad-carrying step checks the reward has a gradient

    def restore(self, resume: Resume):
        """LoRA and AdamW moments from a checkpoint; the hyper-parameters are this config's (the
        optimizer state would otherwise bring back the learning rate it was saved with)."""
        lora_io.load_lora_weights_into(self.c.denoiser, resume.lora_state, what=f"checkpoint {resume.folder}")
        self.optimizer.load_state_dict(resume.optimizer_state)
        o = self.cfg.optim
        for group in self.optimizer.param_groups:
            group.update(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

    def draw_batch(self, step: int):
        """This worker's share of step `step`'s global batch: prompts, x_T, the step plan and the
        sampler's noise generators. Sample i of the global batch depends on (seed, step, i) only
        (its prompt, x_T and AlignProp draw from one generator; its step noise and DRaFT-LV
        re-noising from another), and the plan on (seed, step), so N workers x B samples see what
        1 worker x N*B sees, for every eta and method."""
        cfg, B = self.cfg, self.cfg.train.batch_size
        seed = cfg.train.seed
        mine = range(self.rank * B, (self.rank + 1) * B)
        gens = [torch.Generator().manual_seed(_seed(seed, step, "sample", i)) for i in mine]
        prompts = [self.prompts[int(torch.randint(len(self.prompts), (1,), generator=g))] for g in gens]
        side = self.c.family.latent_side(self.c, cfg.model.resolution)
        x_T = torch.cat([torch.randn((1, self.c.family.latent_channels(self.c), side, side), generator=g) for g in gens])
        plan = methods.make_plan(cfg.method, cfg.sampling.num_steps, B,
                                  torch.Generator().manual_seed(_seed(seed, step, "plan")), sample_gens=gens)
        noise = [torch.Generator().manual_seed(_seed(seed, step, "noise", i)) for i in mine]
        return prompts, x_T.to(self.device), plan, noise

    def forward_backward(self, step: int) -> tuple[StepStats, StepTimes, sampling.SampleResult]:
        """Sample, reward, backward and average over workers; the LoRA .grad then holds the
        global batch's gradient. Returns the averaged statistics, timings and the sample."""
        cfg = self.cfg
        t0 = time.perf_counter()
        # 1. this step's prompts, noise and step plan
        prompts, x_T, plan, noise = self.draw_batch(step)
        # 2. sample with gradient where the plan says, decode
        cond = self.prompt_cache(prompts, cfg.sampling.negative_prompt, cfg.model.resolution)
        denoise = models.make_denoiser(self.unet, cond, cfg.sampling.guidance_scale, self.amp, cfg.sampling.uncond_grad)
        res = sampling.sample(denoise, self.schedule, x_T, plan, eta=cfg.sampling.eta, generator=noise,
                              gradient_checkpointing=cfg.train.gradient_checkpointing)
        images = models.decode_latents(self.c, res.latents)
        t_sample = time.perf_counter()
        # 3. reward and loss, in-process or one round trip to a reward actor
        try:
            loss, r, parts = self.score(images, prompts, res.copies)
        except RewardCallError as e:
            raise _reward_failed(f"step {step}", e) from None
        t_reward = time.perf_counter()
        # 4. backward (none when no grad-carrying step ran, e.g. DRTune's K steps all after the
        #    early stop); average gradients and statistics over workers
        if not self._reward_checked and images.requires_grad:  # the first step that trains anything
            backward_checked(loss, images, cfg)
            self._reward_checked = True
        elif loss.requires_grad:
            loss.backward()
        # one device-to-host transfer for all the statistics
        values = torch.stack([loss.detach().float(), r.detach().float().mean(), r.detach().float().pow(2).mean(),
                              *[v.detach().float().mean() for v in parts.values()]]).cpu().tolist()
        stats = StepStats(*values[:3], trained_calls=float(sum(rec.grad for rec in res.trace)),
                          parts=dict(zip(parts, values[3:])))
        stats = self.sync.average(stats)
        return stats, StepTimes(t0, t_sample - t0, t_reward - t_sample), res

    def train_step(self, step: int) -> dict:
        """One optimizer step; returns its metrics row (averaged over workers)."""
        cfg = self.cfg
        stats, times, res = self.forward_backward(step)
        trained = stats.trained_calls > 0  # on any worker: the same decision on every rank
        stepped, gnorm = guarded_step(self.params, self.optimizer, stats.loss, cfg.optim.grad_clip, trained)
        t_end = time.perf_counter()
        n = self.world * cfg.train.batch_size
        var = max(stats.reward_sq - stats.reward_mean ** 2, 0.0) * n / max(n - 1, 1)
        row = {"step": step, "reward_mean": stats.reward_mean, "reward_std": var**0.5,
               "loss": stats.loss, "grad_norm": gnorm, "stepped": int(stepped),
               "trained_steps": stats.trained_calls,  # grad-carrying UNet calls, mean over workers
               "unet_calls": res.unet_calls,  # per sample, this worker's (every worker runs the same plan)
               "s_sample": times.sample, "s_reward": times.reward,
               # backward + gradient all-reduce + optimizer step
               "s_backward": t_end - times.started - times.sample - times.reward,
               "s_step": t_end - times.started,
               "time": time.time()}  # the step's end (unix seconds): steps' spacing is the run's real pace
        row.update({f"reward/{k}": v for k, v in stats.parts.items()})
        return row

    @torch.no_grad()
    def render(self, prompts, seeds) -> torch.Tensor:
        """Images of (prompt, seed) pairs, row-major, with the current LoRA. Eager UNet: a grid is
        rendered twice a run, at a batch no training step has, so compiling it would not pay."""
        return render.render(self.c, prompts, seeds, self.cfg.sampling, self.cfg.model.resolution, self.device,
                             self.amp, prompt_cache=self.prompt_cache)

    def grid(self, prompts, label: str, written: RunOutputs, step: int) -> dict[str, float]:
        """Render `prompts` x grid.seeds with the current LoRA, score the images with every reward
        and hand both to the output folder's writer (grid_<label>.png, grid_scores.csv, the
        trackers). Returns the grid's mean of each reward."""
        seeds = self.cfg.grid.seeds
        t0 = time.perf_counter()
        images = self.render(prompts, seeds)
        print(f"[rayreward] {label} grid: {len(images)} images in {time.perf_counter() - t0:.1f} s", flush=True)
        try:
            scores = self.score.score_only(images, [p for p in prompts for _ in seeds])
        except RewardCallError as e:
            raise _reward_failed(f"{label} grid", e) from None
        return written.grid(label, images.cpu(), list(prompts), list(seeds),
                            {k: v.detach().cpu() for k, v in scores.items()}, step)

    def warm_up(self) -> float:
        """Compile the UNet's graphs for this run's shapes before the first step (train.compile):
        one no-grad call and one grad-carrying call with its backward, as the chain makes them.
        Returns the seconds it took; the LoRA and its gradients are left as they were."""
        if self.cfg.train.compile == "off":
            return 0.0
        t0 = time.perf_counter()
        prompts, x_T, plan, _ = self.draw_batch(0)
        cond = self.prompt_cache(prompts, self.cfg.sampling.negative_prompt, self.cfg.model.resolution)
        denoise = models.make_denoiser(self.unet, cond, self.cfg.sampling.guidance_scale, self.amp,
                                       self.cfg.sampling.uncond_grad)
        t, ckpt = self.schedule.timesteps[0], self.cfg.train.gradient_checkpointing
        sampling.call_denoiser(denoise, x_T, t, False, ckpt)
        # grad-carrying calls see sg(x_t) (DRTune), or also an x_t that carries gradient from an
        # earlier trained step (a graph of its own)
        for x in [x_T] + ([] if plan.detach_input else [x_T.clone().requires_grad_(True)]):
            (sampling.call_denoiser(denoise, x, t, True, ckpt).sum() * 0).backward()
        for p in self.params:
            p.grad = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


def run_training(cfg: config_mod.Config, *, device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
                 resume: Resume | None = None, report: Callable[[dict, Path | None], None] | None = None,
                 reward_actors: list | None = None, written: RunOutputs | None = None) -> dict:
    """Train for cfg.train.steps; returns the last metrics row. `report(row, checkpoint_dir)` is
    called on every worker the same number of times (every step; with a folder on checkpoint
    steps, rank 0 only). Rewards run where `reward_server.mode` says: with "remote", in
    `reward_actors` (the driver's), else in actors started for this call. Rank 0 writes the
    output folder through `written` (under Ray Train, the driver's writer actor; default: a
    RunOutputs in this process)."""
    written = (written or RunOutputs(cfg)) if rank == 0 else None
    with serving.reward_client(cfg, torch.device(device), rank, reward_actors) as score:
        return _train(cfg, Worker(cfg, torch.device(device), score, rank, world), resume or Resume(), report, written)


def _train(cfg: config_mod.Config, w: Worker, resume: Resume, report, written) -> dict:
    """The loop; rank 0's tracked runs end FINISHED, or FAILED / KILLED when it stops early."""
    try:
        row = _loop(cfg, w, resume, report, written)
    except BaseException as e:  # Ctrl-C / SIGTERM reach a worker as KeyboardInterrupt or SystemExit
        if written is not None:
            written.close("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    if written is not None:
        written.close()
    return row


def _loop(cfg: config_mod.Config, w: Worker, resume: Resume, report, written) -> dict:
    """Steps resume.step .. train.steps - 1 (or until train.max_unet_calls), top to bottom:
    restore -> open the run folder (rank 0) -> compile warm-up -> per step: train, tally, check the
    workers agree, log, report (with a checkpoint on checkpoint steps) -> finish (rank 0)."""
    main = w.rank == 0
    # 1. the LoRA and optimizer from the checkpoint; every worker starts from rank 0's weights
    if resume.lora_state is not None:
        w.restore(resume)
    w.sync.broadcast_from_rank0()
    grid_prompts = cfg.grid.prompts or w.prompts[:4]
    if main:
        _open_run_folder(cfg, w, resume, written, grid_prompts)
    # 2. compile before the first step (train.compile), timed apart from the steps
    tally = Tally(resume.skipped, resume.unet_calls, resume.seconds)
    s_compile = w.warm_up() if not finished(cfg, resume.step, tally.calls, tally.seconds) else 0.0  # 0 without compile
    if main and s_compile:
        print(f"[rayreward] torch.compile ({cfg.train.compile}): {s_compile:.1f} s, once per worker; not in s/step",
              flush=True)
    fault_at = runtime.fault_step() if main else None  # tests only
    row: dict = {}
    for step in range(resume.step, cfg.train.steps):
        if finished(cfg, step, tally.calls, tally.seconds):  # a budget, reached before a resume
            break
        if step == fault_at and written.first_fault(step):  # tests only
            print(f"[rayreward] fault injection: worker 0 exits at step {step}", flush=True)
            os._exit(1)
        # 3. one optimizer step, and the run's running totals in its row
        # the slowest worker's seconds only where a time mark needs every worker to agree (an all-reduce)
        before = tally.seconds
        row = tally.add(w.train_step(step), w.sync if timed(cfg) else None)
        if main and before < cfg.train.lora_at_seconds <= tally.seconds:
            _lora_at_seconds(w, row, written)
        if step == resume.step and s_compile:
            row["s_compile"] = s_compile
        checkpoint_now = (step + 1) % cfg.train.checkpoint_every == 0 or finished(cfg, step + 1, tally.calls, tally.seconds)
        if checkpoint_now:
            row["lora_divergence"] = _check_in_sync(w, step)  # every worker takes part
        # 4. rank 0 logs the row; every worker reports it, with a checkpoint on checkpoint steps
        if main:
            written.row(row, plot=checkpoint_now)
            print(progress_line(row, cfg.train.steps), flush=True)
        if report is not None:
            _report(report, row, w, step, tally, cfg, checkpoint=main and checkpoint_now)
    if main:
        _finish(cfg, w, row, resume, written, grid_prompts)
    return row


@dataclass
class Tally:
    """A run's running totals, kept in each row: skipped (non-finite) steps, UNet calls per sample,
    training seconds (the slowest worker's, so that every worker stops on train.max_seconds at the
    same step) and the reward smoothed over the last 5 steps (what sweeps rank and stop trials on)."""

    skipped: int = 0
    calls: int = 0
    seconds: float = 0.0
    recent: list[float] = field(default_factory=list)

    def add(self, row: dict, sync: "GradSync | None" = None) -> dict:
        self.skipped += int(not row["stepped"] and row["trained_steps"] > 0)  # non-finite, not merely empty
        self.calls += row["unet_calls"]
        self.seconds += row["s_step"] if sync is None else sync.slowest(row["s_step"])
        self.recent = (self.recent + [row["reward_mean"]])[-5:]
        return {**row, "skipped_total": self.skipped, "unet_calls_total": self.calls,
                "train_seconds_total": self.seconds, "reward_smooth": sum(self.recent) / len(self.recent)}


def _open_run_folder(cfg: config_mod.Config, w: Worker, resume: Resume, written, grid_prompts: list[str]) -> None:
    """Rank 0, before the first step: the output folder opened at the checkpoint's step (config.yaml,
    metrics.csv cut back there, the trackers), the start grid on a fresh run, and the run's line."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    written.open(resume.step, node)
    if resume.step:
        print(f"[rayreward] resuming from the checkpoint at step {resume.step} in {resume.folder}"
              + (" (already complete)" if finished(cfg, resume.step, resume.unet_calls, resume.seconds) else ""), flush=True)
    else:
        w.grid(grid_prompts, "start", written, step=0)
    print(f"[rayreward] {cfg.method.name} on {cfg.model.name} ({w.c.flavour}), T={cfg.sampling.num_steps}, "
          f"{w.world} worker(s) x batch {cfg.train.batch_size}, rewards {cfg.reward_server.mode}, "
          f"{sum(p.numel() for p in w.params):,} LoRA params, steps {resume.step}..{cfg.train.steps - 1}", flush=True)


def _check_in_sync(w: Worker, step: int) -> float:
    """The largest difference of the LoRA weights between workers; raises when they diverged (a
    real check, not an assert: `python -O` keeps it)."""
    divergence = w.sync.max_divergence()
    scale = max(1.0, float(sum(p.detach().abs().sum() for p in w.params)))
    if not divergence < 1e-6 * scale:
        raise RuntimeError(f"workers' LoRA weights diverged ({divergence:.3g} at step {step}): "
                           "the gradient sync is broken; please report it with metrics.csv")
    return divergence


def _report(report, row: dict, w: Worker, step: int, tally: Tally, cfg: config_mod.Config, checkpoint: bool) -> None:
    """Report the row to Ray Train; with `checkpoint` (rank 0 on checkpoint steps), a checkpoint
    staged in a temporary folder that Ray copies to the run's storage."""
    if not checkpoint:
        report(row, None)
        return
    with tempfile.TemporaryDirectory(prefix="rayreward-ckpt-") as tmp:
        report(row, write_checkpoint(Path(tmp), w.c.denoiser, w.c.flavour, w.optimizer, step + 1, tally.skipped, cfg,
                                     tally.calls, tally.seconds))


def _finish(cfg: config_mod.Config, w: Worker, row: dict, resume: Resume, written, grid_prompts: list[str]) -> None:
    """Rank 0, after the last step: the final LoRA (first: nothing after it can lose it), the end
    grid and its change against the start grid, the model card, the trackers, the curve."""
    written.lora(lora_files(w.c.denoiser, w.c.flavour))
    w.grid(grid_prompts, "end", written, step=int(row.get("step", resume.step - 1)) + 1)
    change = written.finish(row, w.c.flavour)
    if change:
        print(f"[rayreward] grid ({len(grid_prompts) * len(cfg.grid.seeds)} images, the same prompts and seeds), "
              f"start -> end: {change}", flush=True)


def timed(cfg: config_mod.Config) -> bool:
    """Whether the run acts on its training seconds (train.max_seconds or train.lora_at_seconds):
    then every worker counts the slowest worker's, so that all agree on the step."""
    return cfg.train.max_seconds > 0 or cfg.train.lora_at_seconds > 0


LORA_AT_SECONDS = "lora_at_seconds"  # the folder of train.lora_at_seconds's LoRA, with at.json


def _lora_at_seconds(w: Worker, row: dict, written) -> None:
    """Rank 0, after the step whose training seconds first reach train.lora_at_seconds: the LoRA
    as it is now, and at.json (the step, UNet calls and seconds it has trained)."""
    at = {"steps": int(row["step"]) + 1, "train_seconds_total": row["train_seconds_total"],
          "unet_calls_total": row["unet_calls_total"], "lora_at_seconds": w.cfg.train.lora_at_seconds}
    files = {**lora_files(w.c.denoiser, w.c.flavour), "at.json": json.dumps(at, indent=1).encode()}
    folder = written.lora(files, LORA_AT_SECONDS)
    print(f"[rayreward] LoRA at {at['train_seconds_total']:.1f} s of training (step {at['steps']}): {folder}", flush=True)


def finished(cfg: config_mod.Config, steps_done: int, calls_done: int, seconds_done: float = 0.0) -> bool:
    """Whether a run that has made `steps_done` steps, `calls_done` UNet calls per sample and
    trained `seconds_done` seconds is done: train.steps reached, or train.max_unet_calls or
    train.max_seconds (when set)."""
    t = cfg.train
    return (steps_done >= t.steps or (t.max_unet_calls > 0 and calls_done >= t.max_unet_calls)
            or (t.max_seconds > 0 and seconds_done >= t.max_seconds))


def progress_line(row: dict, steps: int) -> str:
    """The console line of one step; `step` counts from 0 as in metrics.csv, [n/N] is progress."""
    note = ""
    if not row["stepped"]:
        note = " | SKIPPED (non-finite)" if row["trained_steps"] > 0 else " | no trained step: no update"
    return (f"[rayreward] step {row['step']} [{row['step'] + 1}/{steps}] | reward {row['reward_mean']:+.4f} "
            f"± {row['reward_std']:.4f} | loss {row['loss']:+.4f} | grad {row['grad_norm']:.2e} | "
            f"{row['s_step']:.2f} s/step{note}")
