"""Bytes saved for backward and seconds per training step, per method, as T grows.

    python benchmarks/memory.py                       # tiny SD-1.x, 64 px, batch 2, T in {10, 20, 50}, K = 2
    python benchmarks/memory.py --steps 10 20 --methods drtune draft --csv out.csv --png out.png
    python benchmarks/memory.py --model tiny-sd3 --resolution 32 --steps 10 --methods draft --uncond-grad both

One full training step (sample -> decode -> reward -> backward) per cell, on the same draws for
every T (plan seed fixed). "saved MB" counts the distinct storages autograd keeps for backward,
seen through torch.autograd.graph.saved_tensors_hooks, without parameter storage (weights are
saved by reference, they cost no new memory). With gradient checkpointing, what a checkpointed
UNet call saves is recomputed in backward; the checkpoint keeps only its inputs, which are added
here explicitly (the checkpoint's own hooks hide them from ours). Timings: median of --repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from rayreward import config, methods, models, reports, sampling
from rayreward.rewards.composite import build_composite, reward_and_loss

METHODS = list(methods.METHODS)


class SavedBytes:
    """Distinct non-parameter storages saved for backward inside the context."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip:
            self.seen[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def one_step(c, params, reward, cfg, T: int, checkpointing: bool, measure: bool):
    B = cfg.train.batch_size
    g = torch.Generator().manual_seed(1234)  # the same draws for every method and T
    plan = methods.make_plan(cfg.method, T, B, g)
    prompts = [("a cat", "a dog", "a car", "a tree")[i % 4] for i in range(B)]
    cond = models.encode_prompts(c, prompts, "", cfg.model.resolution, "cpu")
    schedule = models.make_schedule(c, T, cfg.model.resolution)
    side = c.family.latent_side(c, cfg.model.resolution)
    x_T = torch.randn((B, c.family.latent_channels(c), side, side), generator=g)
    counter = SavedBytes(list(c.denoiser.parameters()) + list(c.vae.parameters()))
    t0 = time.perf_counter()
    with (counter if measure else torch.enable_grad()):
        denoise = models.make_denoiser(c.denoiser, cond, cfg.sampling.guidance_scale, uncond_grad=cfg.sampling.uncond_grad)
        res = sampling.sample(denoise, schedule, x_T, plan,
                              generator=g, gradient_checkpointing=checkpointing)
        images = models.decode_latents(c, res.latents)
        loss, _, _ = reward_and_loss(reward, cfg.loss, images, prompts, res.copies)
    loss.backward()
    seconds = time.perf_counter() - t0
    for p in params:
        p.grad = None
    grad_calls = [r for r in res.trace if r.grad]
    extra = 0
    if checkpointing:  # each checkpointed call keeps its input x_t: (b or n*b, 4, h, w) fp32
        extra = sum((res.copies if r is res.trace[-1] and res.copies > 1 else 1) * x_T.numel() * 4 for r in grad_calls)
    return counter.total + extra, seconds, len(grad_calls)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--uncond-grad", choices=["on", "off", "both"], default="on",
                    help="CFG's unconditional branch with gradient (on, exact), without (off), or a row for each")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    rows = []
    grads = {"on": [True], "off": [False], "both": [True, False]}[args.uncond_grad]
    for method, T, uncond in ((m, T, u) for m in args.methods for T in args.steps for u in grads):
        cfg = config.from_dict({"model": {"name": args.model, "resolution": args.resolution},
                                "sampling": {"num_steps": T, "uncond_grad": uncond},
                                "method": {"name": method, "k": args.k, "early_stop_m": max(1, int(0.4 * T)),
                                           "refl_window": [1, max(1, T // 4)]},
                                "train": {"batch_size": args.batch}})
        c = models.load_components(cfg.model)
        params = models.add_lora(c.denoiser, cfg.lora)
        reward = build_composite(cfg.rewards)
        for ckpt in (False, True):
            one_step(c, params, reward, cfg, T, ckpt, measure=False)  # warm-up
            saved, _, n_grad = one_step(c, params, reward, cfg, T, ckpt, measure=True)
            secs = [one_step(c, params, reward, cfg, T, ckpt, measure=False)[1] for _ in range(args.repeats)]
            rows.append({"method": method, "T": T, "uncond_grad": uncond, "checkpointing": ckpt, "trained_steps": n_grad,
                         "saved_MB": saved / 2**20, "s_per_step": statistics.median(secs)})
            r = rows[-1]
            print(f"{method:10s} T={T:3d} uncond_grad={str(uncond):5s} ckpt={str(ckpt):5s} trained={n_grad:3d} "
                  f"saved={r['saved_MB']:9.2f} MB  {r['s_per_step']:.3f} s/step", file=sys.stderr, flush=True)

    import pandas as pd

    df = pd.DataFrame(rows)
    table = df.pivot_table(index=["method", "uncond_grad", "checkpointing"], columns="T", values=["saved_MB", "s_per_step"])
    table = table.reindex(args.methods, level=0)
    print(f"\nmodel={args.model} resolution={args.resolution} batch={args.batch} K={args.k}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(reports.markdown(table, ".3f"))
    if args.csv:
        df.to_csv(args.csv, index=False)
    if args.png:
        _plot(df, args.png)


def _plot(df, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, ckpt in zip(axes, (False, True)):
        for i, (method, d) in enumerate(df[df.checkpointing == ckpt].groupby("method", sort=False)):
            ax.plot(d["T"], d["saved_MB"], marker="o", label=method, color=f"C{i}")
        ax.set_title(f"gradient checkpointing {'on' if ckpt else 'off'}")
        ax.set_xlabel("sampling steps T")
        ax.set_yscale("log")
    axes[0].set_ylabel("saved for backward (MB)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
