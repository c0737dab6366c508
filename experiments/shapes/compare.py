"""The methods' comparisons on the built-in shapes model, each from one command:

    python experiments/shapes/compare.py --study centring          # the layout study, T = 20 (47 min on 2 CPU cores)
    python experiments/shapes/compare.py --study centring --T 50   # the same at T = 50 (about 45 min on 2 cores)
    python experiments/shapes/compare.py                           # the symmetry study, T = 10
    python experiments/shapes/compare.py --study centring --quick  # the whole pipeline in minutes (tests)

Two studies, each a folder of Ray Tune sweep files (so the same files run on a cluster with
`rayreward tune --config ...`):

- `symmetry` (experiments/shapes/*.yaml): the symmetry reward, a colour-level reward the last
  steps control, on every caption of the world; equal optimizer steps and equal UNet calls.
- `centring` (experiments/shapes/centring/*.yaml): the centring reward, which only moving the
  shape raises, on captions that leave the place unsaid (the model picks it from its initial
  noise, in the first steps of the chain); equal UNet calls, equal wall time, and DRTune's K and m
  swept. `--T` rescales what depends on the chain length: DRTune's m and the ReFL window
  (fractions of T) and the call budget (the same number of full chains); the time budget stays
  in seconds (a step does not cost T times more). Equal wall time
  is read from the equal-calls runs, which also keep their LoRA at the time mark of
  equal_time.yaml (`train.lora_at_seconds`): the weights a run stopped there saves, without 21
  more trials' start-up (about a minute each on 2 cores). equal_time.yaml still runs on its own
  with `rayreward tune`.

The command:

1. Trains every sweep of the study (`--budgets`, `--methods`: some of them; `--reward`: another
   reward on the same runs' settings, the control). The sweep files it runs are written beside their runs
   (RUNS/BUDGET.yaml, with the chain length applied). A sweep cut short resumes when the
   command is run again; a finished one is not run again.
2. Evaluates the base model and every trial's LoRA on held-out captions: the study's reward, the
   symmetry distance in grey levels (mean |image - its mirror image| on the saved 8-bit
   pictures), prompt alignment read by the shipped judge (the share of pictures whose seven
   labels all match their caption, and the `shapes_alignment` reward), and diversity across seeds
   (the spread of the shape's centre, and the RMS pixel distance between pictures).
3. Measures the bytes autograd saves for one step of each method (checkpointing off) and, with
   --grad-norms, at the base model, the LoRA gradient norm against K: DRaFT-K (full backprop
   through the last K steps) and DRTune (K steps with sg(x_t) inputs, no early stop), 4 batches
   each (kept in RUNS/eval/grad_norms.json; without the flag read from there, or left out).
4. Writes to --out: table.csv / table.md (one row per method and budget, mean ± std over seeds),
   curves.png (reward against steps, UNet calls or seconds), grad_norm.png, grid.png (held-out
   captions; base and each method), km.md (DRTune's K and m, when swept), findings.json, and
   prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from rayreward import config as config_mod  # noqa: E402
from rayreward.shapes import judge as judge_mod  # noqa: E402
from rayreward import driver, files, render, tune  # noqa: E402
from rayreward.config import LoraArg  # noqa: E402

ORDER = ["drtune", "draft", "draft_1", "draft_k2", "draft_k3", "draft_lv", "refl", "alignprop"]
FULL_CHAIN = ("draft", "draft_1", "draft_k2", "draft_k3", "alignprop")  # T calls every step


@dataclass(frozen=True)
class Study:
    folder: Path  # its sweep files and base.yaml
    budgets: tuple[str, ...]  # the sweep files it runs, in order
    evaluated: tuple[str, ...]  # the budgets compared on held-out captions (the others: train reward only)
    reward: str  # the trained reward
    heldout: str  # the held-out prompt set
    prompts: int  # how many of its captions are evaluated
    seeds: tuple[int, ...]  # with these seeds each
    T: int  # the chain length its files are written for
    out: str  # default --out, under the repository
    reuse: dict = field(default_factory=dict)  # budget -> the budget whose full-chain trials it shares
    # budget -> the budget whose runs it is read from, at its sweep file's train.max_seconds: each
    # of those runs keeps its LoRA at that mark (train.lora_at_seconds) and trains on
    timed: dict = field(default_factory=dict)
    methods: tuple[str, ...] = ()  # only these method labels (--methods); empty: every method


STUDIES = {
    "symmetry": Study(HERE, ("equal_steps", "equal_calls"), ("equal_steps", "equal_calls"), "symmetry",
                      "builtin:shapes_heldout", 24, (0, 1), 10, "docs/shapes", {"equal_calls": "equal_steps"}),
    "centring": Study(HERE / "centring", ("equal_calls", "drtune_km"), ("equal_calls", "equal_time"),
                      "centring", "builtin:shapes_unplaced_heldout", 4, (0, 1, 2, 3), 20, "docs/shapes/centring",
                      timed={"equal_time": "equal_calls"}),
}
X_AXIS = {"equal_steps": ("step", "optimizer step"), "equal_calls": ("unet_calls_total", "UNet calls per sample"),
          "equal_time": ("train_seconds_total", "training seconds"), "drtune_km": ("unet_calls_total", "UNet calls")}
TITLES = {"equal_steps": "equal steps", "equal_calls": "equal UNet calls", "equal_time": "equal wall time"}


def label(method: dict, budget: str = "") -> str:
    name = method["name"]
    if budget == "drtune_km":
        return f"drtune_k{method['k']}_m{method['early_stop_m']}"
    if name == "draft_k":
        return "draft_1" if method["k"] == 1 else f"draft_k{method['k']}"
    return name


def display(method: dict, T: int) -> str:
    """A method's name in tables and plots, with the settings that tell its variants apart."""
    name = method["name"]
    if name == "drtune":
        return f"DRTune (K={method['k']}, m={method['early_stop_m']})"
    if name == "draft":
        return f"DRaFT (all {T})"
    if name == "draft_k":
        return "DRaFT-1" if method["k"] == 1 else f"DRaFT-K (K={method['k']})"
    if name == "draft_lv":
        return f"DRaFT-LV (n={method['lv_copies']})"
    if name == "refl":
        return f"ReFL (t in {list(method['refl_window'])})"
    return {"alignprop": "AlignProp"}.get(name, name)


# ---------------------------------------------------------------------------------------------
# 1. Training: the study's sweeps, rescaled to the chain length.


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # halves up (round() rounds them to even)


def scaled_method(m: dict, factor: float, T: int) -> dict:
    """A method's settings for a chain `factor` times as long, T steps."""
    m = dict(m)
    if "early_stop_m" in m:
        m["early_stop_m"] = min(T, max(1, _round(m["early_stop_m"] * factor)))
    if "refl_window" in m:
        lo, hi = m["refl_window"]
        m["refl_window"] = [1 + _round((lo - 1) * factor), min(T, max(1, _round(hi * factor)))]  # 1: the last step
    if m.get("name") in ("draft_k", "drtune") and "k" in m:
        m["k"] = min(T, m["k"])
    return m


def scaled(data: dict, factor: float, T: int) -> dict:
    """A sweep file's data for a chain of T steps, `factor` times its own: DRTune's m and the ReFL
    window scale with T (fractions of the chain), and so does the call budget (the same number of
    full chains). The time budget does not: a training step does not cost T times more (on 2 cores
    DRTune trained 12 steps in 66 s at T = 50, 62 s at T = 20), so a mark scaled with T (75 s) lay
    past the end of the equal-calls runs it is read from (the fastest trained 51 s in all). The
    base config's method too."""
    out = dict(data)
    sets = []
    for s in data.get("set") or []:
        key, _, value = s.partition("=")
        if key == "train.max_unet_calls":
            value = str(_round(float(value) * factor))
        sets.append(f"{key}={value}")
    base_method = (yaml.safe_load(Path(data["base"]).read_text()) or {}).get("method") or {}
    out["set"] = sets + [f"sampling.num_steps={T}"] + [
        f"method.{k}={json.dumps(v)}"
        for k, v in scaled_method(base_method, factor, T).items() if k != "name" and v != base_method.get(k)]
    methods = [scaled_method(m, factor, T) for m in (data.get("search") or {}).get("method", [])]
    if methods:
        out["search"] = {**data["search"], "method": methods}
    return out


def quick_data(data: dict, budget: str) -> dict:
    """--quick: 2 steps (or 6, up to 8 calls or 1 second), 1 seed, two of DRTune's K/m settings."""
    out = dict(data)
    calls = budget in ("equal_calls", "drtune_km")
    out["set"] = [s for s in out["set"] if not s.startswith(("train.max_unet_calls", "train.max_seconds", "train.steps"))]
    out["set"] += [f"train.steps={6 if budget != 'equal_steps' else 2}",
                   f"train.max_unet_calls={8 if calls else 0}", f"train.max_seconds={1 if budget == 'equal_time' else 0}"]
    search = dict(out["search"])
    search["train.seed"] = [0]
    if budget == "drtune_km":
        search["method"] = search["method"][:2]
    out["search"] = search
    return out


def sweep_data(study: Study, budget: str, T: int, quick: bool) -> dict:
    """A sweep file's data at chain length T (and --quick)."""
    data = yaml.safe_load((study.folder / f"{budget}.yaml").read_text())
    data["base"] = str((study.folder / data["base"]).resolve())
    data = scaled(data, T / study.T, T)
    return quick_data(data, budget) if quick else data


def time_marks(study: Study, T: int, quick: bool) -> dict[str, float]:
    """{budget: seconds} of each evaluated equal-time budget read from another's runs: its sweep
    file's train.max_seconds at this T."""
    marks = {}
    for budget in study.timed:
        if budget in study.evaluated:
            sets = dict(s.partition("=")[::2] for s in sweep_data(study, budget, T, quick)["set"])
            marks[budget] = float(sets["train.max_seconds"])
    return marks


def sweep_files(study: Study, T: int, quick: bool, runs: Path, sets: list[str], folder: Path) -> list:
    """(budget, SweepConfig) of each sweep, its file written into `folder` (checked there)."""
    out = []
    marks = time_marks(study, T, quick)
    for budget in study.budgets:
        data = sweep_data(study, budget, T, quick)
        for timed, seconds in marks.items():
            if study.timed[timed] == budget:  # its runs keep their LoRA at the time mark too
                data["set"].append(f"train.lora_at_seconds={seconds:g}")
        if study.methods:
            kept = [m for m in data["search"]["method"] if label(m, budget) in study.methods]
            if not kept:
                continue
            data["search"] = {**data["search"], "method": kept}
        data["set"] += list(sets)
        data["output_dir"] = str((runs / budget).resolve())
        path = folder / f"{budget}.yaml"
        path.write_text("# written by experiments/shapes/compare.py from "
                        f"{(study.folder / f'{budget}.yaml').relative_to(ROOT)} at T = {T}"
                        f"{' (--quick)' if quick else ''}\n" + yaml.safe_dump(data, sort_keys=False))
        out.append((budget, tune.load_sweep(path)))
    return out


def sweeps(study: Study, T: int, quick: bool, runs: Path, sets: list[str]) -> list:
    """Every sweep checked (a ConfigError names the bad value) without writing anything."""
    with tempfile.TemporaryDirectory() as tmp:
        return sweep_files(study, T, quick, runs, sets, Path(tmp))


def train_all(study: Study, T: int, quick: bool, runs: Path, sets: list[str]) -> dict[str, float]:
    seconds = {}
    runs.mkdir(parents=True, exist_ok=True)
    for name, sweep in sweep_files(study, T, quick, runs, sets, runs):
        if (Path(sweep.output_dir) / "results.csv").is_file():
            print(f"[compare] {name}: done already ({sweep.output_dir}/results.csv)", flush=True)
            continue
        t0 = time.time()
        if tune.run_sweep(sweep) is None:
            raise SystemExit(f"[compare] sweep {name} was interrupted; run the same command again to resume it")
        seconds[name] = time.time() - t0
    return seconds


def trials(study: Study, runs: Path, marks: dict[str, float]):
    """One record per trial: its budget, method label, seed, metrics (a DataFrame), folder and
    LoRA; an equal-time budget's records are its source runs cut at the time mark (`marks`)."""
    import pandas as pd

    recs = []
    for budget in study.budgets:
        for _, row in pd.read_csv(runs / budget / "results.csv").iterrows():
            folder = Path(row["trial_dir"])
            cfg = config_mod.load(folder / "config.yaml")
            m = pd.read_csv(folder / "metrics.csv")
            recs.append({"budget": budget, "method": label(vars(cfg.method), budget), "seed": cfg.train.seed,
                         "folder": folder, "lora": folder / "lora", "metrics": m, "cfg": cfg,
                         "name": display(vars(cfg.method), cfg.sampling.num_steps)})
    for to, src in study.reuse.items():  # a full-chain method's equal-calls run is its equal-steps run
        recs += [{**r, "budget": to} for r in recs if r["budget"] == src and r["method"] in FULL_CHAIN]
    for to, seconds in marks.items():
        recs += [at_mark(r, to, seconds) for r in recs if r["budget"] == study.timed[to]]
    return recs


def at_mark(rec: dict, budget: str, seconds: float) -> dict:
    """A run read at a time mark: its metrics up to the step whose training seconds reach it (the
    step train.max_seconds stops on) and the LoRA it kept there (train.lora_at_seconds)."""
    m = rec["metrics"]
    reached = m.index[m["train_seconds_total"] >= seconds]
    lora = rec["folder"] / "lora_at_seconds"
    if not len(reached):
        raise SystemExit(f"[compare] {budget}: {rec['name']} seed {rec['seed']} trained {m['train_seconds_total'].iloc[-1]:.0f}"
                         f" s in all, less than the {seconds:g} s mark ({rec['folder']}); the mark must be at most "
                         f"the shortest run's training seconds: lower train.max_seconds in {budget}.yaml, or raise "
                         f"train.max_unet_calls and remove the sweep's folder (the finished sweeps are kept)")
    if not (lora / "at.json").is_file():
        raise SystemExit(f"[compare] {budget}: {rec['folder']} has no LoRA at {seconds:g} s (lora_at_seconds/): its "
                         "sweep ran without train.lora_at_seconds; remove the sweep's folder to run it again")
    return {**rec, "budget": budget, "metrics": m.loc[:reached[0]], "lora": lora}


# ---------------------------------------------------------------------------------------------
# 2. Held-out evaluation.


def evaluate(study: Study, recs, base_cfg, prompts, seeds, out: Path) -> tuple[dict[str, dict], dict, dict]:
    """{variant: metrics} for the base model and each evaluated trial; variant = budget/method/seed."""
    from rayreward import evaluation
    from rayreward.rewards import build_reward
    from rayreward.rewards.lowlevel import centre_of_mass

    unique = {f"{r['budget']}/{r['method']}/s{r['seed']}": r for r in recs
              if r["budget"] in study.evaluated and r["lora"].is_dir()}
    seen, loras = {}, []
    for key, r in unique.items():  # a trial shared by two budgets is rendered once
        if str(r["lora"]) not in seen:
            seen[str(r["lora"])] = key
            loras.append(LoraArg(name=key.replace("/", "-"), path=str(r["lora"])))
    images = rendered(base_cfg, loras, prompts, seeds, out / "eval")
    pairs = [p for p in prompts for _ in seeds]
    reward, judge = build_reward(study.reward), judge_mod.load()
    div = evaluation.diversity(images, prompts, seeds)
    k = len(seeds)
    scores = {}
    for name, x in images.items():
        with torch.no_grad():
            part, whole = judge_mod.agreement(judge, x, pairs)
            centres = centre_of_mass(x).view(len(prompts), k, 2)
            scores[name] = {"heldout": float(reward(x, pairs).mean()),  # the study's reward
                            "symmetry_distance": float((x - x.flip(-1)).abs().mean() * 255),
                            "alignment_all_labels": float(whole.mean()), "alignment_labels": float(part.mean()),
                            "alignment_logp": float(judge_mod.alignment(judge, x, pairs).mean()),
                            "layout_spread": float(centres.std(dim=1).norm(dim=-1).mean()),
                            "diversity_pixel": float(div[div.variant == name]["diversity_pixel"].mean())}
    result = {"base": scores["base"]}
    for key, r in unique.items():
        result[key] = scores[seen[str(r["lora"])].replace("/", "-")]
    return result, images, seen


def rendered(base_cfg, loras, prompts, seeds, out: Path) -> dict[str, torch.Tensor]:
    """The evaluation's pictures: rendered once, kept in out/rendered.safetensors with what made
    them (model, sampling, captions, seeds, each LoRA's files and their times). Running the
    command again after the sweeps finished rewrites the tables without rendering again."""
    from safetensors import safe_open
    from safetensors.torch import save

    from rayreward import evaluation

    def stamp(folder: str) -> list:
        return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(folder).iterdir() if f.is_file())

    key = json.dumps({"model": base_cfg.model.name, "resolution": base_cfg.model.resolution,
                      "sampling": vars(base_cfg.sampling), "prompts": list(prompts), "seeds": list(seeds),
                      "loras": [[a.name, a.path, a.scale, stamp(a.path)] for a in loras]}, sort_keys=True, default=str)
    cache = out / "rendered.safetensors"
    if cache.is_file():
        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                print(f"[compare] evaluation: the pictures of {len(loras) + 1} variants from {cache}", flush=True)
                return {name: f.get_tensor(name) for name in f.keys()}
    images = evaluation.render_variants(base_cfg, loras, prompts, seeds, out, torch.device("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    files.write_bytes(cache, save({k: v.contiguous() for k, v in images.items()}, metadata={"key": key}))
    return images


# ---------------------------------------------------------------------------------------------
# 3. Gradient norm against K, and memory, at the base model.


def grad_norms(base_cfg, ks, batches: int, cache: Path | None = None, measure: bool = True) -> list[dict]:
    """The LoRA gradient's norm (before clipping) for DRaFT-K and DRTune at each K. With `cache`
    (a JSON file), rows measured before for the same config, Ks and batches are read from it
    (at T = 50 they take about 12 minutes on 2 cores) and new ones are written to it. `measure`
    False: only what the cache holds ([] when it holds none for this config)."""
    from rayreward import serving, train

    key = json.dumps({"config": base_cfg.to_dict(), "ks": list(ks), "batches": batches}, sort_keys=True, default=str)
    if cache is not None and cache.is_file():
        kept = json.loads(cache.read_text())
        if kept.get("key") == key:
            print(f"[compare] gradient norms from {cache}", flush=True)
            return kept["rows"]
    if not measure:
        print("[compare] gradient norms against K: not measured (--grad-norms measures them)", flush=True)
        return []
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
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(cache, json.dumps({"key": key, "rows": rows}))
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


COLS = ["final_reward", "heldout", "symmetry_distance", "alignment_all_labels", "alignment_logp", "layout_spread",
        "diversity_pixel", "steps", "unet_calls", "train_seconds"]


def table(study: Study, recs, evals, mem) -> tuple:
    import pandas as pd

    rows = []
    for r in recs:
        m = r["metrics"]
        key = f"{r['budget']}/{r['method']}/s{r['seed']}"
        rows.append({"budget": r["budget"], "method": r["method"], "name": r["name"], "seed": r["seed"],
                     "steps": len(m), "final_reward": float(m["reward_mean"].tail(5).mean()),
                     "unet_calls": int(m["unet_calls_total"].iloc[-1]),
                     "train_seconds": float(m["s_step"].sum()), **evals.get(key, {})})
    df = pd.DataFrame(rows)
    for c in COLS:
        if c not in df:
            df[c] = float("nan")
    g = df.groupby(["budget", "method"])[COLS]
    mean, std = g.mean(), g.std().fillna(0.0)
    out = []
    for (budget, method), row in mean.iterrows():
        rec = {"budget": budget, "method": method, "name": df[(df.budget == budget) & (df.method == method)]["name"].iloc[0],
               "seeds": int(g.size()[(budget, method)])}
        for c in COLS:
            rec[c], rec[c + "_std"] = float(row[c]), float(std.loc[(budget, method), c])
        rec["saved_mb"] = mem.get(method)
        out.append(rec)
    base = evals["base"]
    out.append({"budget": "-", "method": "base", "name": "base model", "seeds": 0, **{c: base.get(c) for c in COLS}})
    res = pd.DataFrame(out)
    res["order"] = res["method"].map(lambda s: ORDER.index(s) if s in ORDER else len(ORDER))
    res = res.sort_values(["budget", "order", "method"]).drop(columns="order").reset_index(drop=True)
    return res, df


def markdown(study: Study, res) -> str:
    def pm(row, c, fmt):
        v, s = row.get(c), row.get(c + "_std")
        if v is None or v != v:
            return ""
        spread = f" ± {fmt.replace('+', '').format(s)}" if s is not None and s == s and row["seeds"] > 1 else ""
        return fmt.format(v) + spread

    lines = [f"| budget | method | {study.reward} (train, last 5 steps) | held-out {study.reward} | "
             "symmetry distance (grey levels) | alignment: all 7 labels | alignment log p | layout spread | "
             "pixel diversity | steps | UNet calls | train s | saved MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for _, r in res[res["budget"].isin(("-",) + study.evaluated)].iterrows():
        mem = r.get("saved_mb")
        lines.append(" | ".join([
            f"| {TITLES.get(r['budget'], r['budget'])}", r["name"], pm(r, "final_reward", "{:+.4f}"),
            pm(r, "heldout", "{:+.4f}"), pm(r, "symmetry_distance", "{:.2f}"), pm(r, "alignment_all_labels", "{:.2f}"),
            pm(r, "alignment_logp", "{:.2f}"), pm(r, "layout_spread", "{:.3f}"), pm(r, "diversity_pixel", "{:.3f}"),
            pm(r, "steps", "{:.0f}"), pm(r, "unet_calls", "{:.0f}"), pm(r, "train_seconds", "{:.0f}"),
            "" if mem is None or mem != mem else f"{mem:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def km_markdown(res) -> str:
    """DRTune's K and m sweep: the train reward at the equal-calls budget."""
    rows = res[res["budget"] == "drtune_km"]
    lines = ["| DRTune | reward (train, last 5 steps) | steps | UNet calls | train s |", "|---|---:|---:|---:|---:|"]
    for _, r in rows.iterrows():
        lines.append(f"| {r['name']} | {r['final_reward']:+.4f} | {r['steps']:.0f} | {r['unet_calls']:.0f} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_curves(study: Study, recs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    budgets = list(study.evaluated)
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        x_col, x_label = X_AXIS[budget]
        for i, meth in enumerate(ORDER):
            runs = [r for r in recs if r["budget"] == budget and r["method"] == meth]
            if not runs:
                continue
            xs = [np.asarray(r["metrics"][x_col], dtype=float) + (1 if x_col == "step" else 0) for r in runs]
            grid = np.linspace(max(x[0] for x in xs), min(x[-1] for x in xs), 50)
            ys = np.stack([np.interp(grid, x, smooth(r["metrics"]["reward_mean"])) for x, r in zip(xs, runs)])
            ax.plot(grid, ys.mean(0), color=f"C{i}", label=runs[0]["name"])
            if len(runs) > 1:
                ax.fill_between(grid, ys.min(0), ys.max(0), color=f"C{i}", alpha=0.12)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{study.reward} reward (train prompts, 5-step mean)")
        ax.set_title(TITLES.get(budget, budget))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    model = recs[0]["cfg"].model.name if recs else "shapes"
    fig.suptitle(f"{model} model, {study.reward} reward\nmean over seeds (band: min..max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grad_norms(rows, path: Path, T: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, lab in (("draft_k", "full backprop (DRaFT-K)"), ("drtune", "stop-grad input (DRTune)")):
        d = df[df["method"] == name].groupby("k")["grad_norm"]
        ax.errorbar(d.mean().index, d.mean().values, yerr=d.std().fillna(0).values, marker="o", capsize=3, label=lab)
    ax.set_xlabel(f"K (trained steps of T = {T})")
    ax.set_ylabel("LoRA gradient norm at the base model")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_grid(study: Study, images, seen, recs, prompts, seeds, grid_prompts, path: Path) -> None:
    cols, names = ["base"], ["base"]
    budget = study.evaluated[0]
    for meth in ORDER:
        r = next((r for r in recs if r["budget"] == budget and r["method"] == meth and r["seed"] == 0), None)
        if r is not None:
            cols.append(seen[str(r["lora"])].replace("/", "-"))
            names.append(r["name"])
    idx = [prompts.index(p) * len(seeds) + j for p in grid_prompts for j in range(min(2, len(seeds)))]
    labels = [f"{p} (seed {seeds[j]})" for p in grid_prompts for j in range(min(2, len(seeds)))]
    tiles = torch.stack([images[c][i] for i in idx for c in cols])
    render.grid_image(tiles, len(idx), len(cols), labels, names).save(path)


def findings(study: Study, res, recs, norms) -> dict:
    """The papers' claims as numbers from this run (the README and docs/shapes/ summarise them)."""
    import numpy as np

    f = {}
    shallow_all = ("draft_1", "draft_k2", "draft_k3", "draft_lv", "refl")
    for budget in study.evaluated if res is not None else ():
        b = res[res["budget"] == budget].set_index("method")
        shallow = [m for m in shallow_all if m in b.index]
        if "drtune" not in b.index or not shallow:
            continue
        for col in ("final_reward", "heldout"):
            best = max(shallow, key=lambda m: b.loc[m, col])
            f[f"{budget}_drtune_minus_best_shallow_{col}"] = float(b.loc["drtune", col] - b.loc[best, col])
            f[f"{budget}_best_shallow_{col}"] = best
        f[f"{budget}_rank_of_drtune_heldout"] = int((b.loc[[m for m in ORDER if m in b.index], "heldout"]
                                                     > b.loc["drtune", "heldout"]).sum()) + 1

    def mean_curve(meth):
        runs = [r["metrics"] for r in recs if r["budget"] == "equal_calls" and r["method"] == meth]
        if not runs:
            return None
        hi = min(float(m["unet_calls_total"].iloc[-1]) for m in runs)
        grid = np.linspace(0, hi, 200)
        return grid, np.stack([np.interp(grid, m["unet_calls_total"], smooth(m["reward_mean"])) for m in runs]).mean(0)

    lv, one = mean_curve("draft_lv"), mean_curve("draft_1")
    if lv is not None and one is not None:
        start = float(np.mean([r["metrics"]["reward_mean"].iloc[0] for r in recs
                               if r["budget"] == "equal_calls" and r["method"] in ("draft_lv", "draft_1")]))
        target = start + 0.5 * (one[1][-1] - start)  # half of DRaFT-1's gain
        reach = lambda c: next((float(x) for x, y in zip(*c) if y >= target), None)  # noqa: E731
        f["draft1_gain"] = float(one[1][-1] - start)  # at or below 0: no target to reach
        f["reward_target_half_of_draft1_gain"] = target
        f["calls_to_target"] = {"draft_lv": reach(lv), "draft_1": reach(one)}
        if f["calls_to_target"]["draft_lv"] and f["calls_to_target"]["draft_1"]:
            f["draft_lv_over_draft1_calls"] = f["calls_to_target"]["draft_lv"] / f["calls_to_target"]["draft_1"]
    for name in ("draft_k", "drtune"):
        by_k = {}
        for r in norms:
            if r["method"] == name:
                by_k.setdefault(r["k"], []).append(r["grad_norm"])
        if len(by_k) > 1:
            lo, hi = min(by_k), max(by_k)
            f[f"grad_norm_{name}_k{hi}_over_k{lo}"] = float(np.mean(by_k[hi]) / np.mean(by_k[lo]))
    return f


def subset(study: Study, budgets: str, methods: str) -> tuple[Study, str]:
    """The study cut to --budgets and --methods, or the problem with them."""
    names = [b for b in budgets.split(",") if b]
    allowed = study.budgets + tuple(study.timed)
    bad = [b for b in names if b not in allowed]
    if bad:
        return study, f"--budgets: {','.join(bad)} is not allowed; the study's budgets are {','.join(allowed)}"
    labels = tuple(m for m in methods.split(",") if m)
    bad = [m for m in labels if m not in ORDER and not m.startswith("drtune_k")]  # drtune_kK_mM: the K/m sweep's
    if bad:
        return study, f"--methods: {','.join(bad)} is not allowed; need labels among {','.join(ORDER)}"
    wanted = set(names or allowed)
    kept = tuple(b for b in study.budgets if b in wanted or b in {study.timed[t] for t in wanted & set(study.timed)})
    evaluated = tuple(b for b in study.evaluated if b in wanted)
    if not evaluated:
        return study, (f"--budgets: {budgets} has none of the budgets compared on held-out captions; add one of "
                       f"{','.join(study.evaluated)}")
    return replace(study, budgets=kept, evaluated=evaluated, timed={k: v for k, v in study.timed.items() if k in wanted},
                   reuse={k: v for k, v in study.reuse.items() if k in kept and v in kept}, methods=labels), ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", choices=sorted(STUDIES), default="symmetry",
                    help="symmetry (colour-level, T = 10) or centring (layout, T = 20)")
    ap.add_argument("--T", type=int, default=0, help="the chain length (default: the study's own)")
    ap.add_argument("--out", default=None, help="tables and plots (default: docs/shapes for symmetry, "
                                                "docs/shapes/centring/T<T> for centring)")
    ap.add_argument("--runs", default=None, help="the sweeps' folders (default runs/shapes_<study>/T<T>)")
    ap.add_argument("--quick", action="store_true", help="a few steps, 1 seed, T = 4: checks the pipeline (tests)")
    ap.add_argument("--grad-norms", action="store_true",
                    help="measure step 3's gradient norms against K (about 5 minutes at T = 20 on 2 cores, 12 at "
                         "T = 50); without it they are read from the runs' eval/grad_norms.json when measured "
                         "before, else left out")
    ap.add_argument("--grad-norms-only", action="store_true",
                    help="only step 3's gradient norms against K at the base model (minutes, not hours): "
                         "grad_norm.png and grad_norms.json in --out")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override on every sweep's base config, e.g. optim.lr=0.0005")
    ap.add_argument("--reward", default="", metavar="NAME",
                    help="train (and evaluate) this reward instead of the study's, e.g. symmetry on the layout "
                         "study's model and captions: the colour-level control; the default folders get its name "
                         "as a suffix")
    ap.add_argument("--budgets", default="", metavar="B,B", help="only these sweeps of the study (e.g. equal_calls)")
    ap.add_argument("--methods", default="", metavar="M,M",
                    help="only these methods (labels as in table.csv: drtune, draft, draft_1, draft_k3, draft_lv, "
                         "refl, alignprop); the default folders get the list as a suffix")
    args = ap.parse_args(argv)
    study = STUDIES[args.study]
    T = 4 if args.quick else (args.T or study.T)
    if T < 1:
        print(f"compare.py: error: --T: {args.T} is not allowed; need an integer >= 1", file=sys.stderr)
        return 2
    study, problem = subset(study, args.budgets, args.methods)
    if problem:
        print(f"compare.py: error: {problem}", file=sys.stderr)
        return 2
    sets = list(args.set)
    if args.reward:
        study = replace(study, reward=args.reward)
        sets.append(f"rewards=[{{name: {args.reward}, weight: 1.0}}]")
    suffix = ("-" + args.reward if args.reward else "") + ("-" + "+".join(study.methods) if study.methods else "")
    default_out = (study.out if args.study == "symmetry" else f"{study.out}/T{T}") + suffix
    out = Path(args.out or ROOT / default_out)
    runs = Path(args.runs or f"runs/shapes_{args.study}/T{T}{suffix}")
    try:  # every sweep value and --set checked before Ray starts or anything is written
        checked = sweeps(study, T, args.quick, runs, sets)
    except config_mod.ConfigError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    ran = tuple(b for b, _ in checked)  # --methods may leave a sweep with no trial
    evaluated = tuple(b for b in study.evaluated if b in ran or study.timed.get(b) in ran)
    if not evaluated:
        print(f"compare.py: error: --methods: {args.methods} runs in none of the sweeps compared on held-out "
              f"captions ({','.join(study.evaluated)})", file=sys.stderr)
        return 2
    study = replace(study, budgets=ran, evaluated=evaluated, timed={k: v for k, v in study.timed.items() if v in ran})
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ks = [1, 2] if args.quick else sorted({1, 2, 3, 5, 10, T // 2, T} - {0})
    if args.grad_norms_only:
        base_cfg = config_mod.from_dict(checked[0][1].base)
        norms = grad_norms(base_cfg, ks, 1 if args.quick else 4)
        plot_grad_norms(norms, out / "grad_norm.png", T)
        info = {"study": args.study, "T": T, "grad_norm": norms, "findings": findings(study, None, [], norms),
                "seconds": round(time.time() - t0, 1),
                "command": f"python experiments/shapes/compare.py --study {args.study} --T {T} --grad-norms-only"}
        (out / "grad_norms.json").write_text(json.dumps(info, indent=1))
        print(json.dumps(info["findings"], indent=1))
        return 0
    sweep_seconds = train_all(study, T, args.quick, runs, sets)
    # The local Ray the sweeps started (its GCS, dashboard and idle workers) is not needed by the
    # evaluation, which runs in this process.
    driver.shutdown_ray(quiet=True)
    t_eval = time.time()
    recs = trials(study, runs, time_marks(study, T, args.quick))
    base_cfg = config_mod.from_dict(checked[0][1].base)
    prompts = config_mod.read_prompts(study.heldout, "prompts")[:4 if args.quick else study.prompts]
    seeds = list(study.seeds[:2] if args.quick else study.seeds)
    evals, images, seen = evaluate(study, recs, base_cfg, prompts, seeds, runs)
    by_label = {}
    for r in recs:
        if r["budget"] in study.evaluated:
            by_label.setdefault(r["method"], vars(r["cfg"].method))
    mem = saved_bytes(base_cfg, {k: by_label[k] for k in ORDER if k in by_label})
    norms = grad_norms(base_cfg, ks, 1 if args.quick else 4, runs / "eval" / "grad_norms.json",
                       measure=args.grad_norms)
    res, per_trial = table(study, recs, evals, mem)
    res.to_csv(out / "table.csv", index=False)
    per_trial.to_csv(out / "trials.csv", index=False)
    (out / "table.md").write_text(markdown(study, res))
    if "drtune_km" in study.budgets:
        (out / "km.md").write_text(km_markdown(res))
    plot_curves(study, recs, out / "curves.png")
    if norms:
        plot_grad_norms(norms, out / "grad_norm.png", T)
    save_grid(study, images, seen, recs, prompts, seeds, prompts, out / "grid.png")
    command = f"python experiments/shapes/compare.py --study {args.study}" + (f" --T {T}" if args.T else "") \
        + (" --quick" if args.quick else "") + (" --grad-norms" if args.grad_norms else "") + "".join(f" --set {s}" for s in args.set) \
        + "".join(f" --{k} {v}" for k, v in (("reward", args.reward), ("budgets", args.budgets),
                                             ("methods", args.methods)) if v)
    info = {"study": args.study, "T": T, "findings": findings(study, res, recs, norms), "grad_norm": norms,
            "sweep_seconds": sweep_seconds, "evaluation_seconds": round(time.time() - t_eval, 1),
            "total_seconds": round(time.time() - t0, 1),
            "torch_threads": torch.get_num_threads(), "command": command}
    (out / "findings.json").write_text(json.dumps(info, indent=1))
    print(markdown(study, res))
    if "drtune_km" in study.budgets:
        print(km_markdown(res))
    print(json.dumps(info["findings"], indent=1))
    print(f"[compare] wrote {out}/table.md, table.csv, trials.csv, curves.png, "
          f"{'grad_norm.png, ' if norms else ''}grid.png, findings.json "
          f"in {info['total_seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
