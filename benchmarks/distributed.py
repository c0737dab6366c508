"""What the distributed runtime costs on this machine, in the time the user waits (no timed
tests: noisy machines, ratios).

    python benchmarks/distributed.py              # quickstart config, 30 steps, batch 4

1. Ray Train (1 worker) against the plain in-process loop on the same steps: the median time
   between the ends of consecutive steps (metrics.csv `time`), which holds everything a step
   costs in a run, the report to Ray Train and any wait on it included, and no start-up; and the
   whole run's wall time, start-up included. Ray Train is measured with each report poll of
   --polls (rayreward's default first; Ray's own default, 2 s, caps a run at one step per poll).
2. remote reward round trip over the in-process reward: median `s_reward` (the symmetry reward
   is cheap, so this is the transport cost: images out, dL/dimages back).
3. 2 workers (batch 4 each) over 1 worker (batch 4): images per second, from the step spacing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayreward import config, driver, runtime, train  # noqa: E402


def median_col(out: Path, col: str, skip: int = 2) -> float:
    import pandas as pd

    return float(pd.read_csv(out / "metrics.csv")[col].iloc[skip:].median())


def step_spacing(out: Path, skip: int = 2) -> float:
    """Median seconds between the ends of consecutive steps."""
    import pandas as pd

    return float(pd.read_csv(out / "metrics.csv")["time"].diff().iloc[skip + 1:].median())


def run(label: str, cfg: config.Config, ray_path: bool, env: dict | None = None) -> float:
    """Whole-run wall time of one run (output silenced)."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if ray_path:
                result = driver.fit(cfg)
                assert result.error is None, result.error
            else:
                train.run_training(cfg)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    wall = time.perf_counter() - t0
    out = Path(cfg.output_dir)
    print(f"  {label:44s} {cfg.train.steps:3d} steps {wall:6.1f} s wall, {step_spacing(out):.3f} s between steps, "
          f"{median_col(out, 's_step'):.3f} s computing (medians)", file=sys.stderr, flush=True)
    return wall


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--polls", default=f"{runtime.REPORT_POLL_S},2.0",
                    help="Ray Train report polls to compare, seconds (rayreward's default first; 2.0 is Ray's)")
    ap.add_argument("--skip-extras", action="store_true", help="only the Ray Train / in-process comparison")
    ap.add_argument("--repeat", type=int, default=1,
                    help="alternate the in-process and Ray Train runs this many times; ratios are medians of pairs")
    args = ap.parse_args(argv)
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="rr-bench-"))

    def cfg(name, *extra):
        return config.load(ROOT / "experiments/tiny.yaml",
                           [f"train.steps={args.steps}", f"train.batch_size={args.batch}", "train.checkpoint_every=10",
                            f"output_dir={tmp / name}", *extra])

    torch.set_num_threads(1)  # as in a Ray worker with 1 CPU (Ray sets OMP_NUM_THREADS=num_cpus)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}, {args.steps} steps, "
          f"batch {args.batch}:", file=sys.stderr)
    run("warm-up (discarded: first imports and calls)", cfg("warmup", "train.steps=3"), False)
    polls = [p.strip() for p in args.polls.split(",")]
    variants = [("in-process loop (1 thread)", "inproc", False, None)]
    variants += [(f"Ray Train, 1 worker, report poll {p} s", f"ray-poll{p}", True, {runtime.REPORT_POLL_ENV: p})
                 for p in polls]
    walls: dict[str, list[float]] = {label: [] for label, *_ in variants}
    spacings: dict[str, list[float]] = {label: [] for label, *_ in variants}
    for i in range(args.repeat):
        for label, folder, ray_path, env in variants:  # the in-process loop first: no Ray threads here yet
            if ray_path and not ray.is_initialized():
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                         runtime_env={"env_vars": dict(runtime.WORKER_ENV)}, log_to_driver=False)
            walls[label].append(run(label, cfg(f"{folder}-{i}"), ray_path, env))
            spacings[label].append(step_spacing(tmp / f"{folder}-{i}"))
    med = statistics.median
    inproc_label, ray_label = variants[0][0], variants[1][0]
    inproc = med(spacings[inproc_label])
    rows = []
    for k, v in spacings.items():
        if k != inproc_label:
            pairs = [a / b for a, b in zip(v, spacings[inproc_label])]
            rows.append((f"{k} / in-process: time per step", med(pairs),
                         f"{med(v):.3f} / {inproc:.3f} s (pairs: {', '.join(f'{x:.2f}' for x in pairs)})"))
    walls = {k: med(v) for k, v in walls.items()}
    spacing = {k: med(v) for k, v in spacings.items()}
    rows.append((f"Ray Train 1 worker / in-process: whole {args.steps}-step run", walls[ray_label] / walls[inproc_label],
                 f"{walls[ray_label]:.1f} / {walls[inproc_label]:.1f} s (Ray start-up included)"))
    if not args.skip_extras:
        fast = variants[1][3]
        run("Ray Train, 1 worker, remote reward", cfg("remote", "reward_server.mode=remote"), True, fast)
        run("Ray Train, 2 workers", cfg("ray2", "train.num_workers=2"), True, fast)
        local_rt, remote_rt = median_col(tmp / f"{variants[1][1]}-0", "s_reward"), median_col(tmp / "remote", "s_reward")
        one, two = spacing[ray_label], step_spacing(tmp / "ray2")
        rows += [("remote / in-process reward: s_reward", remote_rt / local_rt,
                  f"{remote_rt * 1e3:.1f} / {local_rt * 1e3:.2f} ms"),
                 ("2 workers / 1 worker: images per second", (2 * args.batch / two) / (args.batch / one),
                  f"{2 * args.batch / two:.2f} / {args.batch / one:.2f} img/s")]
    ray.shutdown()
    print("\n| ratio | value | measured |\n|---|---:|---|")
    for name, ratio, detail in rows:
        print(f"| {name} | {ratio:.2f} | {detail} |")


if __name__ == "__main__":
    main()
