"""`rayreward train | tune | eval | report | sample | score`.

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


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean: the input is wrong (exit 2)."""
    from rayreward.config import ConfigError
    from rayreward.models import LoraFileError, ModelLoadError
    from rayreward.rewards import RewardLoadError
    from rayreward.runfolder import CheckpointError, RunFolderBusy

    return (ConfigError, ModelLoadError, RewardLoadError, LoraFileError, CheckpointError, RunFolderBusy,
            FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _run_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what went wrong and what to do (exit 1)."""
    from rayreward.runtime import ClusterError
    from rayreward.train import RewardGradientError
    from rayreward.tune import SweepError

    return (ClusterError, RewardGradientError, SweepError)


def explain(e: BaseException) -> tuple[str, int]:
    """(message, exit code) for an exception that ended a command."""
    from rayreward.runtime import first_line, root_cause

    cause, where = root_cause(e)
    prefix = f"{where}: " if where else ""
    if isinstance(cause, OSError) and cause.filename and cause.strerror:  # a file the user named
        return f"{prefix}{cause.filename!r}: {cause.strerror}", 2
    if isinstance(cause, _usage_errors()):
        return prefix + str(cause), 2
    if isinstance(cause, _run_errors()) or isinstance(cause, (ValueError, KeyError, OSError)):
        return prefix + (str(cause).strip('"') or type(cause).__name__), 1
    return (f"{prefix}{type(cause).__name__}: {first_line(cause)} (unexpected; run with --verbose for the traceback, "
            "and please report it)"), 1


def _raise_interrupted(signum, frame):
    from rayreward.runtime import Interrupted

    raise Interrupted(signum)


def _parse_lora(spec: str) -> tuple[str, float]:
    """'path' or 'path:scale'."""
    path, _, scale = spec.rpartition(":") if ":" in spec else (spec, "", "1")
    try:
        return path, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora {spec!r}: the scale after ':' must be a number") from None


def cmd_train(args) -> int:
    from rayreward import config, runfolder, runtime, train

    cfg = config.load(args.config, args.set)  # validated here, before Ray or any model starts
    try:
        train.fit(cfg)
    except runtime.Interrupted as e:
        out = Path(cfg.output_dir).resolve()
        try:
            resume, _ = runfolder.latest_usable(out, cfg.name)
        except runfolder.CheckpointError:
            resume = None
        where = f"from its checkpoint at step {resume.step}" if resume else "from the start (no checkpoint yet)"
        print(f"\n[rayreward] interrupted ({e}); run the same command again to resume {where} "
              f"({out / 'ray' / cfg.name})", file=sys.stderr, flush=True)
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
    if args.save_images:
        folder = evaluate.save_images(images, prompts, seeds, args.save_images)
        print(f"[rayreward] wrote {len(images)} images and prompts.txt to {folder} (ready for `rayreward score`)")
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
    from rayreward.rewards.composite import build_composite

    from rayreward.runtime import check_device

    check_device(args.device, "--device")
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
    p.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    after = argparse.ArgumentParser(add_help=False)  # --verbose after the command too, not resetting one before it
    after.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[after], **kw)

    t = add("train", help="train a LoRA (Ray Train; embedded local Ray unless RAY_ADDRESS is set)")
    t.add_argument("--config", required=True, help="YAML config, e.g. experiments/quickstart.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. method.k=3")
    t.set_defaults(fn=cmd_train)

    e = add("eval", help="base model vs LoRAs on a prompt set and seeds, scored by rewards in reward actors")
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
    s.add_argument("--config", default=None, help="YAML config for model and sampling settings (optional)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--model", default=None, help="overrides model.name")
    s.add_argument("--lora", action="append", default=[], type=_parse_lora, metavar="PATH[:SCALE]",
                   help="a LoRA folder or .safetensors with its weight (default 1); repeat to mix")
    s.add_argument("--prompt", action="append", default=[], help="a grid row; repeat")
    s.add_argument("--seeds", nargs="+", type=int, default=[], help="grid columns")
    s.add_argument("--out", default="grid.png")
    s.add_argument("--save-images", default=None, metavar="DIR",
                   help="also save each image as a PNG, with prompts.txt in their order (for `rayreward score`)")
    s.set_defaults(fn=cmd_sample)

    c = add("score", help="score a folder of images with rewards (the training code path); CSV out")
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
    if args.verbose:
        import os

        from rayreward.runtime import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    from rayreward.runtime import Interrupted

    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
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
        _shutdown_ray(quiet=not args.verbose)


def _shutdown_ray(quiet: bool) -> None:
    """Stop the local Ray this process started (and with it the run's workers and actors).
    `quiet`: first stop printing the cluster's log lines; the command's outcome is decided, and
    Ray's own actors print tracebacks while they are torn down (PlacementGroupCleaner)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    if quiet:
        try:  # Ray's internal hook for forwarding worker output; without it we only lose the quiet
            from ray._private.worker import global_worker_stdstream_dispatcher

            global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
        except Exception:  # noqa: BLE001
            pass
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001  (exiting anyway)
        pass


if __name__ == "__main__":
    sys.exit(main())
