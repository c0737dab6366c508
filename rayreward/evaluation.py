"""`rayreward eval`: the base model against LoRAs on the same prompts and seeds, scored by rewards.

Four stages, each its own function: `render_variants` (the base and each LoRA on every
(prompt, seed), saved as 8-bit PNGs), `score_variants` (the saved images scored where
`reward_server.mode` says, in-process or in reward actors), `diversity` (per variant and prompt,
how different the seeds' images are from each other: pixels, and CLIP image embeddings when a
CLIP model is named), and `write_results` (per-image, per-prompt and summary tables with win
rates, one side-by-side grid per seed). `run_eval` chains them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from rayreward import lora_io, models, render, runtime, serving
from rayreward.config import LoraArg


def win_rate(ours, base) -> float:
    """P(ours > base) over paired samples; ties count one half."""
    import numpy as np

    ours, base = np.asarray(ours, dtype=float), np.asarray(base, dtype=float)
    return float(((ours > base) + 0.5 * (ours == base)).mean())


def summarize(per_image, rewards: Sequence[str], keys: Sequence[str] = ("prompt_idx", "seed")):
    """Per variant and reward: mean, std, n, and the win rate against `base` on the same `keys`
    ((prompt, seed) pairs; for diversity, prompts)."""
    import pandas as pd

    base = per_image[per_image.variant == "base"].set_index(list(keys))
    rows = []
    for variant, df in per_image.groupby("variant", sort=False):
        d = df.set_index(list(keys))
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
        lora_io.load_lora(c.denoiser, lora.path, f"eval{i}", c.flavour)
    if amp is not None:  # nothing trains here: the whole UNet, adapters too, in the compute dtype
        c.denoiser.to(amp)
    c.to(device, amp)
    variants = [("base", None, 0.0)] + [(lora.name, f"eval{i}", lora.scale) for i, lora in enumerate(loras)]
    images: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(variants) * len(prompts) * len(seeds), desc="[rayreward] eval: rendering", unit="image",
               dynamic_ncols=True)
    for name, adapter, scale in variants:
        bar.set_postfix_str(name)
        if adapter is None:
            if loras:
                c.denoiser.disable_lora()
        else:
            c.denoiser.enable_lora()
            c.denoiser.set_adapters([adapter], [scale])
        chunks = []
        for i in range(0, len(prompts), batch):
            chunks.append(render.render(c, prompts[i:i + batch], seeds, cfg.sampling, cfg.model.resolution, device, amp))
            bar.update(len(prompts[i:i + batch]) * len(seeds))
        x = (torch.cat(chunks).clamp(0, 1) * 255).round() / 255  # scored as saved: 8-bit
        images[name] = x
        render.save_images(x, prompts, seeds, out / "images" / name)
    bar.close()
    return images


def score_variants(cfg, images: dict[str, torch.Tensor], prompts: Sequence[str], seeds: Sequence[int],
                   device: torch.device, batch: int = 8):
    """One row per (variant, prompt, seed) with each reward's score: a pandas DataFrame."""
    import pandas as pd

    rows = []
    pairs = [(i, s) for i in range(len(prompts)) for s in seeds]
    bar = tqdm(total=len(images) * len(pairs), desc="[rayreward] eval: scoring", unit="image", dynamic_ncols=True)
    if cfg.reward_server.mode == "remote":
        from rayreward import driver

        driver.init_ray()
    with serving.reward_client(cfg, device) as rewards:
        for name, x in images.items():
            parts: dict[str, list] = {}
            for j in range(0, len(pairs), batch):
                res = rewards.score_only(x[j:j + batch], [prompts[i] for i, _ in pairs[j:j + batch]])
                for k, v in res.items():
                    parts.setdefault(k, []).extend(v.tolist())
                bar.update(len(pairs[j:j + batch]))
            for n, (i, s) in enumerate(pairs):
                rows.append({"variant": name, "prompt_idx": i, "prompt": prompts[i], "seed": s,
                             "image": f"images/{name}/p{i:03d}_s{s}.png", **{k: v[n] for k, v in parts.items()}})
    bar.close()
    return pd.DataFrame(rows)


def mean_pairwise(x: torch.Tensor, kind: str) -> float:
    """The mean over the n(n-1)/2 pairs of rows of `x` (n, d) of their distance: "pixel", the RMS
    difference (images in [0, 1], flattened); "cosine", 1 - cos (embeddings)."""
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    if kind == "pixel":
        d = (x[i] - x[j]).pow(2).mean(dim=1).sqrt()
    else:
        u = x / x.norm(dim=1, keepdim=True)
        d = 1 - (u[i] * u[j]).sum(dim=1)
    return float(d.double().mean())


def diversity(images: dict[str, torch.Tensor], prompts: Sequence[str], seeds: Sequence[int], embed=None,
              batch: int = 8):
    """Per variant and prompt, the mean pairwise distance across seeds of the images:
    `diversity_pixel` (RMS pixel difference, 0..1) and, with `embed` (images -> CLIP image
    embeddings), `diversity_clip` (1 - cosine). A pandas DataFrame; empty with fewer than 2 seeds."""
    import pandas as pd

    rows = []
    if len(seeds) < 2:
        return pd.DataFrame(rows)
    k = len(seeds)
    for name, x in images.items():
        e = None
        if embed is not None:
            with torch.no_grad():
                e = torch.cat([embed(x[j:j + batch]).float().cpu() for j in range(0, len(x), batch)])
        for i, p in enumerate(prompts):
            row = {"variant": name, "prompt_idx": i, "prompt": p,
                   "diversity_pixel": mean_pairwise(x[i * k:(i + 1) * k].flatten(1).float(), "pixel")}
            if e is not None:
                row["diversity_clip"] = mean_pairwise(e[i * k:(i + 1) * k], "cosine")
            rows.append(row)
    return pd.DataFrame(rows)


def write_results(per_image, images: dict[str, torch.Tensor], prompts: Sequence[str], seeds: Sequence[int], out: Path,
                  per_prompt_diversity=None):
    """per_image.csv, per_prompt.csv, summary.csv and grid_seedS.png (rows: prompts, at most 12;
    columns: base and each LoRA, same seed). `per_prompt_diversity` (from `diversity`) adds its
    columns to per_prompt.csv and a summary row per variant and diversity measure (mean over
    prompts; the win rate is the share of prompts more diverse than the base's). Returns the summary."""
    import pandas as pd

    reward_names = [k for k in per_image.columns if k not in ("variant", "prompt_idx", "prompt", "seed", "image")]
    summary = summarize(per_image, reward_names)
    per_image.to_csv(out / "per_image.csv", index=False)
    per_prompt = per_image.groupby(["variant", "prompt_idx", "prompt"], sort=False)[reward_names].mean().reset_index()
    if per_prompt_diversity is not None and len(per_prompt_diversity):
        measures = [c for c in per_prompt_diversity.columns if c.startswith("diversity_")]
        per_prompt = per_prompt.merge(per_prompt_diversity, on=["variant", "prompt_idx", "prompt"], how="left")
        summary = pd.concat([summary, summarize(per_prompt_diversity, measures, keys=("prompt_idx",))],
                            ignore_index=True)
    per_prompt.to_csv(out / "per_prompt.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    shown = list(range(min(len(prompts), 12)))
    for s_i, s in enumerate(seeds):
        tiles = torch.stack([images[v][i * len(seeds) + s_i] for i in shown for v in images])
        render.grid_image(tiles, len(shown), len(images), [prompts[i] for i in shown], list(images)).save(
            out / f"grid_seed{s}.png")
    return summary


def diversity_embedder(model: str | None, device: torch.device):
    """images -> unit CLIP image embeddings of `model` (a hub id, a folder, or "tiny"), or None
    when no model is named. Loaded before anything renders, so a bad name fails at once."""
    if not model:
        return None
    from rayreward.rewards.clip import ClipScorer

    return ClipScorer(model, None, device, torch.float32, "--diversity-clip").image_embeds


def run_eval(cfg, loras: Sequence[LoraArg], prompts: Sequence[str], seeds: Sequence[int], out: Path,
             device: torch.device | str = "cpu", batch: int = 8, diversity_clip: str | None = None) -> tuple:
    """Render, score and tabulate base against `loras`; the rewards are `cfg.rewards`; diversity
    across seeds in pixels and, with `diversity_clip` (a CLIP model), in its embeddings.
    Returns (per_image, summary)."""
    device = torch.device(device)
    embed = diversity_embedder(diversity_clip, device)
    out.mkdir(parents=True, exist_ok=True)
    images = render_variants(cfg, loras, prompts, seeds, out, device, batch)
    per_image = score_variants(cfg, images, prompts, seeds, device, batch)
    div = diversity(images, prompts, seeds, embed, batch)
    return per_image, write_results(per_image, images, prompts, seeds, out, div)
