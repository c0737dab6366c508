"""`rayreward train | tune | sample | eval | score | report | export | pretrain`.

  train   train a LoRA with one of the methods (Ray Train workers; rewards in-process or in actors)
  tune    a Ray Tune sweep, each trial a training run
  sample  render a grid from a base model plus LoRAs
  eval    base model against LoRAs on a prompt set and seeds, scored by rewards, with win rates
  score   score a folder of images with rewards
  report  several runs' reward curves and a method x reward table
  export  a LoRA in the kohya layout that image UIs load
  pretrain  a small text-to-image model of the synthetic shapes world, from scratch

One grammar across them: `--lora [NAME=]PATH[:SCALE]`, `--seeds 0 1 2` (or 0,1,2), `--device
auto|cpu|cuda[:N]`, `--prompts SOURCE` (a .txt, a .csv, builtin:NAME or hpsv2:STYLE; training's
`prompt_file` reads the same sources), `--config` / `--set KEY=VALUE`.

Every anticipated failure (bad config, files, LoRAs, rewards, devices, a cluster that cannot be
reached or cannot place the run, a worker's error) ends in one readable message and a non-zero
exit: 2 for bad input, 1 for a failed run, 130 / 143 after Ctrl-C / SIGTERM (with how to resume).
`--verbose` shows the traceback too.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from pathlib import Path


def explain(e: BaseException) -> tuple[str, int]:
    """(message, exit code) for an exception that ended a command, from the two bases of
    `rayreward.errors` alone: a UsageError is exit 2, a RunError exit 1. A file the user named
    that the OS refused (missing, a folder, not readable) is a usage error too; another ValueError,
    KeyError or OSError already says what went wrong (exit 1); anything else is a bug of
    rayreward's, said as one."""
    from rayreward.errors import RunError, UsageError, first_line, root_cause

    cause, where = root_cause(e)
    prefix = f"{where}: " if where else ""
    if isinstance(cause, OSError) and cause.filename and cause.strerror:  # a file the user named
        return f"{prefix}{cause.filename!r}: {cause.strerror}", 2
    if isinstance(cause, (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return prefix + str(cause), 2
    if isinstance(cause, (RunError, ValueError, KeyError, OSError)):
        return prefix + (str(cause).strip('"') or type(cause).__name__), 1
    return (f"{prefix}{type(cause).__name__}: {first_line(cause)} (unexpected; run with --verbose for the traceback, "
            "and please report it)"), 1


# ---------------------------------------------------------------------------------------------
# One grammar for what several commands take: LoRAs, seeds, devices, prompt sets.


def lora_arg(spec: str):
    """--lora [NAME=]PATH[:SCALE] (sample, eval): a LoRA folder or .safetensors, its weight
    (default 1) and, for tables and grids, its name."""
    from rayreward.config import LoraArg

    name, sep, rest = spec.partition("=")
    if not sep or "/" in name:  # a path may hold '=' only after a '/'
        name, rest = "", spec
    path, scale = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon:
        try:
            path, scale = head, float(tail)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lora {spec!r}: the scale after ':' must be a number, got {tail!r}") from None
    if not path:
        raise argparse.ArgumentTypeError(f"--lora {spec!r}: no path; expected [NAME=]PATH[:SCALE]")
    return LoraArg(name, path, scale)


def checked_loras(loras: list) -> list:
    """Every --lora's file exists and holds a LoRA; each gets a unique name (default: the run
    folder of RUN/lora, else the file's stem). All problems at once, before any model loads."""
    from rayreward.config import ConfigError, LoraArg
    from rayreward.lora_io import lora_file

    problems, named = [], []
    for lora in loras:
        try:
            f = lora_file(lora.path)
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"--lora {lora.path!r}: {e}")
            continue
        name = lora.name or (f.parent.parent.name if f.parent.name == "lora" else f.stem)
        named.append(LoraArg(name, lora.path, lora.scale))
    names = [n.name for n in named]
    if "base" in names or len(set(names)) != len(names):
        problems.append(f"--lora: names must be unique and not 'base' (got {names}); use NAME=PATH")
    if problems:
        raise ConfigError(problems)
    return named


class SeedsAction(argparse.Action):
    """--seeds 0 1 2, or --seeds 0,1,2: a list of integers (sample, eval)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seeds = []
        for v in values:
            for part in v.split(","):
                if part.strip():
                    try:
                        seeds.append(int(part))
                    except ValueError:
                        parser.error(f"{option_string} {' '.join(values)!r}: expected integers, e.g. 0 1 2 (or 0,1,2)")
        if not seeds:
            parser.error(f"{option_string}: give at least one seed")
        setattr(namespace, self.dest, seeds)


def out_path(value: str, flag: str, folder: bool = False) -> Path:
    """An output path a command will write: refused (naming the flag) when it, or a folder on the
    way to it, is an existing file where a folder is needed, or a folder where a file is."""
    from rayreward.config import ConfigError

    path = Path(value)
    for parent in [*reversed(path.parents)] + ([path] if folder else []):
        if parent.exists() and not parent.is_dir():
            raise ConfigError([f"{flag}: {value!r} cannot be written: {str(parent)!r} is a file, not a folder"])
    if not folder and path.is_dir():
        raise ConfigError([f"{flag}: {value!r} is a folder; give a file name"])
    return path


def add_common(p: argparse.ArgumentParser, *, config: bool = True, device: bool = False, seeds: str | None = None,
               prompts: str | None = None, lora: bool = False) -> None:
    """The options several commands share, declared once."""
    if config:
        p.add_argument("--config", default=None, help="YAML config (model, sampling, reward_server); default: the defaults")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. "
                       "sampling.num_steps=20")
    if lora:
        p.add_argument("--lora", action="append", default=[], type=lora_arg, metavar="[NAME=]PATH[:SCALE]",
                       help="a LoRA folder or .safetensors, its weight (default 1) and name; repeat for several")
    if prompts is not None:
        p.add_argument("--prompts", default=None, metavar="SOURCE", help=prompts + "; a .txt (one a line), .csv "
                       "(column 'prompt'), builtin:animals|styles|symmetry or hpsv2:anime|concept-art|paintings|photo")
    if seeds is not None:
        p.add_argument("--seeds", nargs="+", action=SeedsAction, default=None, metavar="SEED", help=seeds)
    if device:
        p.add_argument("--device", default="auto", help="auto (CUDA when there is one, else CPU), cpu, cuda or cuda:N")


def cmd_train(args) -> int:
    from rayreward import config, driver, runfolder
    from rayreward.errors import CheckpointError, Interrupted
    from rayreward.storage import Storage

    cfg = config.load(args.config, args.set)  # validated here, before Ray or any model starts
    try:
        driver.fit(cfg)
    except Interrupted as e:
        store = Storage.of(cfg)
        try:
            resume, _ = runfolder.latest_usable(store, cfg.name)
        except (CheckpointError, OSError):
            resume = None
        where = f"from its checkpoint at step {resume.step}" if resume else "from the start (no checkpoint yet)"
        print(f"\n[rayreward] interrupted ({e}); run the same command again to resume {where} "
              f"({store.describe(store.run_path(cfg.name))})", file=sys.stderr, flush=True)
        return 128 + e.signum
    out = Path(cfg.output_dir)
    print(f"[rayreward] done: {out / 'lora'}, {out / 'metrics.csv'}, {out / 'reward_curve.png'}, "
          f"{out / 'grid_start.png'}, {out / 'grid_end.png'}")
    return 0


def cmd_tune(args) -> int:
    from rayreward import tune

    sweep = tune.load_sweep(args.config, args.set)  # validated here, before Ray starts
    return 0 if tune.run_sweep(sweep) is not None else 130  # 130: interrupted, as after Ctrl-C


def cmd_sample(args) -> int:
    from rayreward import budget, config, lora_io, models, render, runtime

    overrides = list(args.set) + ([f"model.name={args.model}"] if args.model else [])
    cfg = config.load(args.config, overrides, training=False)
    budget.check(cfg, training=False)  # a resolution the model cannot take, before it loads
    out_path(args.out, "--out")
    if args.save_images:
        out_path(args.save_images, "--save-images", folder=True)
    device = runtime.resolve_device(args.device, "--device")
    loras = checked_loras(args.lora)  # fails early, naming the path
    prompts = (list(args.prompt) + (config.read_prompts(args.prompts, "--prompts") if args.prompts else [])
               or cfg.grid.prompts or cfg.training_prompts()[:4])
    seeds = args.seeds or cfg.grid.seeds
    c = models.load_components(cfg.model)
    lora_io.apply_loras(c.denoiser, [(lora.path, lora.scale) for lora in loras], c.flavour)
    c.to(device)
    images = render.render(c, prompts, seeds, cfg.sampling, cfg.model.resolution, device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    render.save_grid(images, prompts, seeds, args.out)
    print(f"[rayreward] wrote {args.out} ({len(prompts)} prompts x {len(seeds)} seeds)")
    if args.save_images:
        folder = render.save_images(images, prompts, seeds, args.save_images)
        print(f"[rayreward] wrote {len(images)} images and prompts.txt to {folder} (ready for `rayreward score`)")
    return 0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _score_inputs(images_dir: str, prompts_file: str | None) -> tuple[list[Path], list[str]]:
    """Sorted image files and one prompt per image (a single line applies to all)."""
    from rayreward.config import ConfigError, read_prompts

    folder = Path(images_dir)
    if not folder.is_dir():
        raise ConfigError([f"--images: {images_dir!r} is not a folder"])
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError([f"--images: {images_dir!r} holds no image ({', '.join(IMAGE_SUFFIXES)})"])
    if prompts_file is None:
        return files, [""] * len(files)
    prompts = read_prompts(prompts_file, "--prompts")
    if len(prompts) == 1:
        prompts = prompts * len(files)
    if len(prompts) != len(files):
        raise ConfigError([f"--prompts: {prompts_file!r} has {len(prompts)} prompts for {len(files)} images; "
                           "give one a line, in the images' sorted order, or a single line for all"])
    return files, prompts


def _reward_specs(rewards: str, arg_list: list[str]) -> list[dict]:
    """--rewards a,b and --arg a.key=value ... as RewardSpec dicts (weight 1), validated as in training."""
    from rayreward.config import ConfigError, from_dict, safe_yaml

    names = [n.strip() for n in rewards.split(",") if n.strip()]
    if not names:
        raise ConfigError([f"--rewards {rewards!r}: give at least one reward name"])
    extra: dict[str, dict] = {n: {} for n in names}
    for a in arg_list:
        key, _, value = a.partition("=")
        name, _, field = key.partition(".")
        if name not in extra or not field or not _:
            raise ConfigError([f"--arg {a!r}: expected REWARD.KEY=VALUE with REWARD one of {', '.join(names)}"])
        extra[name][field] = safe_yaml(value, f"--arg {a!r}")
    specs = [{"name": n, "weight": 1.0, "args": extra[n]} for n in names]
    from_dict({"rewards": specs})  # same validation as training
    return specs


def cmd_eval(args) -> int:
    from rayreward import budget, config, evaluation, runtime

    cfg = config.load(args.config, args.set, training=False)
    budget.check(cfg, training=False)  # a resolution the model cannot take, before it loads
    if args.batch < 1:
        raise config.ConfigError([f"--batch: {args.batch} is not allowed; need an integer >= 1 (prompts rendered at once)"])
    out_path(args.out, "--out", folder=True)
    device = runtime.resolve_device(args.device, "--device")
    loras = checked_loras(args.lora)
    cfg.rewards = [config.RewardSpec(**s) for s in _reward_specs(args.rewards, args.arg)]
    prompts = config.read_prompts(args.prompts or "builtin:animals", "--prompts")
    seeds = args.seeds or [0, 1]
    out = Path(args.out)
    _, summary = evaluation.run_eval(cfg, loras, prompts, seeds, out, device=device, batch=args.batch,
                                     diversity_clip=args.diversity_clip)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"[rayreward] wrote {out / 'summary.csv'}, {out / 'per_prompt.csv'}, {out / 'per_image.csv'}, "
          f"{out}/grid_seed*.png")
    return 0


def cmd_report(args) -> int:
    from rayreward import reports

    out = Path(args.out)
    runs, table = reports.report(args.runs, out, last=args.last)
    print(runs.drop(columns=["dir"]).to_string(index=False, float_format=lambda v: f"{v:+.4f}"))
    print(f"\nfinal reward (mean of the last {args.last} steps), method x training reward:")
    print(reports.markdown(table, "+.4f"))
    print(f"[rayreward] wrote {out / 'report.png'}, {out / 'table.csv'}, {out / 'runs.csv'}")
    return 0


def cmd_export(args) -> int:
    from rayreward import export

    out = export.export_lora(args.lora, args.format, args.out, force=args.force)
    print(f"[rayreward] wrote {out} ({args.format} layout)")
    return 0


def cmd_pretrain(args) -> int:
    from rayreward.errors import ConfigError
    from rayreward.shapes import pretrain
    from rayreward.shapes.config import PretrainConfig
    from rayreward.runtime import resolve_device

    cfg = PretrainConfig(out=args.out, part=args.part, unet_steps=args.unet_steps, vae_steps=args.vae_steps,
                         judge_steps=args.judge_steps, vae_from=args.vae_from, init_from=args.init_from,
                         placed_only=args.placed_only, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, threads=args.threads, workers=args.workers,
                         device=str(resolve_device(args.device, "--device")))
    cfg.check()
    out = out_path(args.out, "--out", folder=True)
    if out.exists() and any(out.iterdir()):
        raise ConfigError([f"--out: {args.out!r} is not empty; pretrain writes a new folder (remove it or choose "
                           "another)"])
    if cfg.part == "judge":
        from rayreward.shapes import judge

        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        judge.run(out, cfg.judge_steps, cfg.batch_size, cfg.seed, cfg.workers, cfg.device)
        return 0
    pretrain.run(cfg)
    return 0


def cmd_score(args) -> int:
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from rayreward import files as fileio
    from rayreward.config import RewardSpec
    from rayreward.rewards.composite import build_composite
    from rayreward.runtime import resolve_device

    device = resolve_device(args.device, "--device")
    specs = _reward_specs(args.rewards, args.arg)
    files, prompts = _score_inputs(args.images, args.prompts)
    reward = build_composite([RewardSpec(**s) for s in specs], device=device)
    rows = []
    for f, prompt in zip(files, prompts):
        img = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            _, parts = reward(img.to(device), [prompt])
        rows.append({"image": f.name, "prompt": prompt, **{k: float(v[0]) for k, v in parts.items()}})
    df = pd.DataFrame(rows)
    out = Path(args.out or Path(args.images) / "scores.csv")
    with fileio.written(out, newline="") as f:
        df.to_csv(f, index=False)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"[rayreward] wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayreward", description="Tune diffusion LoRAs on differentiable rewards, on Ray.")
    p.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    after = argparse.ArgumentParser(add_help=False)  # --verbose after the command too, not resetting one before it
    after.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[after], **kw)

    from rayreward import methods, rewards

    listing = ("method.name (rayreward/methods.py):\n" + "".join(f"  {m.name:<10} {m.summary}\n" for m in methods.METHODS.values())
               + "rewards[].name (rayreward/rewards/__init__.py): " + ", ".join(rewards.REGISTRY)
               + ", or package.module:factory")
    t = add("train", help="train a LoRA (Ray Train; embedded local Ray unless RAY_ADDRESS is set)", epilog=listing,
            formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", required=True, help="YAML config, e.g. experiments/quickstart.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. method.k=3 or "
                   "prompt_file=builtin:animals (the prompt sources of --prompts elsewhere)")
    t.set_defaults(fn=cmd_train)

    e = add("eval", help="base model vs LoRAs on a prompt set and seeds, scored by rewards (reward_server.mode)")
    add_common(e, device=True, lora=True, prompts="the prompt set (default builtin:animals)",
               seeds="seeds, the same for every variant (default 0 1)")
    e.add_argument("--rewards", required=True, help="comma-separated reward names, e.g. hpsv21,pickscore,symmetry")
    e.add_argument("--arg", action="append", default=[], metavar="REWARD.KEY=VALUE")
    e.add_argument("--batch", type=int, default=8, help="prompts rendered at once")
    e.add_argument("--diversity-clip", metavar="MODEL", help="a CLIP model (hub id, folder, or tiny) whose image "
                   "embeddings measure diversity across seeds, beside pixels (default: pixels only)")
    e.add_argument("--out", required=True, help="output folder")
    e.set_defaults(fn=cmd_eval)

    r = add("report", help="reward curves of several runs in one plot, and a method x reward table")
    r.add_argument("runs", nargs="+", help="run folders (config.yaml + metrics.csv) or sweep folders")
    r.add_argument("--out", default="runs/report", help="output folder")
    r.add_argument("--last", type=int, default=5, help="steps averaged for the final reward")
    r.set_defaults(fn=cmd_report)

    u = add("tune", help="a Ray Tune sweep: each trial a full training run; resumes when run again")
    u.add_argument("--config", required=True, help="sweep YAML, e.g. experiments/sweep_k_rank_tiny.yaml")
    u.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override on the base config, e.g. train.steps=4")
    u.set_defaults(fn=cmd_tune)

    s = add("sample", help="render a grid from a base model plus LoRAs with scales")
    add_common(s, device=True, lora=True, prompts="grid rows from a prompt set (after any --prompt)",
               seeds="grid columns (default: the config's grid.seeds)")
    s.add_argument("--model", default=None, help="overrides model.name")
    s.add_argument("--prompt", action="append", default=[], help="a grid row; repeat")
    s.add_argument("--out", default="grid.png")
    s.add_argument("--save-images", default=None, metavar="DIR",
                   help="also save each image as a PNG, with prompts.txt in their order (for `rayreward score`)")
    s.set_defaults(fn=cmd_sample)

    c = add("score", help="score a folder of images with rewards (the training code path); CSV out")
    add_common(c, config=False, device=True,
               prompts="one prompt a line in the images' sorted order, or one line for all (default: empty prompts)")
    c.add_argument("--rewards", required=True, help="comma-separated reward names, e.g. pickscore,symmetry")
    c.add_argument("--arg", action="append", default=[], metavar="REWARD.KEY=VALUE",
                   help="a reward argument, e.g. pickscore.model=/models/PickScore_v1")
    c.add_argument("--images", required=True, help="folder of .png/.jpg images (sorted by name)")
    c.add_argument("--out", default=None, help="CSV path (default: IMAGES/scores.csv)")
    c.set_defaults(fn=cmd_score)

    x = add("export", help="write a LoRA in another file layout (kohya: ComfyUI, kohya's scripts, diffusers)")
    x.add_argument("--lora", required=True, metavar="PATH", help="a LoRA folder (RUN/lora) or its .safetensors")
    x.add_argument("--format", required=True, choices=["kohya"], help="the layout to write")
    x.add_argument("--out", required=True, help="the .safetensors file to write (a new file, unless --force)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists (never the LoRA being exported)")
    x.set_defaults(fn=cmd_export)

    q = add("pretrain", help="pretrain a small text-to-image model on the synthetic shapes world")
    q.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    q.add_argument("--part", default="model", choices=["model", "judge"],
                   help="model: the text-to-image pipeline (a diffusers folder); judge: the alignment classifier")
    from rayreward.shapes.config import PretrainConfig as defaults
    q.add_argument("--unet-steps", type=int, default=defaults.unet_steps)
    q.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    q.add_argument("--judge-steps", type=int, default=defaults.judge_steps)
    q.add_argument("--vae-from", default="", help="reuse this pretrained folder's VAE and skip the VAE phase")
    q.add_argument("--init-from", default="", metavar="DIR",
                   help="fine-tune this pretrained model (its UNet, text encoder and VAE) instead of starting from "
                        "random weights; no VAE phase")
    q.add_argument("--placed-only", action="store_true",
                   help="draw the world without unplaced shapes (the built-in `shapes` model's world)")
    q.add_argument("--batch-size", type=int, default=defaults.batch_size)
    q.add_argument("--lr", type=float, default=defaults.lr, help="the UNet's and text encoder's (part model)")
    q.add_argument("--seed", type=int, default=defaults.seed)
    q.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    q.add_argument("--workers", type=int, default=0, help="processes drawing the batches ahead (default: none)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    q.set_defaults(fn=cmd_pretrain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        import os

        from rayreward.runtime import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    from rayreward.driver import raise_interrupted, shutdown_ray
    from rayreward.errors import Interrupted

    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        return args.fn(args)
    except Interrupted as e:
        print(f"\nrayreward {args.command}: interrupted ({e})", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"\nrayreward {args.command}: interrupted (SIGINT)", file=sys.stderr)
        return 130
    except Exception as e:  # every failure ends in one message; the traceback with --verbose
        message, code = explain(e)
        if args.verbose:
            traceback.print_exception(e)
        print(f"rayreward {args.command}: error: {message}", file=sys.stderr)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutdown_ray(quiet=not args.verbose)


if __name__ == "__main__":
    sys.exit(main())
