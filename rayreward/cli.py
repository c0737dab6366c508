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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayreward", description="Tune diffusion LoRAs on differentiable rewards, on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a LoRA (Ray Train; embedded local Ray unless RAY_ADDRESS is set)")
    t.add_argument("--config", required=True, help="YAML config, e.g. experiments/quickstart.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. method.k=3")
    t.set_defaults(fn=cmd_train)

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
