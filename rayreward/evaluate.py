"""Rendering with the current LoRA, image grids and metric plots."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rayreward import methods, models, sampling


@torch.no_grad()
def render(c: models.Components, prompts: Sequence[str], seeds: Sequence[int], sampling_cfg, resolution: int,
           device, amp: torch.dtype | None = None, unet: torch.nn.Module | None = None) -> torch.Tensor:
    """Images for every (prompt, seed) pair, row-major: prompt i, seed j at i * len(seeds) + j.
    Shape: (len(prompts) * len(seeds), 3, H, W), in [0, 1]. Full chain, no gradient."""
    pairs = [(p, s) for p in prompts for s in seeds]
    cond = models.encode_prompts(c, [p for p, _ in pairs], sampling_cfg.negative_prompt, resolution, device)
    denoise = models.make_denoiser(unet or c.unet, cond, sampling_cfg.guidance_scale, amp)
    schedule = sampling.Schedule.from_scheduler(c.scheduler, sampling_cfg.num_steps).to(device)
    x_T = models.initial_noise([s for _, s in pairs], c, resolution, device)
    res = sampling.sample(denoise, schedule, x_T, methods.plan_inference(sampling_cfg.num_steps), eta=0.0)
    return models.decode(c.vae, res.latents).cpu()


def grid_image(images: torch.Tensor, rows: int, cols: int, row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), min_side: int = 128):
    """A PIL image: `rows` x `cols` tiles (row-major), small images upscaled (nearest) to at
    least `min_side`, row labels on the left and column labels on top."""
    from PIL import Image, ImageDraw

    assert images.shape[0] == rows * cols, (images.shape, rows, cols)
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
        Image.fromarray(np.ascontiguousarray(a)).save(folder / name)
        names.append((name, prompts[i]))
    (folder / "prompts.txt").write_text("".join(f"{p}\n" for _, p in sorted(names)))
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
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)


# ---------------------------------------------------------------------------------------------
# `rayreward eval`: base model against LoRAs, same prompts and seeds, scored by several rewards.


def load_prompts(spec: str) -> list[str]:
    """A prompt set: "builtin:NAME" (shipped), "hpsv2:STYLE" (the HPSv2 benchmark prompts, from
    the hpsv2 package's data folder), a .txt file (one a line) or a .csv file (column `prompt`,
    else the first column). Raises ConfigError naming the source when it gives no prompt."""
    from rayreward.config import ConfigError, builtin_prompt_sets, prompt_path

    if spec.startswith("hpsv2:"):
        import json
        import os

        style = spec.split(":", 1)[1]
        root = Path(os.environ.get("HPS_ROOT", Path.home() / ".cache" / "hpsv2"))
        f = root / "datasets" / "benchmark" / f"{style}.json"
        if not f.is_file():
            raise ConfigError([f"--prompts {spec!r}: {f} does not exist. The HPSv2 benchmark prompts (anime, "
                               "concept-art, paintings, photo) come from the hpsv2 package's download "
                               "(python -c 'import hpsv2.utils as u; u.download_benchmark_prompts()', needs the "
                               "network once) into HPS_ROOT (default ~/.cache/hpsv2)"])
        prompts = [str(p) for p in json.loads(f.read_text())]
    else:
        p = prompt_path(spec)
        if not p.is_file():
            raise ConfigError([f"--prompts {spec!r}: no such file; give a .txt (one prompt a line) or .csv "
                               f"(column 'prompt'), or one of {', '.join('builtin:' + n for n in builtin_prompt_sets())}"])
        if p.suffix.lower() == ".csv":
            import pandas as pd

            df = pd.read_csv(p)
            col = "prompt" if "prompt" in df.columns else df.columns[0]
            prompts = [str(x).strip() for x in df[col].dropna()]
        else:
            prompts = [ln.strip() for ln in p.read_text().splitlines()]
    prompts = [x for x in prompts if x]
    if not prompts:
        raise ConfigError([f"--prompts {spec!r}: holds no prompt"])
    return prompts


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


def run_eval(cfg, loras: Sequence[tuple[str, str, float]], reward_specs, prompts: Sequence[str], seeds: Sequence[int],
             out: Path, batch: int = 8) -> tuple:
    """Render base and each (name, path, scale) LoRA on every (prompt, seed), save the images,
    score the saved (8-bit) images with the rewards in Ray reward actors, and write
    per_image.csv, summary.csv and one side-by-side grid per seed. Returns (per_image, summary)."""
    import pandas as pd
    import ray

    from rayreward import runtime
    from rayreward.serving import start_reward_servers

    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    amp = runtime.autocast_dtype(cfg.train.mixed_precision, device)
    c = models.load_components(cfg.model)
    for i, (_, path, _) in enumerate(loras):
        models.load_lora(c.unet, path, f"eval{i}")
    if amp is not None:  # nothing trains here: the whole UNet, adapters too, in the autocast dtype
        c.unet.to(amp)
    c.to(device, amp)
    variants = [("base", None, 0.0)] + [(n, f"eval{i}", s) for i, (n, _, s) in enumerate(loras)]
    images: dict[str, torch.Tensor] = {}
    total = len(variants) * len(prompts)
    done = 0
    for name, adapter, scale in variants:
        if adapter is None:
            if loras:
                c.unet.disable_lora()
        else:
            c.unet.enable_lora()
            c.unet.set_adapters([adapter], [scale])
        chunks = []
        for i in range(0, len(prompts), batch):
            chunks.append(render(c, prompts[i:i + batch], seeds, cfg.sampling, cfg.model.resolution, device, amp))
            done += len(prompts[i:i + batch])
            print(f"[rayreward] eval: rendered {done}/{total} prompts x {len(seeds)} seeds ({name})", flush=True)
        x = (torch.cat(chunks).clamp(0, 1) * 255).round() / 255  # scored as saved: 8-bit
        images[name] = x
        save_images(x, prompts, seeds, out / "images" / name)
    runtime.init_ray()
    actors = start_reward_servers(cfg)
    rows = []
    try:
        for name, x in images.items():
            pairs = [(i, s) for i in range(len(prompts)) for s in seeds]
            parts: dict[str, list] = {}
            for j in range(0, len(pairs), batch):
                ps = [prompts[i] for i, _ in pairs[j:j + batch]]
                res = ray.get(actors[(j // batch) % len(actors)].score_only.remote(x[j:j + batch], ps))
                for k, v in res.items():
                    parts.setdefault(k, []).extend(v.tolist())
            for n, (i, s) in enumerate(pairs):
                rows.append({"variant": name, "prompt_idx": i, "prompt": prompts[i], "seed": s,
                             "image": f"images/{name}/p{i:03d}_s{s}.png", **{k: v[n] for k, v in parts.items()}})
    finally:
        for a in actors:
            ray.kill(a)
    per_image = pd.DataFrame(rows)
    reward_names = [k for k in per_image.columns if k not in ("variant", "prompt_idx", "prompt", "seed", "image")]
    summary = summarize(per_image, reward_names)
    per_image.to_csv(out / "per_image.csv", index=False)
    per_prompt = per_image.groupby(["variant", "prompt_idx", "prompt"], sort=False)[reward_names].mean().reset_index()
    per_prompt.to_csv(out / "per_prompt.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    shown = list(range(min(len(prompts), 12)))
    for s_i, s in enumerate(seeds):  # rows: prompts; columns: base and each LoRA, same seed
        tiles = torch.stack([images[v][i * len(seeds) + s_i] for i in shown for v in images])
        grid_image(tiles, len(shown), len(images), [prompts[i] for i in shown], list(images)).save(out / f"grid_seed{s}.png")
    return per_image, summary


# ---------------------------------------------------------------------------------------------
# `rayreward report`: several runs' reward curves in one plot and a method x reward table.


def run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Training run folders (config.yaml + metrics.csv); a sweep folder expands to its trials."""
    from rayreward.config import ConfigError

    found, problems = [], []
    for p in map(Path, paths):
        if (p / "metrics.csv").is_file() and (p / "config.yaml").is_file():
            found.append(p)
        elif (p / "trials").is_dir():
            found.extend(sorted(t for t in (p / "trials").iterdir() if (t / "metrics.csv").is_file()))
        else:
            problems.append(f"{str(p)!r}: not a run folder (config.yaml + metrics.csv) nor a sweep folder (trials/)")
    if problems or not found:
        raise ConfigError(problems or ["no run folder given"])
    return found


def report(paths: Sequence[str | Path], out: Path, last: int = 5):
    """Plot every run's smoothed reward against the step; table the final reward (mean of the
    last `last` steps) by method (rows) and training reward (columns), the papers' layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for d in run_dirs(paths):
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        m = pd.read_csv(d / "metrics.csv")
        reward = "+".join(r["name"] for r in cfg["rewards"] if float(r.get("weight", 1)) != 0)
        label = f"{cfg['name']} ({cfg['method']['name']})"
        ax.plot(m["step"], m["reward_mean"].rolling(last, min_periods=1).mean(), label=label)
        rows.append({"run": cfg["name"], "method": cfg["method"]["name"], "reward": reward,
                     "k": cfg["method"]["k"], "steps": len(m), "final_reward": m["reward_mean"].tail(last).mean(),
                     "first_reward": m["reward_mean"].head(last).mean(), "dir": str(d)})
    ax.set_xlabel("step")
    ax.set_ylabel(f"reward ({last}-step mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)
    runs = pd.DataFrame(rows)
    table = runs.pivot_table(index="method", columns="reward", values="final_reward", aggfunc="mean")
    runs.to_csv(out / "runs.csv", index=False)
    table.to_csv(out / "table.csv")
    return runs, table
