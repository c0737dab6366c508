"""experiments/shapes/compare.py: the layout study end to end, shortened (--quick: 1 seed, a few
steps at T = 4): its three Ray Tune sweeps, the held-out evaluation, the gradient norms and every
output file; and both studies' sweep files, rescaled to other chain lengths, checked without
running."""

import importlib.util
import io
import json
import subprocess
import sys

import pandas as pd
import pytest
from helpers import ROOT

from rayreward import config as config_mod

METHODS = ["drtune", "draft", "draft_1", "draft_k3", "draft_lv", "refl", "alignprop"]


def compare_module():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "experiments/shapes/compare.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # two Ray Tune sweeps of 9 short trials, the evaluation and the gradient norms
def test_the_layout_study_runs_from_one_command(tmp_path):
    out, runs = tmp_path / "docs", tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "experiments/shapes/compare.py"), "--study", "centring", "--quick",
           "--out", str(out), "--runs", str(runs)]
    proc = subprocess.run(cmd + ["--grad-norms"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for f in ("table.csv", "table.md", "trials.csv", "curves.png", "grad_norm.png", "grid.png", "findings.json",
              "km.md"):
        assert (out / f).is_file(), f
    for budget in ("equal_calls", "drtune_km"):  # the sweep files that ran, beside their runs
        assert "sampling.num_steps=4" in (runs / f"{budget}.yaml").read_text()
    # equal time is read from the equal-calls runs: each keeps its LoRA at the mark (1 s here)
    assert "train.lora_at_seconds=1" in (runs / "equal_calls.yaml").read_text()
    assert not (runs / "equal_time.yaml").exists()
    table = pd.read_csv(out / "table.csv")
    for budget in ("equal_calls", "equal_time"):
        assert sorted(table[table["budget"] == budget]["method"]) == sorted(METHODS), budget
    calls = table[table["budget"] == "equal_calls"].set_index("method")
    # --quick: 8 calls a sample; a full chain of T = 4 makes 4 a step, an early-stopped one fewer
    assert (calls.loc[["draft", "draft_1", "draft_k3", "alignprop"], "unet_calls"] == 2 * 4).all()
    for m in ("drtune", "draft_lv", "refl"):
        assert 8 <= calls.loc[m, "unet_calls"] < 8 + 6, m
    timed = table[table["budget"] == "equal_time"].set_index("method")  # cut where 1 s was reached
    assert (timed["train_seconds"] >= 1).all() and (timed["steps"] <= calls["steps"]).all(), timed
    kept = [json.loads((d / "lora_at_seconds" / "at.json").read_text())
            for d in (runs / "equal_calls" / "trials").iterdir()]  # each run's LoRA at the mark
    assert sorted(a["steps"] for a in kept) == sorted(timed["steps"]) and all(a["train_seconds_total"] >= 1 for a in kept)
    assert len(table[table["budget"] == "drtune_km"]) == 2
    evaluated = table[table["budget"].isin(["equal_calls", "equal_time"])]
    for col in ("heldout", "symmetry_distance", "alignment_all_labels", "alignment_logp", "layout_spread",
                "diversity_pixel", "final_reward", "saved_mb"):
        assert evaluated[col].notna().all(), col
    assert (evaluated["heldout"] <= 0).all()  # -distance from the centre
    info = json.loads((out / "findings.json").read_text())
    assert info["study"] == "centring" and info["T"] == 4
    ks = {(r["method"], r["k"]) for r in info["grad_norm"]}
    assert ks == {("draft_k", 1), ("draft_k", 2), ("drtune", 1), ("drtune", 2)}
    assert all(r["grad_norm"] > 0 for r in info["grad_norm"])
    assert "equal_calls_drtune_minus_best_shallow_heldout" in info["findings"]
    before = (out / "table.csv").read_text()
    # run again: the finished sweeps are not run again, nor is a picture rendered or a gradient norm
    # measured again (without --grad-norms they are read from the runs' cache); the tables are
    # rewritten, the same
    (out / "table.csv").unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.count("done already") == 2, proc.stdout[-2000:]
    assert "evaluation: the pictures of 15 variants from" in proc.stdout, proc.stdout[-2000:]
    assert "eval: rendering" not in proc.stdout + proc.stderr
    assert "gradient norms from" in proc.stdout and "grad norm draft_k" not in proc.stdout, proc.stdout[-2000:]
    assert json.loads((out / "findings.json").read_text())["grad_norm"] == info["grad_norm"]
    again = pd.read_csv(out / "table.csv")
    cols = ["heldout", "alignment_logp", "layout_spread", "final_reward"]  # the same pictures, scored again
    pd.testing.assert_frame_equal(again[cols], pd.read_csv(io.StringIO(before))[cols], check_exact=False, rtol=1e-5)


def test_a_time_mark_past_a_runs_end_or_a_run_without_its_lora_is_refused_by_name(tmp_path):
    """Equal wall time is read from the equal-calls runs at the mark: a run that trained less than
    the mark, or kept no LoRA there, stops the evaluation with the run, the seconds and the fix."""
    import pandas as pd

    c = compare_module()
    m = pd.DataFrame({"train_seconds_total": [10.0, 21.0, 33.0]})
    rec = {"metrics": m, "folder": tmp_path, "name": "DRTune (K=3, m=20)", "seed": 0, "budget": "equal_calls"}
    with pytest.raises(SystemExit, match=r"DRTune \(K=3, m=20\) seed 0 trained 33 s in all, less than the 75 s mark"
                                         r".*lower train.max_seconds in equal_time.yaml"):
        c.at_mark(rec, "equal_time", 75)
    with pytest.raises(SystemExit, match="has no LoRA at 30 s"):
        c.at_mark(rec, "equal_time", 30)
    (tmp_path / "lora_at_seconds").mkdir()
    (tmp_path / "lora_at_seconds" / "at.json").write_text("{}")
    got = c.at_mark(rec, "equal_time", 20)  # the step whose seconds reach the mark, and the LoRA kept there
    assert list(got["metrics"].train_seconds_total) == [10.0, 21.0] and got["budget"] == "equal_time"
    assert got["lora"] == tmp_path / "lora_at_seconds"


def test_the_sweeps_scale_with_the_chain_length(tmp_path):
    """--T rescales DRTune's m, the ReFL window and the call budget (fractions of the chain), not
    the time budget; both studies' files load at their own T and at others."""
    c = compare_module()
    by_budget = dict(c.sweeps(c.STUDIES["centring"], 50, False, tmp_path / "runs", []))
    methods = by_budget["equal_calls"].search["method"]["grid"]
    assert {"name": "drtune", "k": 3, "early_stop_m": 20} in methods  # m = 0.4 T
    assert {"name": "refl", "refl_window": [1, 13]} in methods  # the last quarter
    assert by_budget["equal_calls"].base["train"]["max_unet_calls"] == 500  # 10 full chains
    assert "equal_time" not in by_budget  # read from the equal-calls runs at the T = 20 mark: seconds do not scale
    assert by_budget["equal_calls"].base["train"]["lora_at_seconds"] == 30
    assert by_budget["equal_calls"].base["sampling"]["num_steps"] == 50
    assert by_budget["equal_calls"].search["train.seed"]["grid"] == [0, 1, 2]
    own = dict(c.sweeps(c.STUDIES["symmetry"], 10, False, tmp_path / "runs", []))
    assert len(own["equal_steps"].search["method"]["grid"]) == 7 and own["equal_steps"].base["train"]["steps"] == 40
    assert {"name": "drtune", "k": 2, "early_stop_m": 4} in own["equal_steps"].search["method"]["grid"]
    assert not (tmp_path / "runs").exists()  # checking writes nothing


def test_a_subset_of_the_study_runs_its_own_sweeps_in_its_own_folders(tmp_path):
    """--budgets and --methods cut the study: the T = 50 question of DRaFT-LV against DRaFT-1 is
    two methods at equal calls, not the whole study."""
    c = compare_module()
    study, problem = c.subset(c.STUDIES["centring"], "equal_calls", "draft_1,draft_lv")
    assert not problem and study.budgets == ("equal_calls",) and study.evaluated == ("equal_calls",)
    [(budget, sweep)] = c.sweeps(study, 50, False, tmp_path / "runs", [])
    assert budget == "equal_calls" and sweep.search["train.seed"]["grid"] == [0, 1, 2]
    assert sweep.search["method"]["grid"] == [{"name": "draft_k", "k": 1}, {"name": "draft_lv", "lv_copies": 2}]
    assert sweep.base["train"]["lora_at_seconds"] == 0  # equal time not asked for: no LoRA kept at a mark
    study, _ = c.subset(c.STUDIES["centring"], "equal_time", "")  # equal time alone runs the equal-calls sweep
    assert study.budgets == ("equal_calls",) and study.evaluated == ("equal_time",)
    [(budget, sweep)] = c.sweeps(study, 20, False, tmp_path / "runs", [])
    assert budget == "equal_calls" and sweep.base["train"]["lora_at_seconds"] == 30
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, said", [
    (["--set", "lora.rank=-1"], "lora.rank: -1 is not allowed"),
    (["--methods", "draft,dpo"], "--methods: dpo is not allowed; need labels among drtune,"),
    (["--budgets", "equal_steps"], "--budgets: equal_steps is not allowed; the study's budgets are equal_calls,"),
    (["--budgets", "drtune_km"], "--budgets: drtune_km has none of the budgets compared on held-out captions"),
    (["--methods", "drtune_k1_m8", "--budgets", "equal_calls"], "--methods: drtune_k1_m8 runs in none of the sweeps"),
    (["--reward", "nosuch"], "rewards[0].name: 'nosuch' is unknown; allowed: aesthetic,"),
])
def test_a_bad_option_is_refused_before_anything_runs(tmp_path, args, said):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/shapes/compare.py"), "--study", "centring",
                           *args, "--out", str(tmp_path / "docs"), "--runs", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists() and not (tmp_path / "docs").exists()


def test_the_gradient_norms_alone(tmp_path):
    """--grad-norms-only measures the LoRA gradient norm against K at the base model and nothing
    else: no sweep runs, nothing is trained."""
    proc = subprocess.run([sys.executable, str(ROOT / "experiments/shapes/compare.py"), "--study", "centring",
                           "--quick", "--grad-norms-only", "--out", str(tmp_path / "docs"),
                           "--runs", str(tmp_path / "runs")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((tmp_path / "docs" / "grad_norms.json").read_text())
    assert {(r["method"], r["k"]) for r in info["grad_norm"]} == {("draft_k", 1), ("draft_k", 2), ("drtune", 1),
                                                                    ("drtune", 2)}
    assert all(r["grad_norm"] > 0 for r in info["grad_norm"]) and "grad_norm_draft_k_k2_over_k1" in info["findings"]
    assert (tmp_path / "docs" / "grad_norm.png").is_file() and not (tmp_path / "runs").exists()


def test_gradient_norms_are_measured_only_when_asked(tmp_path, capsys):
    """Without --grad-norms the study reads the norms from its cache, and measures none when the
    cache holds none for this config (the T = 20 command stays within the hour)."""
    compare = compare_module()
    cfg = config_mod.load(ROOT / "experiments/shapes/centring/base.yaml")
    cache = tmp_path / "grad_norms.json"
    assert compare.grad_norms(cfg, [1, 2], 1, cache, measure=False) == []
    assert "not measured" in capsys.readouterr().out and not cache.exists()
    rows = [{"method": "draft_k", "k": 1, "batch": 0, "grad_norm": 0.5}]
    key = json.dumps({"config": cfg.to_dict(), "ks": [1, 2], "batches": 1}, sort_keys=True, default=str)
    cache.write_text(json.dumps({"key": key, "rows": rows}))
    assert compare.grad_norms(cfg, [1, 2], 1, cache, measure=False) == rows
    assert compare.grad_norms(cfg, [1, 3], 1, cache, measure=False) == []  # other Ks: not what it holds
