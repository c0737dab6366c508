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


def _reward_specs(rewards: str, arg_list: list[str]) -> list[dict]:
    """--rewards a,b and --arg a.key=value ... as RewardSpec dicts (weight 1), validated as in training."""
    import yaml

    from rayreward.config import ConfigError, from_dict

    names = [n.strip() for n in rewards.split(",") if n.strip()]
    if not names:
        raise ConfigError([f"--rewards {rewards!r}: give at least one reward name"])
    extra: dict[str, dict] = {n: {} for n in names}
    for a in arg_list:
        key, _, value = a.partition("=")
        name, _, field = key.partition(".")
        if name not in extra or not field or not _:
            raise ConfigError([f"--arg {a!r}: expected REWARD.KEY=VALUE with REWARD one of {', '.join(names)}"])
        extra[name][field] = yaml.safe_load(value)
    specs = [{"name": n, "weight": 1.0, "args": extra[n]} for n in names]
    from_dict({"rewards": specs})  # same validation as training
    return specs


def cmd_eval(args) -> int:
    from rayreward import config, evaluate, models

    cfg = config.load(args.config, args.set)
    problems = []
    loras = []
    for item in args.lora:  # [NAME=]PATH[:SCALE]
        name, sep, rest = item.partition("=")
        if not sep:
            name, rest = "", item
        path, scale = rest, 1.0
        head, colon, tail = rest.rpartition(":")
        if colon:
            try:
                path, scale = head, float(tail)
            except ValueError:
                problems.append(f"--lora {item!r}: scale {tail!r} is not a number")
                continue
        try:
            f = models.lora_file(path)
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"--lora {item!r}: {e}")
            continue
        # default name: the run folder of RUN/lora, else the file's stem
        loras.append((name or (f.parent.parent.name if f.parent.name == "lora" else f.stem), path, scale))
    names = [n for n, _, _ in loras]
    if "base" in names or len(set(names)) != len(names):
        problems.append(f"--lora: names must be unique and not 'base' (got {names}); use NAME=PATH")
    if problems:
        raise config.ConfigError(problems)
    cfg.rewards = [config.RewardSpec(**s) for s in _reward_specs(args.rewards, args.arg)]
    prompts = evaluate.load_prompts(args.prompts)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise config.ConfigError([f"--seeds {args.seeds!r}: expected integers separated by commas"]) from None
    out = Path(args.out)
    _, summary = evaluate.run_eval(cfg, loras, cfg.rewards, prompts, seeds, out, batch=args.batch)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"[rayreward] wrote {out / 'summary.csv'}, {out / 'per_prompt.csv'}, {out / 'per_image.csv'}, "
          f"{out}/grid_seed*.png")
    return 0


def cmd_report(args) -> int:
    from rayreward import evaluate

    out = Path(args.out)
    runs, table = evaluate.report(args.runs, out, last=args.last)
    print(runs.drop(columns=["dir"]).to_string(index=False, float_format=lambda v: f"{v:+.4f}"))
    print(f"\nfinal reward (mean of the last {args.last} steps), method x training reward:")
    print(table.to_markdown(floatfmt="+.4f") if _has_tabulate() else table.to_string(float_format=lambda v: f"{v:+.4f}"))
    print(f"[rayreward] wrote {out / 'report.png'}, {out / 'table.csv'}, {out / 'runs.csv'}")
    return 0


def _has_tabulate() -> bool:
    import importlib.util

    return importlib.util.find_spec("tabulate") is not None


def cmd_score(args) -> int:
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from rayreward.config import RewardSpec
    from rayreward.rewards import build_composite

    specs = _reward_specs(args.rewards, args.arg)
    files, prompts = _score_inputs(args.images, args.prompts)
    reward = build_composite([RewardSpec(**s) for s in specs], device=args.device)
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

    e = sub.add_parser("eval", help="base model vs LoRAs on a prompt set and seeds, scored by rewards in reward actors")
    e.add_argument("--config", default=None, help="YAML config for model, sampling and reward_server settings")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--lora", action="append", default=[], metavar="[NAME=]PATH[:SCALE]",
                   help="a LoRA folder or .safetensors (repeat for several)")
    e.add_argument("--rewards", required=True, help="comma-separated reward names, e.g. hpsv21,pickscore,symmetry")
    e.add_argument("--arg", action="append", default=[], metavar="REWARD.KEY=VALUE")
    e.add_argument("--prompts", default="builtin:animals",
                   help="builtin:animals|styles|symmetry, hpsv2:anime|concept-art|paintings|photo, or a .txt/.csv")
    e.add_argument("--seeds", default="0,1", help="comma-separated seeds, the same for every variant")
    e.add_argument("--batch", type=int, default=8, help="prompts rendered at once")
    e.add_argument("--out", required=True, help="output folder")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("report", help="reward curves of several runs in one plot, and a method x reward table")
    r.add_argument("runs", nargs="+", help="run folders (config.yaml + metrics.csv) or sweep folders")
    r.add_argument("--out", default="runs/report", help="output folder")
    r.add_argument("--last", type=int, default=5, help="steps averaged for the final reward")
    r.set_defaults(fn=cmd_report)

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
