"""What the distributed runtime costs on this machine, as whole-run wall time (no timed tests:
noisy machines, ratios).

    python benchmarks/distributed.py              # quickstart config, batch 4

1. Ray Train (1 worker) against the plain in-process loop on the same steps. Each runs twice,
   for --short and --long steps; the wall-time difference over the step difference is the cost
   per step with start-up excluded (the slope), the rest is start-up (the intercept). Ray Train
   is measured with rayreward's short report poll and with Ray's default 2 s poll, which caps a
   run at one step per 2 s.
2. remote reward round trip over the in-process reward: median `s_reward` (the symmetry reward
   is cheap, so this is the transport cost: images out, dL/dimages back).
3. 2 workers (batch 4 each) over 1 worker (batch 4): images per second of whole runs.
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

from rayreward import config, runtime, train  # noqa: E402


def median_col(out: Path, col: str, skip: int = 2) -> float:
    import pandas as pd

    return float(pd.read_csv(out / "metrics.csv")[col].iloc[skip:].median())


def run(label: str, cfg: config.Config, ray_path: bool, env: dict | None = None) -> float:
    """Whole-run wall time of one run (output silenced)."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if ray_path:
                result = train.fit(cfg)
                assert result.error is None, result.error
            else:
                train.run_training(cfg)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    wall = time.perf_counter() - t0
    print(f"  {label:44s} {cfg.train.steps:3d} steps {wall:6.1f} s wall", file=sys.stderr, flush=True)
    return wall


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", type=int, default=10, help="steps of the short runs")
    ap.add_argument("--long", type=int, default=40, help="steps of the long runs")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="rr-bench-"))

    def cfg(name, steps, *extra):
        return config.load(ROOT / "experiments/quickstart.yaml",
                           [f"train.steps={steps}", f"train.batch_size={args.batch}", "train.checkpoint_every=1000",
                            f"output_dir={tmp / name}", *extra])

    torch.set_num_threads(1)  # as in a Ray worker with 1 CPU (Ray sets OMP_NUM_THREADS=num_cpus)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
             runtime_env={"env_vars": dict(runtime.WORKER_ENV)}, log_to_driver=False)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}, batch {args.batch}:",
          file=sys.stderr)
    slow_poll = {runtime.REPORT_POLL_ENV: "2.0"}  # Ray Train's default
    fast_poll = {runtime.REPORT_POLL_ENV: runtime.REPORT_POLL_S}
    walls = {}
    for label, ray_path, env in [("in-process loop (1 thread)", False, None),
                                 ("Ray Train, 1 worker", True, fast_poll),
                                 ("Ray Train, 1 worker, Ray's 2 s report poll", True, slow_poll)]:
        walls[label] = [run(label, cfg(f"{label[:9]}-{n}-{i}".replace(" ", ""), n), ray_path, env)
                        for i, n in enumerate([args.short, args.long])]
    span = args.long - args.short
    per_step = {k: (w[1] - w[0]) / span for k, w in walls.items()}
    start_up = {k: w[0] - per_step[k] * args.short for k, w in walls.items()}
    inproc, ray1, slow = (per_step[k] for k in walls)

    n = 12
    ray1_short = run("Ray Train, 1 worker", cfg("ray1", n), True, fast_poll)
    remote_wall = run("Ray Train, 1 worker, remote reward", cfg("remote", n, "reward_server.mode=remote"), True, fast_poll)
    ray2_wall = run("Ray Train, 2 workers", cfg("ray2", n, "train.num_workers=2"), True, fast_poll)
    local_rt = median_col(tmp / "ray1", "s_reward")
    remote_rt = median_col(tmp / "remote", "s_reward")
    ray.shutdown()

    print("\nwhole-run wall time = start-up + steps x cost per step (fitted on the two lengths):")
    for k in walls:
        print(f"  {k:44s} {start_up[k]:5.1f} s start-up, {per_step[k]:.3f} s per step")
    rows = [
        ("Ray Train 1 worker / in-process: wall time per step", ray1 / inproc, f"{ray1:.3f} / {inproc:.3f} s"),
        ("same, with Ray's default 2 s report poll", slow / inproc, f"{slow:.3f} / {inproc:.3f} s"),
        (f"Ray Train 1 worker / in-process: whole {args.long}-step run", walls["Ray Train, 1 worker"][1]
         / walls["in-process loop (1 thread)"][1], f"{walls['Ray Train, 1 worker'][1]:.1f} / "
         f"{walls['in-process loop (1 thread)'][1]:.1f} s (Ray start-up included)"),
        ("remote / in-process reward: s_reward", remote_rt / local_rt, f"{remote_rt * 1e3:.1f} / {local_rt * 1e3:.2f} ms"),
        (f"2 workers / 1 worker: images per second ({n}-step runs, start-up included)",
         (2 * n * args.batch / ray2_wall) / (n * args.batch / ray1_short),
         f"{2 * n * args.batch / ray2_wall:.2f} / {n * args.batch / ray1_short:.2f} img/s"),
    ]
    print("\n| ratio | value | measured |\n|---|---:|---|")
    for name, ratio, detail in rows:
        print(f"| {name} | {ratio:.2f} | {detail} |")
    print(f"\nremote-reward run: {remote_wall:.1f} s wall for {n} steps", file=sys.stderr)


if __name__ == "__main__":
    main()
