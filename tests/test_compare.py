"""experiments/shapes/compare.py end to end, shortened (--quick: 1 seed, a few steps at T = 4):
both sweeps through Ray Tune, the held-out evaluation, the gradient norms and every output file."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from helpers import ROOT


@pytest.mark.slow  # two Ray Tune sweeps of 10 short trials, the evaluation and the gradient norms
def test_the_comparison_runs_from_one_command(tmp_path):
    out, runs = tmp_path / "docs", tmp_path / "runs"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/shapes/compare.py"), "--quick", "--out", str(out),
                           "--runs", str(runs)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for f in ("table.csv", "table.md", "trials.csv", "curves.png", "grad_norm.png", "grid.png", "findings.json"):
        assert (out / f).is_file(), f
    table = pd.read_csv(out / "table.csv")
    methods = ["drtune", "draft", "draft_1", "draft_k2", "draft_lv", "refl", "alignprop"]
    assert sorted(table[table["budget"] == "equal_steps"]["method"]) == sorted(methods)
    assert sorted(table[table["budget"] == "equal_calls"]["method"]) == sorted(methods)
    calls = table[table["budget"] == "equal_calls"].set_index("method")
    # --quick: 8 calls a sample for the methods that run to the budget; a full chain of T = 4 makes 4 a step
    for m in ("drtune", "draft_lv", "refl"):
        assert 8 <= calls.loc[m, "unet_calls"] < 8 + 6, m
    assert (calls.loc[["draft", "draft_1", "draft_k2", "alignprop"], "unet_calls"] == 2 * 4).all()
    for col in ("symmetry_distance", "alignment_all_labels", "alignment_logp", "final_reward", "saved_mb"):
        assert table[table["method"] != "base"][col].notna().all(), col
    info = json.loads((out / "findings.json").read_text())
    ks = {(r["method"], r["k"]) for r in info["grad_norm"]}
    assert ks == {("draft_k", 1), ("draft_k", 2), ("drtune", 1), ("drtune", 2)}
    assert all(r["grad_norm"] > 0 for r in info["grad_norm"])
    # run again: the finished sweeps are not run again, the tables are rewritten
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/shapes/compare.py"), "--quick", "--out", str(out),
                           "--runs", str(runs)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.count("done already") == 2, proc.stdout[-2000:]


def test_a_bad_override_is_refused_before_anything_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/shapes/compare.py"), "--set", "lora.rank=-1",
                           "--out", str(tmp_path / "docs"), "--runs", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "lora.rank: -1 is not allowed" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists() and not (tmp_path / "docs").exists()
