"""`rayreward train | sample`. Bad input exits with code 2 and one clear message, no traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _usage_errors() -> tuple[type[BaseException], ...]:
    from rayreward.config import ConfigError
    from rayreward.models import ModelLoadError
    from rayreward.reward_models import RewardLoadError

    return (ConfigError, ModelLoadError, RewardLoadError, FileNotFoundError)


def _parse_lora(spec: str) -> tuple[str, float]:
    """'path' or 'path:scale'."""
    path, _, scale = spec.rpartition(":") if ":" in spec else (spec, "", "1")
    try:
        return path, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora {spec!r}: the scale after ':' must be a number") from None


def cmd_train(args) -> int:
    from rayreward import config, train

    cfg = config.load(args.config, args.set)  # validated here, before Ray or any model starts
    result = train.fit(cfg)
    if result.error is not None:
        print(f"[rayreward] training failed: {result.error}", file=sys.stderr)
        return 1
    out = Path(cfg.output_dir)
    print(f"[rayreward] done: {out / 'lora'}, {out / 'metrics.csv'}, {out / 'reward_curve.png'}, "
          f"{out / 'grid_start.png'}, {out / 'grid_end.png'}")
    return 0


def cmd_tune(args) -> int:
    from rayreward import tune

    sweep = tune.load_sweep(args.config, args.set)  # validated here, before Ray starts
    return 0 if tune.run_sweep(sweep) is not None else 130  # 130: interrupted, as after Ctrl-C


def cmd_sample(args) -> int:
    import torch

    from rayreward import config, evaluate, models

    overrides = list(args.set) + ([f"model.name={args.model}"] if args.model else [])
    cfg = config.load(args.config, overrides)
    for path, _ in args.lora:
        models.lora_file(path)  # fails early, naming the path
    c = models.load_components(cfg.model)
    models.apply_loras(c.unet, args.lora)
    prompts = args.prompt or cfg.grid.prompts or cfg.training_prompts()[:4]
    seeds = args.seeds or cfg.grid.seeds
    images = evaluate.render(c, prompts, seeds, cfg.sampling, cfg.model.resolution, torch.device("cpu"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    evaluate.save_grid(images, prompts, seeds, args.out)
    print(f"[rayreward] wrote {args.out} ({len(prompts)} prompts x {len(seeds)} seeds)")
    return 0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _score_inputs(images_dir: str, prompts_file: str | None) -> tuple[list[Path], list[str]]:
    """Sorted image files and one prompt per image (a single line applies to all)."""
    from rayreward.config import ConfigError

    folder = Path(images_dir)
    if not folder.is_dir():
        raise ConfigError([f"--images: {images_dir!r} is not a folder"])
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError([f"--images: {images_dir!r} holds no image ({', '.join(IMAGE_SUFFIXES)})"])
    if prompts_file is None:
        return files, [""] * len(files)
    pf = Path(prompts_file)
    if not pf.is_file():
        raise ConfigError([f"--prompts: {prompts_file!r} does not exist"])
    prompts = [ln.strip() for ln in pf.read_text().splitlines() if ln.strip()]
    if len(prompts) == 1:
        prompts = prompts * len(files)
    if len(prompts) != len(files):
        raise ConfigError([f"--prompts: {prompts_file!r} has {len(prompts)} prompts for {len(files)} images; "
                           "give one a line, in the images' sorted order, or a single line for all"])
    return files, prompts


def cmd_score(args) -> int:
    import numpy as np
    import pandas as pd
    import torch
    import yaml
    from PIL import Image

    from rayreward.config import ConfigError, RewardSpec, from_dict
    from rayreward.rewards import build_composite

    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    extra: dict[str, dict] = {n: {} for n in names}
    for a in args.arg:
        key, _, value = a.partition("=")
        name, _, field = key.partition(".")
        if name not in extra or not field or not _:
            raise ConfigError([f"--arg {a!r}: expected REWARD.KEY=VALUE with REWARD one of {', '.join(names)}"])
        extra[name][field] = yaml.safe_load(value)
    from_dict({"rewards": [{"name": n, "args": extra[n]} for n in names]})  # same validation as training
    files, prompts = _score_inputs(args.images, args.prompts)
    reward = build_composite([RewardSpec(n, 1.0, extra[n]) for n in names], device=args.device)
    rows = []
    for f, prompt in zip(files, prompts):
        img = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            _, parts = reward(img.to(args.device), [prompt])
        rows.append({"image": f.name, "prompt": prompt, **{k: float(v[0]) for k, v in parts.items()}})
    df = pd.DataFrame(rows)
    out = Path(args.out or Path(args.images) / "scores.csv")
    df.to_csv(out, index=False)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"[rayreward] wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayreward", description="Tune diffusion LoRAs on differentiable rewards, on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a LoRA (Ray Train; embedded local Ray unless RAY_ADDRESS is set)")
    t.add_argument("--config", required=True, help="YAML config, e.g. experiments/quickstart.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. method.k=3")
    t.set_defaults(fn=cmd_train)

    u = sub.add_parser("tune", help="a Ray Tune sweep: each trial a full training run; resumes when run again")
    u.add_argument("--config", required=True, help="sweep YAML, e.g. experiments/sweep_k_rank.yaml")
    u.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override on the base config, e.g. train.steps=4")
    u.set_defaults(fn=cmd_tune)

    s = sub.add_parser("sample", help="render a grid from a base model plus LoRAs with scales")
    s.add_argument("--config", default=None, help="YAML config for model and sampling settings (optional)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--model", default=None, help="overrides model.name")
    s.add_argument("--lora", action="append", default=[], type=_parse_lora, metavar="PATH[:SCALE]",
                   help="a LoRA folder or .safetensors with its weight (default 1); repeat to mix")
    s.add_argument("--prompt", action="append", default=[], help="a grid row; repeat")
    s.add_argument("--seeds", nargs="+", type=int, default=[], help="grid columns")
    s.add_argument("--out", default="grid.png")
    s.set_defaults(fn=cmd_sample)

    c = sub.add_parser("score", help="score a folder of images with rewards (the training code path); CSV out")
    c.add_argument("--rewards", required=True, help="comma-separated reward names, e.g. pickscore,symmetry")
    c.add_argument("--arg", action="append", default=[], metavar="REWARD.KEY=VALUE",
                   help="a reward argument, e.g. pickscore.model=/models/PickScore_v1")
    c.add_argument("--images", required=True, help="folder of .png/.jpg images (sorted by name)")
    c.add_argument("--prompts", default=None, help="text file: one prompt a line, in image order (or one line for all)")
    c.add_argument("--out", default=None, help="CSV path (default: IMAGES/scores.csv)")
    c.add_argument("--device", default="cpu")
    c.set_defaults(fn=cmd_score)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except _usage_errors() as e:
        print(f"rayreward {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
