"""`rayreward report`: several runs' reward curves in one plot, and a method x reward table (the
papers' layout), from the runs' config.yaml and metrics.csv alone."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from rayreward import files
from rayreward.config import ConfigError


def run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Training run folders (config.yaml + metrics.csv); a sweep folder expands to its trials."""
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
    with files.written(out / "report.png", "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    runs = pd.DataFrame(rows)
    table = runs.pivot_table(index="method", columns="reward", values="final_reward", aggfunc="mean")
    runs.to_csv(out / "runs.csv", index=False)
    table.to_csv(out / "table.csv")
    return runs, table


def markdown(table, floatfmt: str, index: bool = True) -> str:
    """A DataFrame as a markdown table when `tabulate` is installed (pandas needs it), else as text."""
    import importlib.util

    if importlib.util.find_spec("tabulate") is not None:
        return table.to_markdown(floatfmt=floatfmt, index=index)
    return table.to_string(float_format=lambda v: format(v, floatfmt), index=index)
