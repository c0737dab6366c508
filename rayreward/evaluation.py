"""`rayreward eval`: the base model against LoRAs on the same prompts and seeds, scored by rewards.

Three stages, each its own function: `render_variants` (the base and each LoRA on every
(prompt, seed), saved as 8-bit PNGs), `score_variants` (the saved images scored where
`reward_server.mode` says, in-process or in reward actors), and `write_results` (per-image,
per-prompt and summary tables with win rates, one side-by-side grid per seed). `run_eval` chains
them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rayreward import models, render, runtime
from rayreward.config import LoraArg


def win_rate(ours, base) -> float:
    """P(ours > base) over paired samples; ties count one half."""
    import numpy as np

    ours, base = np.asarray(ours, dtype=float), np.asarray(base, dtype=float)
    return float(((ours > base) + 0.5 * (ours == base)).mean())


def summarize(per_image, rewards: Sequence[str]):
    """Per variant and reward: mean, std, n, and the win rate against `base` on the same
    (prompt, seed) pairs."""
    import pandas as pd

    base = per_image[per_image.variant == "base"].set_index(["prompt_idx", "seed"])
    rows = []
    for variant, df in per_image.groupby("variant", sort=False):
        d = df.set_index(["prompt_idx", "seed"])
        for r in rewards:
            rows.append({"variant": variant, "reward": r, "mean": d[r].mean(), "std": d[r].std(ddof=1) if len(d) > 1 else 0.0,
                         "n": len(d), "win_rate_vs_base": win_rate(d[r], base.loc[d.index, r])})
    return pd.DataFrame(rows)


def render_variants(cfg, loras: Sequence[LoraArg], prompts: Sequence[str], seeds: Sequence[int], out: Path,
                    device: torch.device, batch: int = 8) -> dict[str, torch.Tensor]:
    """{variant: images} for the base model and each LoRA at its scale, quantised to 8 bits as
    they are saved under out/images/VARIANT/. Shape: each (len(prompts) * len(seeds), 3, H, W)."""
    amp = runtime.compute_dtype(cfg.train.mixed_precision, device)
    c = models.load_components(cfg.model)
    for i, lora in enumerate(loras):
        models.load_lora(c.unet, lora.path, f"eval{i}")
    if amp is not None:  # nothing trains here: the whole UNet, adapters too, in the compute dtype
        c.unet.to(amp)
    c.to(device, amp)
    variants = [("base", None, 0.0)] + [(lora.name, f"eval{i}", lora.scale) for i, lora in enumerate(loras)]
    images: dict[str, torch.Tensor] = {}
    total, done = len(variants) * len(prompts), 0
    for name, adapter, scale in variants:
        if adapter is None:
            if loras:
                c.unet.disable_lora()
        else:
            c.unet.enable_lora()
            c.unet.set_adapters([adapter], [scale])
        chunks = []
        for i in range(0, len(prompts), batch):
            chunks.append(render.render(c, prompts[i:i + batch], seeds, cfg.sampling, cfg.model.resolution, device, amp))
            done += len(prompts[i:i + batch])
            print(f"[rayreward] eval: rendered {done}/{total} prompts x {len(seeds)} seeds ({name})", flush=True)
        x = (torch.cat(chunks).clamp(0, 1) * 255).round() / 255  # scored as saved: 8-bit
        images[name] = x
        render.save_images(x, prompts, seeds, out / "images" / name)
    return images


def score_variants(cfg, images: dict[str, torch.Tensor], prompts: Sequence[str], seeds: Sequence[int],
                   device: torch.device, batch: int = 8):
    """One row per (variant, prompt, seed) with each reward's score: a pandas DataFrame."""
    import pandas as pd

    rows = []
    pairs = [(i, s) for i in range(len(prompts)) for s in seeds]
    with runtime.reward_client(cfg, device) as rewards:
        for name, x in images.items():
            parts: dict[str, list] = {}
            for j in range(0, len(pairs), batch):
                res = rewards.score_only(x[j:j + batch], [prompts[i] for i, _ in pairs[j:j + batch]])
                for k, v in res.items():
                    parts.setdefault(k, []).extend(v.tolist())
            for n, (i, s) in enumerate(pairs):
                rows.append({"variant": name, "prompt_idx": i, "prompt": prompts[i], "seed": s,
                             "image": f"images/{name}/p{i:03d}_s{s}.png", **{k: v[n] for k, v in parts.items()}})
    return pd.DataFrame(rows)


def write_results(per_image, images: dict[str, torch.Tensor], prompts: Sequence[str], seeds: Sequence[int], out: Path):
    """per_image.csv, per_prompt.csv, summary.csv and grid_seedS.png (rows: prompts, at most 12;
    columns: base and each LoRA, same seed). Returns the summary."""
    reward_names = [k for k in per_image.columns if k not in ("variant", "prompt_idx", "prompt", "seed", "image")]
    summary = summarize(per_image, reward_names)
    per_image.to_csv(out / "per_image.csv", index=False)
    per_prompt = per_image.groupby(["variant", "prompt_idx", "prompt"], sort=False)[reward_names].mean().reset_index()
    per_prompt.to_csv(out / "per_prompt.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    shown = list(range(min(len(prompts), 12)))
    for s_i, s in enumerate(seeds):
        tiles = torch.stack([images[v][i * len(seeds) + s_i] for i in shown for v in images])
        render.grid_image(tiles, len(shown), len(images), [prompts[i] for i in shown], list(images)).save(
            out / f"grid_seed{s}.png")
    return summary


def run_eval(cfg, loras: Sequence[LoraArg], prompts: Sequence[str], seeds: Sequence[int], out: Path,
             device: torch.device | str = "cpu", batch: int = 8) -> tuple:
    """Render, score and tabulate base against `loras`; the rewards are `cfg.rewards`.
    Returns (per_image, summary)."""
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    images = render_variants(cfg, loras, prompts, seeds, out, device, batch)
    per_image = score_variants(cfg, images, prompts, seeds, device, batch)
    return per_image, write_results(per_image, images, prompts, seeds, out)
