"""The training loop in-process (every method, both flavours) and through Ray Train (resume)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayreward import config, models, train
from rayreward.config import LossConfig
from rayreward.rewards import reward_loss

from helpers import ROOT, quick_cfg, rows


def test_guarded_step_skips_non_finite_and_leaves_lora_untouched():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    (p * torch.tensor([1.0, float("nan"), 1.0])).sum().backward()
    stepped, norm = train.guarded_step([p], opt, torch.tensor(float("nan")), 1.0)
    assert not stepped and torch.equal(p.detach(), torch.ones(3)) and p.grad is None
    (p * 10).sum().backward()
    stepped, norm = train.guarded_step([p], opt, torch.tensor(1.0), 1.0)
    assert stepped and norm == pytest.approx(10 * 3**0.5) and not torch.equal(p.detach(), torch.ones(3))


def test_reward_loss_forms():
    r = torch.tensor([1.0, 3.0])
    assert torch.equal(reward_loss(r, LossConfig("linear", scale=2.0)), torch.tensor([-2.0, -6.0]))
    assert torch.equal(reward_loss(r, LossConfig("hinge", margin=2.0)), torch.tensor([1.0, 0.0]))
    assert torch.equal(reward_loss(r, LossConfig("absolute", margin=2.0)), torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
@pytest.mark.parametrize("method,trained", [("drtune", {1, 2}), ("draft", {4}), ("draft_k", {2}), ("draft_lv", {1}),
                                            ("refl", {1}), ("alignprop", {1, 2, 3, 4})])
def test_every_method_trains_on_both_flavours(tmp_path, model, method, trained):
    cfg = quick_cfg(tmp_path, f"model.name={model}", f"method.name={method}", "method.refl_window=[1, 2]")
    last = train.run_training(cfg)
    log = rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in log] == [0, 1]
    assert {int(r["trained_steps"]) for r in log} <= trained
    assert all(int(r["stepped"]) == 1 for r in log) and last["grad_norm"] > 0
    for f in ["grid_start.png", "grid_end.png", "reward_curve.png", f"lora/{models.LORA_WEIGHT_NAME}"]:
        assert (tmp_path / f).is_file(), f


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    cfg = quick_cfg(tmp_path, "train.steps=3", "rewards=[{name: 'helpers:nan_on_step', args: {bad_calls: [1]}}]")
    last = train.run_training(cfg)
    log = rows(tmp_path / "metrics.csv")
    assert [int(r["stepped"]) for r in log] == [1, 0, 1]
    assert last["skipped_total"] == 1


def test_quickstart_reward_rises(tmp_path):
    """The quickstart's claim, in-process and shortened: DRTune raises the symmetry reward."""
    cfg = config.load(ROOT / "experiments/quickstart.yaml", [f"output_dir={tmp_path}", "train.steps=20"])
    train.run_training(cfg)
    r = [float(x["reward_mean"]) for x in rows(tmp_path / "metrics.csv")]
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert last > first + 0.03, (first, last)


def test_ray_train_fit_checkpoints_and_resumes(tmp_path, ray_session):
    out = tmp_path / "run"
    cfg = quick_cfg(out, "train.steps=3", "train.checkpoint_every=2")
    result = train.fit(cfg)
    assert result.error is None
    ckpt = Path(result.checkpoint.path)
    assert (ckpt / "lora" / models.LORA_WEIGHT_NAME).is_file()
    state = train.read_checkpoint(ckpt)
    assert state.step == 3 and state.optimizer_state["state"]  # AdamW moments, loaded weights_only
    assert [int(r["step"]) for r in rows(out / "metrics.csv")] == [0, 1, 2]

    # the same run name and storage path with more steps: resumes at step 3, no step repeated
    cfg = quick_cfg(out, "train.steps=5", "train.checkpoint_every=2")
    result = train.fit(cfg)
    assert result.error is None
    assert [int(r["step"]) for r in rows(out / "metrics.csv")] == [0, 1, 2, 3, 4]
    assert train.read_checkpoint(result.checkpoint.path).step == 5


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """All randomness of a step comes from (seed, step, rank): 2 steps + resume + 2 steps == 4 steps."""
    train.run_training(quick_cfg(tmp_path / "full", "train.steps=4"))
    saved = {}
    train.run_training(quick_cfg(tmp_path / "part", "train.steps=2"),
                       report=lambda row, folder: folder and saved.update(dir=folder))
    train.run_training(quick_cfg(tmp_path / "part", "train.steps=4"), resume=train.read_checkpoint(saved["dir"]))
    full, part = rows(tmp_path / "full/metrics.csv"), rows(tmp_path / "part/metrics.csv")
    assert [int(r["step"]) for r in part] == [0, 1, 2, 3]
    for a, b in zip(full, part):
        assert float(a["reward_mean"]) == pytest.approx(float(b["reward_mean"]), rel=1e-4, abs=1e-6)
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4, abs=1e-6)


def test_sample_cli_renders_a_grid_with_scaled_loras(tmp_path):
    c = models.load_components(config.ModelConfig(name="tiny"))
    p = models.add_lora(c.unet, config.LoraConfig())
    with torch.no_grad():
        for t in p:
            t.add_(0.3)
    models.save_lora(c.unet, tmp_path / "lora", c.flavour)
    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "-m", "rayreward.cli", "sample", "--model", "tiny", "--lora",
                           f"{tmp_path / 'lora'}:0.5", "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0", "1",
                           "--set", "sampling.num_steps=4", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    assert Image.open(out).size[0] > 2 * 128
    proc = subprocess.run([sys.executable, "-m", "rayreward.cli", "sample", "--lora", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "g2.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr
