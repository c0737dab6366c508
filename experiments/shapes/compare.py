"""The methods' comparison on the built-in shapes model, from one command:

    python experiments/shapes/compare.py                 # 35.6 minutes on 2 CPU cores
    python experiments/shapes/compare.py --quick         # the whole pipeline in a few minutes (tests)

1. Trains: `equal_steps.yaml` (every method, 3 seeds, 40 steps) and `equal_calls.yaml` (the methods
   whose steps do not cost a full chain, until 400 UNet calls per sample) as Ray Tune sweeps, so
   the same files run on a cluster (`rayreward tune --config ...`). A sweep cut short resumes when
   the command is run again; a finished one is not run again.
2. Evaluates the base model and every trial's LoRA on the 24 held-out captions
   (`builtin:shapes_heldout`) x 2 seeds: the symmetry reward, the symmetry distance in grey levels
   (mean |image - its mirror image| on the saved 8-bit pictures), and prompt alignment read by the
   shipped judge (the share of pictures whose seven labels all match their caption, and the
   `shapes_alignment` reward).
3. Measures, at the base model, the LoRA gradient norm against K: DRaFT-K (full backprop through
   the last K steps) and DRTune (K steps with sg(x_t) inputs, no early stop), 4 batches each; and
   the bytes autograd saves for one step of each method (checkpointing off).
4. Writes to --out (default docs/shapes): table.csv / table.md (one row per method and budget,
   mean ± std over seeds), curves.png (reward against steps and against UNet calls), grad_norm.png,
   grid.png (held-out captions; base and each method), findings.json, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from rayreward import config as config_mod  # noqa: E402
from rayreward.shapes import judge as judge_mod  # noqa: E402
from rayreward import render, tune  # noqa: E402
from rayreward.config import LoraArg  # noqa: E402

ORDER = ["drtune", "draft", "draft_1", "draft_k2", "draft_lv", "refl", "alignprop"]
NAMES = {"drtune": "DRTune (K=2)", "draft": "DRaFT (all 10)", "draft_1": "DRaFT-1", "draft_k2": "DRaFT-K (K=2)",
         "draft_lv": "DRaFT-LV (n=2)", "refl": "ReFL", "alignprop": "AlignProp", "base": "base model"}
FULL_CHAIN = ("draft", "draft_1", "draft_k2", "alignprop")  # T calls every step: equal calls = equal steps


def label(method: dict) -> str:
    name = method["name"]
    if name == "draft_k":
        return "draft_1" if method["k"] == 1 else f"draft_k{method['k']}"
    return name


# ---------------------------------------------------------------------------------------------
# 1. Training: the two sweeps.


def sweeps(quick: bool, runs: Path, sets: list[str]) -> list:
    out = []
    for name in ("equal_steps", "equal_calls"):
        quick_sets = [f"train.steps={2 if name == 'equal_steps' else 6}", "sampling.num_steps=4",
                      "train.max_unet_calls=" + ("0" if name == "equal_steps" else "8")] if quick else []
        sweep = tune.load_sweep(HERE / f"{name}.yaml", quick_sets + list(sets))
        sweep.output_dir = str(runs / name)
        if quick:
            sweep.search["train.seed"] = {"grid": [0]}
            for m in sweep.search["method"]["grid"]:
                if m["name"] == "drtune":
                    m["early_stop_m"] = 2
        out.append((name, sweep))
    return out


def train_all(quick: bool, runs: Path, sets: list[str]) -> dict[str, float]:
    seconds = {}
    for name, sweep in sweeps(quick, runs, sets):
        if (Path(sweep.output_dir) / "results.csv").is_file():
            print(f"[compare] {name}: done already ({sweep.output_dir}/results.csv)", flush=True)
            continue
        t0 = time.time()
        if tune.run_sweep(sweep) is None:
            raise SystemExit(f"[compare] sweep {name} was interrupted; run the same command again to resume it")
        seconds[name] = time.time() - t0
    return seconds


def trials(runs: Path):
    """One record per trial: its budget, method label, seed, metrics (a DataFrame) and folder."""
    import pandas as pd

    recs = []
    for budget in ("equal_steps", "equal_calls"):
        for _, row in pd.read_csv(runs / budget / "results.csv").iterrows():
            folder = Path(row["trial_dir"])
            cfg = config_mod.load(folder / "config.yaml")
            m = pd.read_csv(folder / "metrics.csv")
            recs.append({"budget": budget, "method": label(vars(cfg.method)), "seed": cfg.train.seed,
                         "folder": folder, "metrics": m, "cfg": cfg})
    # a full-chain method's equal-calls run is its equal-steps run (the same config)
    recs += [{**r, "budget": "equal_calls"} for r in recs if r["budget"] == "equal_steps" and r["method"] in FULL_CHAIN]
    return recs


# ---------------------------------------------------------------------------------------------
# 2. Held-out evaluation.


def evaluate(recs, base_cfg, prompts, seeds, out: Path) -> dict[str, dict]:
    """{variant: metrics} for the base model and each trial; variant = budget/method/seed."""
    from rayreward import evaluation
    from rayreward.rewards import build_reward

    unique = {f"{r['budget']}/{r['method']}/s{r['seed']}": r for r in recs if r["folder"].joinpath("lora").is_dir()}
    seen, loras = {}, []
    for key, r in unique.items():  # a trial shared by both budgets is rendered once
        if str(r["folder"]) not in seen:
            seen[str(r["folder"])] = key
            loras.append(LoraArg(name=key.replace("/", "-"), path=str(r["folder"] / "lora")))
    images = evaluation.render_variants(base_cfg, loras, prompts, seeds, out / "eval", torch.device("cpu"))
    pairs = [p for p in prompts for _ in seeds]
    sym, judge = build_reward("symmetry"), judge_mod.load()
    scores = {}
    for name, x in images.items():
        with torch.no_grad():
            part, whole = judge_mod.agreement(judge, x, pairs)
            scores[name] = {"heldout_symmetry": float(sym(x, pairs).mean()),
                            "symmetry_distance": float((x - x.flip(-1)).abs().mean() * 255),
                            "alignment_all_labels": float(whole.mean()), "alignment_labels": float(part.mean()),
                            "alignment_logp": float(judge_mod.alignment(judge, x, pairs).mean())}
    result = {"base": scores["base"]}
    for key, r in unique.items():
        result[key] = scores[seen[str(r["folder"])].replace("/", "-")]
    return result, images, seen


# ---------------------------------------------------------------------------------------------
# 3. Gradient norm against K, and memory, at the base model.


def grad_norms(base_cfg, ks, batches: int) -> list[dict]:
    """The LoRA gradient's norm (before clipping) for DRaFT-K and DRTune at each K."""
    from rayreward import serving, train

    rows = []
    T = base_cfg.sampling.num_steps
    for name in ("draft_k", "drtune"):
        for k in ks:
            if k > T:
                continue
            cfg = config_mod.from_dict(base_cfg.to_dict(), [f"method.name={name}", f"method.k={k}",
                                                            "method.early_stop_m=1"])
            w = train.Worker(cfg, torch.device("cpu"), serving.LocalReward(cfg.rewards, cfg.loss, "cpu"), 0, 1)
            for b in range(batches):
                w.forward_backward(b)
                g = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in w.params if p.grad is not None))
                rows.append({"method": name, "k": k, "batch": b, "grad_norm": float(g)})
                for p in w.params:
                    p.grad = None
            print(f"[compare] grad norm {name} K={k}: "
                  f"{sum(r['grad_norm'] for r in rows[-batches:]) / batches:.3e}", flush=True)
    return rows


def saved_bytes(base_cfg, methods_: dict[str, dict]) -> dict[str, float]:
    """MB autograd saves for one training step of each method (checkpointing off, batch as trained)."""
    from memory import SavedBytes

    from rayreward import serving, train

    out = {}
    for lab, m in methods_.items():
        cfg = config_mod.from_dict(base_cfg.to_dict(), ["train.gradient_checkpointing=false",
                                                        "train.vae_checkpointing=false"])
        cfg.method = config_mod.from_dict({**base_cfg.to_dict(), "method": m}).method
        w = train.Worker(cfg, torch.device("cpu"), serving.LocalReward(cfg.rewards, cfg.loss, "cpu"), 0, 1)
        counter = SavedBytes(list(w.c.unet.parameters()) + list(w.c.vae.parameters()))
        with counter:
            w.forward_backward(0)
        out[lab] = counter.total / 2**20
    return out


# ---------------------------------------------------------------------------------------------
# 4. Tables and plots.


def smooth(y, n: int = 5):
    import numpy as np

    y = np.asarray(y, dtype=float)
    return np.array([y[max(0, i - n + 1):i + 1].mean() for i in range(len(y))])


def table(recs, evals, mem) -> tuple:
    import pandas as pd

    rows = []
    for r in recs:
        m = r["metrics"]
        key = f"{r['budget']}/{r['method']}/s{r['seed']}"
        rows.append({"budget": r["budget"], "method": r["method"], "seed": r["seed"], "steps": len(m),
                     "final_reward": float(m["reward_mean"].tail(5).mean()),
                     "unet_calls": int(m["unet_calls_total"].iloc[-1]),
                     "train_seconds": float(m["s_step"].sum()), **evals.get(key, {})})
    df = pd.DataFrame(rows)
    cols = ["final_reward", "heldout_symmetry", "symmetry_distance", "alignment_all_labels", "alignment_logp",
            "steps", "unet_calls", "train_seconds"]
    g = df.groupby(["budget", "method"])[cols]
    mean, std = g.mean(), g.std().fillna(0.0)
    out = []
    for (budget, method), row in mean.iterrows():
        rec = {"budget": budget, "method": method, "seeds": int(g.size()[(budget, method)])}
        for c in cols:
            rec[c], rec[c + "_std"] = float(row[c]), float(std.loc[(budget, method), c])
        rec["saved_mb"] = mem.get(method)
        out.append(rec)
    base = evals["base"]
    out.append({"budget": "-", "method": "base", "seeds": 0, **{c: base.get(c) for c in cols}})
    res = pd.DataFrame(out)
    res["order"] = res["method"].map(lambda s: ORDER.index(s) if s in ORDER else -1)
    return res.sort_values(["budget", "order"]).drop(columns="order").reset_index(drop=True), df


def markdown(res) -> str:
    def pm(row, c, fmt):
        v, s = row[c], row.get(c + "_std")
        if v is None or v != v:
            return ""
        spread = f" ± {fmt.replace('+', '').format(s)}" if s is not None and s == s and row["seeds"] > 1 else ""
        return fmt.format(v) + spread

    lines = ["| budget | method | final reward (train) | held-out symmetry distance (grey levels) | "
             "alignment: all 7 labels | alignment log p | steps | UNet calls | train s | saved MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for _, r in res.iterrows():
        mem = r.get("saved_mb")
        lines.append(" | ".join([
            f"| {r['budget']}", NAMES.get(r["method"], r["method"]), pm(r, "final_reward", "{:+.4f}"),
            pm(r, "symmetry_distance", "{:.2f}"), pm(r, "alignment_all_labels", "{:.2f}"),
            pm(r, "alignment_logp", "{:.2f}"), pm(r, "steps", "{:.0f}"), pm(r, "unet_calls", "{:.0f}"),
            pm(r, "train_seconds", "{:.0f}"), "" if mem is None or mem != mem else f"{mem:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(recs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, budget, x_col in ((axes[0], "equal_steps", "step"), (axes[1], "equal_calls", "unet_calls_total")):
        for i, meth in enumerate(ORDER):
            runs = [r["metrics"] for r in recs if r["budget"] == budget and r["method"] == meth]
            if not runs:
                continue
            xs = [np.asarray(m[x_col], dtype=float) + (1 if x_col == "step" else 0) for m in runs]
            grid = np.linspace(max(x[0] for x in xs), min(x[-1] for x in xs), 50)
            ys = np.stack([np.interp(grid, x, smooth(m["reward_mean"])) for x, m in zip(xs, runs)])
            ax.plot(grid, ys.mean(0), color=f"C{i}", label=NAMES[meth])
            if len(runs) > 1:
                ax.fill_between(grid, ys.min(0), ys.max(0), color=f"C{i}", alpha=0.12)
        ax.set_xlabel("optimizer step" if x_col == "step" else "UNet calls per sample")
        ax.set_ylabel("symmetry reward (train prompts, 5-step mean)")
        ax.set_title("equal steps" if budget == "equal_steps" else "equal UNet calls")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("shapes model, symmetry reward: mean over seeds (band: min..max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grad_norms(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, lab in (("draft_k", "full backprop (DRaFT-K)"), ("drtune", "stop-grad input (DRTune)")):
        d = df[df["method"] == name].groupby("k")["grad_norm"]
        ax.errorbar(d.mean().index, d.mean().values, yerr=d.std().fillna(0).values, marker="o", capsize=3, label=lab)
    ax.set_xlabel("K (trained steps)")
    ax.set_ylabel("LoRA gradient norm at the base model")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_grid(images, seen, recs, prompts, seeds, grid_prompts, path: Path) -> None:
    cols, names = ["base"], ["base"]
    for meth in ORDER:
        r = next((r for r in recs if r["budget"] == "equal_steps" and r["method"] == meth and r["seed"] == 0), None)
        if r is not None:
            cols.append(seen[str(r["folder"])].replace("/", "-"))
            names.append(NAMES[meth])
    idx = [prompts.index(p) * len(seeds) for p in grid_prompts]  # seed 0 of each prompt
    tiles = torch.stack([images[c][i] for i in idx for c in cols])
    render.grid_image(tiles, len(idx), len(cols), list(grid_prompts), names).save(path)


def findings(res, recs) -> dict:
    """The papers' claims as numbers from this run (docs/results/shapes.md summarises them)."""
    import numpy as np

    f = {}
    steps = res[res["budget"] == "equal_steps"].set_index("method")
    shallow = [m for m in ("draft_1", "draft_k2", "draft_lv", "refl") if m in steps.index]
    if "drtune" in steps.index and shallow:
        f["drtune_minus_best_shallow_final_reward"] = float(steps.loc["drtune", "final_reward"]
                                                            - max(steps.loc[m, "final_reward"] for m in shallow))
        f["best_shallow"] = max(shallow, key=lambda m: steps.loc[m, "final_reward"])

    def mean_curve(meth):
        runs = [r["metrics"] for r in recs if r["budget"] == "equal_calls" and r["method"] == meth]
        if not runs:
            return None
        hi = min(float(m["unet_calls_total"].iloc[-1]) for m in runs)
        grid = np.linspace(0, hi, 200)
        return grid, np.stack([np.interp(grid, m["unet_calls_total"], smooth(m["reward_mean"])) for m in runs]).mean(0)

    lv, one = mean_curve("draft_lv"), mean_curve("draft_1")
    if lv is not None and one is not None:
        start = float(np.mean([r["metrics"]["reward_mean"].iloc[0] for r in recs if r["method"] in ("draft_lv", "draft_1")]))
        target = start + 0.5 * (one[1][-1] - start)  # half of DRaFT-1's gain
        reach = lambda c: next((float(x) for x, y in zip(*c) if y >= target), None)  # noqa: E731
        f["reward_target_half_of_draft1_gain"] = target
        f["calls_to_target"] = {"draft_lv": reach(lv), "draft_1": reach(one)}
        if f["calls_to_target"]["draft_lv"] and f["calls_to_target"]["draft_1"]:
            f["draft_lv_over_draft1_calls"] = f["calls_to_target"]["draft_lv"] / f["calls_to_target"]["draft_1"]
    return f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "shapes"), help="tables and plots (default docs/shapes)")
    ap.add_argument("--runs", default="runs/shapes", help="the sweeps' folders")
    ap.add_argument("--quick", action="store_true", help="2 steps, 1 seed, T = 4: checks the pipeline (tests)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override on both sweeps' base config, e.g. sampling.num_steps=20")
    args = ap.parse_args(argv)
    try:  # every sweep value and --set checked before Ray starts or anything is written
        sweeps(args.quick, Path(args.runs), args.set)
    except config_mod.ConfigError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sweep_seconds = train_all(args.quick, runs, args.set)
    recs = trials(runs)
    base_cfg = config_mod.from_dict(sweeps(args.quick, runs, args.set)[0][1].base)
    prompts = config_mod.read_prompts("builtin:shapes_heldout", "prompts")
    seeds = [0, 1]
    if args.quick:
        prompts = prompts[:4]
    evals, images, seen = evaluate(recs, base_cfg, prompts, seeds, runs)
    by_label = {}
    for r in recs:
        by_label.setdefault(r["method"], vars(r["cfg"].method))
    mem = saved_bytes(base_cfg, {k: by_label[k] for k in ORDER if k in by_label})
    ks = [1, 2] if args.quick else [1, 2, 3, 5, 10]
    norms = grad_norms(base_cfg, ks, 1 if args.quick else 4)
    res, per_trial = table(recs, evals, mem)
    res.to_csv(out / "table.csv", index=False)
    per_trial.to_csv(out / "trials.csv", index=False)
    (out / "table.md").write_text(markdown(res))
    plot_curves(recs, out / "curves.png")
    plot_grad_norms(norms, out / "grad_norm.png")
    grid_prompts = [p for p in base_cfg.grid.prompts if p in prompts] or prompts[:2]
    save_grid(images, seen, recs, prompts, seeds, grid_prompts, out / "grid.png")
    info = {"findings": findings(res, recs), "grad_norm": norms, "sweep_seconds": sweep_seconds,
            "total_seconds": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads(),
            "command": "python experiments/shapes/compare.py" + (" --quick" if args.quick else "")}
    (out / "findings.json").write_text(json.dumps(info, indent=1))
    print(markdown(res))
    print(json.dumps(info["findings"], indent=1))
    print(f"[compare] wrote {out}/table.md, table.csv, trials.csv, curves.png, grad_norm.png, grid.png, findings.json "
          f"in {info['total_seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
