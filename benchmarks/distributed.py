"""Ratios of the distributed runtime on this machine (no timed tests: noisy machines, ratios).

    python benchmarks/distributed.py              # quickstart config, 12 steps each, batch 4

1. Ray Train (1 worker) over a plain in-process loop: median seconds per training step, and
   the wall time of the whole run (Ray start-up included).
2. remote reward round trip over the in-process reward: median `s_reward` (the symmetry reward
   is cheap, so this is the transport cost: images out, dL/dimages back).
3. 2 workers (batch 4 each) over 1 worker (batch 4): images per second.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayreward import config, train  # noqa: E402


def median_col(out: Path, col: str, skip: int = 2) -> float:
    import pandas as pd

    return float(pd.read_csv(out / "metrics.csv")[col].iloc[skip:].median())


def run(label: str, cfg: config.Config, ray_path: bool) -> tuple[float, float]:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if ray_path:
            result = train.fit(cfg)
            assert result.error is None, result.error
        else:
            train.run_training(cfg)
    wall = time.perf_counter() - t0
    s = median_col(Path(cfg.output_dir), "s_step")
    print(f"  {label:34s} {s:.3f} s/step (median), {wall:6.1f} s wall", file=sys.stderr, flush=True)
    return s, wall


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="rr-bench-"))
    base = [f"train.steps={args.steps}", f"train.batch_size={args.batch}", "train.checkpoint_every=1000"]

    def cfg(name, *extra):
        return config.load(ROOT / "experiments/quickstart.yaml", [*base, f"output_dir={tmp / name}", *extra])

    torch.set_num_threads(1)  # as in a Ray worker with 1 CPU (Ray sets OMP_NUM_THREADS=num_cpus)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
             runtime_env={"env_vars": dict(train.WORKER_ENV)}, log_to_driver=False)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.steps} steps, batch {args.batch}:", file=sys.stderr)
    inproc, inproc_wall = run("in-process loop (1 thread)", cfg("inproc"), ray_path=False)
    ray1, ray1_wall = run("Ray Train, 1 worker", cfg("ray1"), ray_path=True)
    run("Ray Train, 1 worker, remote reward", cfg("remote", "reward_server.mode=remote"), ray_path=True)
    ray2, _ = run("Ray Train, 2 workers", cfg("ray2", "train.num_workers=2"), ray_path=True)
    local_rt = median_col(tmp / "ray1", "s_reward")
    remote_rt = median_col(tmp / "remote", "s_reward")
    ray.shutdown()

    rows = [
        ("Ray Train 1 worker / in-process: s per step", ray1 / inproc, f"{ray1:.3f} / {inproc:.3f} s"),
        ("Ray Train 1 worker / in-process: whole-run wall time", ray1_wall / inproc_wall,
         f"{ray1_wall:.1f} / {inproc_wall:.1f} s (Ray start-up included)"),
        ("remote / in-process reward: s_reward", remote_rt / local_rt, f"{remote_rt * 1e3:.1f} / {local_rt * 1e3:.2f} ms"),
        ("2 workers / 1 worker: images per second", (2 * args.batch / ray2) / (args.batch / ray1),
         f"{2 * args.batch / ray2:.1f} / {args.batch / ray1:.1f} img/s"),
    ]
    print("\n| ratio | value | measured |\n|---|---:|---|")
    for name, ratio, detail in rows:
        print(f"| {name} | {ratio:.2f} | {detail} |")


if __name__ == "__main__":
    main()
