"""Pictures: rendering with the current LoRA, image grids, saved images and metric plots.

Used by training (start and end grids, the reward curve), `sample`, and `eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rayreward import files, methods, models, sampling


@torch.no_grad()
def render(c: models.Components, prompts: Sequence[str], seeds: Sequence[int], sampling_cfg, resolution: int,
           device, amp: torch.dtype | None = None, unet: torch.nn.Module | None = None,
           prompt_cache: models.PromptCache | None = None) -> torch.Tensor:
    """Images for every (prompt, seed) pair, row-major: prompt i, seed j at i * len(seeds) + j.
    Shape: (len(prompts) * len(seeds), 3, H, W), in [0, 1]. Full chain, no gradient. A training
    worker passes its `prompt_cache` (its text encoders may be on the CPU)."""
    pairs = [(p, s) for p in prompts for s in seeds]
    if prompt_cache is not None:
        cond = prompt_cache([p for p, _ in pairs], sampling_cfg.negative_prompt, resolution)
    else:
        cond = models.encode_prompts(c, [p for p, _ in pairs], sampling_cfg.negative_prompt, resolution, device)
    denoise = models.make_denoiser(c.denoiser if unet is None else unet, cond, sampling_cfg.guidance_scale, amp)
    schedule = models.make_schedule(c, sampling_cfg.num_steps, resolution).to(device)
    x_T = models.initial_noise([s for _, s in pairs], c, resolution, device)
    res = sampling.sample(denoise, schedule, x_T, methods.plan_inference(sampling_cfg.num_steps), eta=0.0)
    return models.decode_latents(c, res.latents).cpu()


def grid_image(images: torch.Tensor, rows: int, cols: int, row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), min_side: int = 128):
    """A PIL image: `rows` x `cols` tiles (row-major), small images upscaled (nearest) to at
    least `min_side`, row labels on the left and column labels on top."""
    from PIL import Image, ImageDraw

    if images.shape[0] != rows * cols:
        raise ValueError(f"a {rows} x {cols} grid needs {rows * cols} images, got {images.shape[0]}")
    h, w = images.shape[-2:]
    k = max(1, -(-min_side // max(h, w)))
    tiles = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    label_w = 140 if row_labels else 0
    pad, top = 4, 16 if col_labels else 0
    canvas = Image.new("RGB", (label_w + cols * (w * k + pad) + pad, top + rows * (h * k + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(col_labels):
        draw.text((label_w + pad + j * (w * k + pad) + 2, 2), label[:20], fill="black")
    for i in range(rows):
        y = top + pad + i * (h * k + pad)
        if row_labels:
            draw.text((4, y + 4), row_labels[i][:22], fill="black")
        for j in range(cols):
            tile = Image.fromarray(tiles[i * cols + j]).resize((w * k, h * k), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + j * (w * k + pad), y))
    return canvas


def save_grid(images: torch.Tensor, prompts: Sequence[str], seeds: Sequence[int], path: str | Path) -> Path:
    grid_image(images, len(prompts), len(seeds), list(prompts), [f"seed {s}" for s in seeds]).save(path)
    return Path(path)


def save_images(images: torch.Tensor, prompts: Sequence[str], seeds: Sequence[int], folder: str | Path) -> Path:
    """Each (prompt, seed) image as p<prompt>_s<seed>.png (8-bit), and prompts.txt: one prompt a
    line in the files' sorted order, as `rayreward score --prompts` reads it."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    names = []
    for k, a in enumerate(arr):
        i, s = divmod(k, len(seeds))
        name = f"p{i:03d}_s{seeds[s]}.png"
        with files.written(folder / name, "wb") as f:
            Image.fromarray(np.ascontiguousarray(a)).save(f, format="PNG")
        names.append((name, prompts[i]))
    files.write_text(folder / "prompts.txt", "".join(f"{p}\n" for _, p in sorted(names)))
    return folder


def plot_metrics(csv_path: str | Path, png_path: str | Path) -> Path:
    """Reward (mean ± std, and each component) and loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(csv_path)
    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_r.plot(df["step"], df["reward_mean"], label="reward (total)", color="C0")
    ax_r.fill_between(df["step"], df["reward_mean"] - df["reward_std"], df["reward_mean"] + df["reward_std"],
                      color="C0", alpha=0.2)
    comps = [c for c in df.columns if c.startswith("reward/")]
    if len(comps) > 1:
        for i, c in enumerate(comps):
            ax_r.plot(df["step"], df[c], label=c, color=f"C{i + 2}", lw=1)
    if len(df) >= 5:
        ax_r.plot(df["step"], df["reward_mean"].rolling(5, min_periods=1).mean(), color="C1", label="5-step mean")
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("reward")
    ax_r.legend(fontsize=8)
    ax_l.plot(df["step"], df["loss"], color="C3")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("loss")
    fig.tight_layout()
    with files.written(png_path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return Path(png_path)
