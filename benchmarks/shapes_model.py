"""How well a shipped shapes model follows its captions, read by the shipped judge.

    python benchmarks/shapes_model.py                    # 64 held-out captions x 2 seeds, T = 10 and 25
    python benchmarks/shapes_model.py --model shapes-layout --placed-only --steps 10
    python benchmarks/shapes_model.py --model DIR --captions 32 --steps 10

Prints, per T, the share of labels read right, of pictures read wholly, and per label (the
kind of each column, its colour, the background). About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time

import torch

from rayreward import models, render
from rayreward.shapes import judge
from rayreward.shapes import world as shapes
from rayreward.config import ModelConfig, SamplingConfig

LABELS = ["kind left", "kind middle", "kind right", "colour left", "colour middle", "colour right", "background"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes", help="model.name: shapes or shapes-layout (shipped), or a folder")
    ap.add_argument("--captions", type=int, default=64, help="held-out captions (shapes.prompts)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 25], help="DDIM steps T")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--placed-only", action="store_true",
                    help="captions of the world without unplaced shapes (the `shapes` model's world)")
    args = ap.parse_args(argv)
    c = models.load_components(ModelConfig(name=args.model))
    j = judge.load()
    prompts = shapes.prompts(args.captions, unplaced=not args.placed_only)
    pairs = [p for p in prompts for _ in args.seeds]
    for T in args.steps:
        t0 = time.perf_counter()
        x = torch.cat([render.render(c, prompts[i:i + 16], args.seeds, SamplingConfig(num_steps=T,
                                     guidance_scale=args.guidance), 64, "cpu") for i in range(0, len(prompts), 16)])
        labels, whole = judge.agreement(j, x, pairs)
        hits = judge.label_hits(j, x, pairs).mean(0)
        per = ", ".join(f"{n} {float(h):.3f}" for n, h in zip(LABELS, hits))
        print(f"T={T}: labels read {labels.mean():.3f}, pictures read wholly {whole.mean():.3f} "
              f"({len(pairs)} pictures, {time.perf_counter() - t0:.1f} s); per label: {per}", flush=True)


if __name__ == "__main__":
    main()
