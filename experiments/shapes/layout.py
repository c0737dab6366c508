"""Where does the shapes model decide its layout, and does the noise decide it at all?

    python experiments/shapes/layout.py                      # the shapes-layout model, T = 20, 16 seeds
    python experiments/shapes/layout.py --model shapes       # the quickstart's model
    python experiments/shapes/layout.py --model DIR --out docs/shapes/layout --seeds 16 --steps 20

For each caption (by default captions that leave the place unsaid, and for reference ones that
fix it) and each seed, the script runs the model's DDIM chain once and, at every chain position
n, decodes the one-step prediction x0_hat_n. It measures the content's centre of mass (the
`centring` reward's: colour distance from the border's median, thresholded) in each picture and
prints and writes:

- the spread across seeds of the final picture's centre (std of x and y, fractions of the side):
  the noise decides the layout only if this spread is large (a shape placed anywhere spreads
  ~0.1-0.2 of the side; the same place every seed, ~0.0), beside the training data's own spread
  for the same caption (64 drawings of it, placed as the world places an unplaced shape, measured
  the same way);
- per chain position n, the mean distance between the centre in x0_hat_n and in the final
  picture: the layout is decided where this falls to the final picture's own jitter. This is
  the fact DRTune's argument rests on: only steps up to that point can change where things are.

Outputs in --out: layout.json (the numbers), layout.png (distance against n, one line per
caption), centres.png (the final centres of every seed, per caption).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import random
from dataclasses import replace

import torch

from rayreward import config, models
from rayreward.rewards.lowlevel import centre_of_mass
from rayreward.shapes import pretrain
from rayreward.shapes import world as shapes

UNPLACED = ["a large red circle, on a white background", "a small blue square, on a white background",
            "a large yellow star, on a black background", "a large green triangle, on a gray background",
            "a purple star, on a gray background"]
PLACED = ["a large red circle on the left, on a white background",
          "a large red circle in the centre, on a white background"]


@torch.no_grad()
def chain_predictions(c, prompt: str, seeds, T: int, guidance: float, resolution: int) -> torch.Tensor:
    """x0_hat at every chain position, decoded. Shape: (T, len(seeds), 3, H, W)."""
    cond = models.encode_prompts(c, [prompt] * len(seeds), "", resolution, "cpu")
    denoise = models.make_denoiser(c.denoiser, cond, guidance)
    schedule = models.make_schedule(c, T, resolution)
    x = models.initial_noise(list(seeds), c, resolution, "cpu")
    out = []
    for n in range(1, T + 1):
        st = schedule.step(n)
        f = denoise(x, schedule.timesteps[n - 1])
        out.append(models.decode_latents(c, st.c * x + st.d * f))
        x = st.a * x + st.b * f
    return torch.stack(out)


def data_spread(caption: str, count: int = 64) -> tuple[float, float] | None:
    """The std of x and y of the centre of mass over `count` drawings of an unplaced caption,
    each placed as the world places an unplaced shape; None for a caption that places its shape."""
    scene = shapes.parse(caption)
    if len(scene.shapes) != 1 or scene.shapes[0].place != "anywhere":
        return None
    bx, by = shapes.UNPLACED_BOX
    rngs = [random.Random(i) for i in range(count)]
    drawn = [replace(scene, shapes=(replace(scene.shapes[0], dx=r.uniform(-bx, bx), dy=r.uniform(-by, by)),))
             for r in rngs]
    c = centre_of_mass((pretrain.images(drawn) + 1) / 2)
    return float(c[:, 0].std()), float(c[:, 1].std())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes-layout")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--captions", nargs="*", default=UNPLACED + PLACED)
    ap.add_argument("--out", default=None, help="write layout.json, layout.png and centres.png here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    c = models.load_components(config.ModelConfig(name=args.model, resolution=args.resolution))
    seeds = list(range(args.seeds))
    rows = []
    for caption in args.captions:
        preds = chain_predictions(c, caption, seeds, args.steps, args.guidance, args.resolution)
        centres = torch.stack([centre_of_mass(p) for p in preds])  # (T, seeds, 2)
        final = centres[-1]
        dist = (centres - final).norm(dim=-1).mean(dim=1)  # (T,)
        spread = final.std(dim=0)
        data = data_spread(caption)
        rows.append({"caption": caption, "centre_mean": [round(float(v), 4) for v in final.mean(dim=0)],
                     "spread_x": round(float(spread[0]), 4), "spread_y": round(float(spread[1]), 4),
                     "data_spread_x": None if data is None else round(data[0], 4),
                     "data_spread_y": None if data is None else round(data[1], 4),
                     "distance_to_final": [round(float(v), 4) for v in dist],
                     "final_centres": [[round(float(v), 4) for v in p] for p in final]})
        vs = "" if data is None else f" (data ± {data[0]:.3f}, ± {data[1]:.3f})"
        print(f"{caption:62s} centre x {float(final[:, 0].mean()):.3f} ± {float(spread[0]):.3f}, "
              f"y {float(final[:, 1].mean()):.3f} ± {float(spread[1]):.3f}{vs}; distance to the final centre at "
              f"n = 1, T/4, T/2: {float(dist[0]):.3f}, {float(dist[args.steps // 4]):.3f}, "
              f"{float(dist[args.steps // 2]):.3f}", flush=True)
    info = {"model": args.model, "steps": args.steps, "seeds": args.seeds, "guidance": args.guidance,
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    print(f"[layout] {len(args.captions)} captions x {args.seeds} seeds, T = {args.steps}, in {info['seconds']} s",
          file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "layout.json").write_text(json.dumps(info, indent=1))
        _plot(rows, args.steps, out)
    return info


def _plot(rows, T: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(rows):
        ax.plot(range(1, T + 1), r["distance_to_final"], marker=".", label=r["caption"][:48], color=f"C{i}")
    ax.set_xlabel("chain position n (1 = the noisiest step)")
    ax.set_ylabel("mean |centre(x0_hat_n) - centre(final)|")
    ax.set_title("where the layout is decided")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "layout.png", dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(rows), figsize=(2.2 * len(rows), 2.4), squeeze=False)
    for ax, r in zip(axes[0], rows):
        xs, ys = zip(*r["final_centres"])
        ax.scatter(xs, ys, s=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)
        ax.set_aspect("equal")
        ax.set_title(r["caption"].replace(", on a", "\non a")[:60], fontsize=6)
        ax.tick_params(labelsize=6)
    fig.suptitle("final centres, one dot per seed", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "centres.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
