"""The training loop in-process (every method, both flavours) and through Ray Train (resume)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayreward import config, driver, lora_io, methods, models, runfolder, sampling, train
from rayreward.config import LossConfig
from rayreward.rewards.composite import reward_loss

from helpers import ROOT, make_worker, quick_cfg, rows


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


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2"])
@pytest.mark.parametrize("method,trained", [("drtune", {1, 2}), ("draft", {4}), ("draft_k", {2}), ("draft_lv", {1}),
                                            ("refl", {1}), ("alignprop", {1, 2, 3, 4})])
def test_every_method_trains_on_every_family(tmp_path, model, method, trained):
    cfg = quick_cfg(tmp_path, f"model.name={model}", f"method.name={method}", "method.refl_window=[1, 2]")
    last = train.run_training(cfg)
    log = rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in log] == [0, 1]
    assert {int(float(r["trained_steps"])) for r in log} <= trained
    assert all(int(r["stepped"]) == 1 for r in log) and last["grad_norm"] > 0
    for f in ["grid_start.png", "grid_end.png", "reward_curve.png", f"lora/{lora_io.LORA_WEIGHT_NAME}"]:
        assert (tmp_path / f).is_file(), f


def test_grid_scores_keep_one_start_and_one_end_grid(tmp_path):
    path = tmp_path / "grid_scores.csv"
    prompts, seeds = ["a", "b"], [0, 7]
    mean = runfolder.write_grid_scores(path, "start", prompts, seeds, {"r": torch.tensor([1.0, 2.0, 3.0, 4.0])})
    assert mean == {"r": 2.5} and runfolder.grid_change(path) == ""  # no end grid yet
    runfolder.write_grid_scores(path, "end", prompts, seeds, {"r": torch.tensor([0.0, 0.0, 0.0, 0.0])})
    runfolder.write_grid_scores(path, "end", prompts, seeds, {"r": torch.tensor([3.0, 3.0, 3.0, 5.0])})  # a resume's
    log = rows(path)
    assert [(r["grid"], r["prompt"], r["seed"], float(r["r"])) for r in log] == [
        ("start", "a", "0", 1.0), ("start", "a", "7", 2.0), ("start", "b", "0", 3.0), ("start", "b", "7", 4.0),
        ("end", "a", "0", 3.0), ("end", "a", "7", 3.0), ("end", "b", "0", 3.0), ("end", "b", "7", 5.0)]
    assert runfolder.grid_change(path) == "r +2.5000 -> +3.5000"
    # a damaged file (a hand edit, a disk fault) is rewritten, not a crash after training
    for damaged in (b"\xff\xfe\x00garbage", b"no,header,here\n1,2,3\n"):
        path.write_bytes(damaged)
        runfolder.write_grid_scores(path, "end", prompts, seeds, {"r": torch.tensor([3.0, 3.0, 3.0, 5.0])})
        assert [r["grid"] for r in rows(path)] == ["end"] * 4


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    # the reward's calls: 0 scores the start grid, 1-3 the steps: NaN on step 1
    cfg = quick_cfg(tmp_path, "train.steps=3", "rewards=[{name: 'helpers:nan_on_step', args: {bad_calls: [2]}}]")
    last = train.run_training(cfg)
    log = rows(tmp_path / "metrics.csv")
    assert [int(r["stepped"]) for r in log] == [1, 0, 1]
    assert last["skipped_total"] == 1


@pytest.mark.slow  # 40 steps of the shapes model: about a minute on 2 cores
def test_the_quickstart_raises_symmetry_on_the_shapes_model(tmp_path):
    """The quickstart's claims, in-process: 40 DRTune steps raise the symmetry reward (README:
    -0.021 -> -0.015, means of the first and last 5 steps; on the grid's 8 images, the same before
    and after, -0.0335 -> -0.0159, every image more symmetric), and the alignment is logged beside it."""
    cfg = config.load(ROOT / "experiments/quickstart.yaml", [f"output_dir={tmp_path}"])
    train.run_training(cfg)
    log = rows(tmp_path / "metrics.csv")
    r = [float(x["reward/symmetry"]) for x in log]
    assert sum(r[-5:]) / 5 > sum(r[:5]) / 5 + 0.002, r
    assert all(float(x["reward/shapes_alignment"]) < 0 for x in log)
    grid = rows(tmp_path / "grid_scores.csv")
    start = [float(x["symmetry"]) for x in grid if x["grid"] == "start"]
    end = [float(x["symmetry"]) for x in grid if x["grid"] == "end"]
    assert len(start) == len(end) == 8 and all(e > s for s, e in zip(start, end)), (start, end)
    assert sum(end) / 8 > sum(start) / 8 + 0.008


def test_tiny_run_reward_rises(tmp_path):
    """experiments/tiny.yaml, in-process and shortened: DRTune raises the symmetry reward."""
    cfg = config.load(ROOT / "experiments/tiny.yaml", [f"output_dir={tmp_path}", "train.steps=20"])
    train.run_training(cfg)
    r = [float(x["reward_mean"]) for x in rows(tmp_path / "metrics.csv")]
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert last > first + 0.03, (first, last)


def test_ray_train_fit_checkpoints_and_resumes(tmp_path, ray_session):
    out = tmp_path / "run"
    cfg = quick_cfg(out, "train.steps=3", "train.checkpoint_every=2")
    result = driver.fit(cfg)
    assert result.error is None
    ckpt = Path(result.checkpoint.path)
    assert (ckpt / "lora" / lora_io.LORA_WEIGHT_NAME).is_file()
    state = runfolder.read_checkpoint(ckpt)
    assert state.step == 3 and state.optimizer_state["state"]  # AdamW moments, loaded weights_only
    assert [int(r["step"]) for r in rows(out / "metrics.csv")] == [0, 1, 2]

    # the same run name and storage path with more steps: resumes at step 3, no step repeated
    cfg = quick_cfg(out, "train.steps=5", "train.checkpoint_every=2")
    result = driver.fit(cfg)
    assert result.error is None
    assert [int(r["step"]) for r in rows(out / "metrics.csv")] == [0, 1, 2, 3, 4]
    assert runfolder.read_checkpoint(result.checkpoint.path).step == 5
    # the start grid was scored once, by the first run; the end grid is the resumed run's
    grid = rows(out / "grid_scores.csv")
    assert [(r["grid"], r["prompt"], r["seed"]) for r in grid] == [("start", "a cat", "0"), ("end", "a cat", "0")]
    assert all(float(r["symmetry"]) < 0 for r in grid)


def test_a_unet_call_budget_ends_the_run_and_survives_a_resume(tmp_path):
    """train.max_unet_calls: DRTune's early stop makes a step cost 3 or 4 calls at T = 4; the run
    ends on the step that reaches 10, and a resume past it trains nothing more."""
    saved = {}
    cfg = quick_cfg(tmp_path, "train.steps=50", "train.max_unet_calls=10", "train.checkpoint_every=100")
    last = train.run_training(cfg, report=lambda row, folder: folder and saved.update(r=runfolder.read_checkpoint(folder)))
    log = rows(tmp_path / "metrics.csv")
    calls = [int(r["unet_calls"]) for r in log]
    assert set(calls) <= {3, 4} and sum(calls[:-1]) < 10 <= sum(calls)
    assert [int(r["unet_calls_total"]) for r in log][-1] == sum(calls) == last["unet_calls_total"]
    resume = saved["r"]  # the last step checkpoints: the budget's end is the run's end
    assert resume.step == len(log) and resume.unet_calls == sum(calls)
    train.run_training(quick_cfg(tmp_path, "train.steps=50", "train.max_unet_calls=10"), resume=resume)
    assert len(rows(tmp_path / "metrics.csv")) == len(log)
    # a larger budget goes on from the saved count
    train.run_training(quick_cfg(tmp_path, "train.steps=50", "train.max_unet_calls=14"), resume=resume)
    more = rows(tmp_path / "metrics.csv")
    assert len(more) > len(log) and int(more[-1]["unet_calls_total"]) >= 14 > int(more[-2]["unet_calls_total"])


def test_a_time_budget_ends_the_run_and_survives_a_resume(tmp_path):
    """train.max_seconds: the run ends on the step at which its summed s_step reaches the budget
    (a budget below one step's time: after the first step); checkpoints keep the total, so a
    resume past it trains nothing more, and a larger budget goes on from it."""
    saved = {}
    cfg = quick_cfg(tmp_path, "train.steps=50", "train.max_seconds=1e-6", "train.checkpoint_every=100")
    last = train.run_training(cfg, report=lambda row, folder: folder and saved.update(r=runfolder.read_checkpoint(folder)))
    log = rows(tmp_path / "metrics.csv")
    assert len(log) == 1 and float(log[0]["train_seconds_total"]) == pytest.approx(float(log[0]["s_step"]))
    assert last["train_seconds_total"] == pytest.approx(saved["r"].seconds) and saved["r"].step == 1
    train.run_training(quick_cfg(tmp_path, "train.steps=50", "train.max_seconds=1e-6"), resume=saved["r"])
    assert len(rows(tmp_path / "metrics.csv")) == 1
    spent = float(log[0]["s_step"])
    train.run_training(quick_cfg(tmp_path, "train.steps=50", f"train.max_seconds={spent * 1.5}"), resume=saved["r"])
    more = rows(tmp_path / "metrics.csv")
    totals = [float(r["train_seconds_total"]) for r in more]
    assert len(more) >= 2 and totals[-1] >= spent * 1.5 > totals[-2]
    with pytest.raises(config.ConfigError, match=r"train.max_seconds: -1.0 is not allowed"):
        quick_cfg(tmp_path, "train.max_seconds=-1")


def test_the_lora_at_a_time_mark_is_what_a_run_stopped_there_saves(tmp_path):
    """train.lora_at_seconds: after the step whose training seconds reach the mark the LoRA is
    saved into lora_at_seconds/ and the run goes on; those weights are the final LoRA of the same
    run stopped by train.max_seconds at the same mark (a mark below one step's time: step 1)."""
    from safetensors.torch import load_file

    train.run_training(quick_cfg(tmp_path / "long", "train.steps=3", "train.lora_at_seconds=1e-6"))
    log = rows(tmp_path / "long" / "metrics.csv")
    at = json.loads((tmp_path / "long" / "lora_at_seconds" / "at.json").read_text())
    assert len(log) == 3 and at["steps"] == 1  # saved once, after the first step, and trained on
    assert at["train_seconds_total"] == pytest.approx(float(log[0]["train_seconds_total"]))
    assert at["unet_calls_total"] == int(log[0]["unet_calls_total"])
    train.run_training(quick_cfg(tmp_path / "short", "train.steps=3", "train.max_seconds=1e-6"))
    assert len(rows(tmp_path / "short" / "metrics.csv")) == 1
    snap = load_file(tmp_path / "long" / "lora_at_seconds" / lora_io.LORA_WEIGHT_NAME)
    stopped = load_file(tmp_path / "short" / "lora" / lora_io.LORA_WEIGHT_NAME)
    final = load_file(tmp_path / "long" / "lora" / lora_io.LORA_WEIGHT_NAME)
    assert snap.keys() == stopped.keys() and all(torch.equal(snap[k], stopped[k]) for k in snap)
    assert not all(torch.equal(snap[k], final[k]) for k in snap)  # the run went on training
    with pytest.raises(config.ConfigError, match=r"train.lora_at_seconds: -2.0 is not allowed"):
        quick_cfg(tmp_path, "train.lora_at_seconds=-2")


@pytest.mark.parametrize("model", ["tiny", "tiny-sd3"])  # a DDIM chain and a flow-matching one
def test_resume_reproduces_the_uninterrupted_run(tmp_path, model):
    """All randomness of a step comes from (seed, step, rank): 2 steps + resume + 2 steps == 4 steps."""
    m = f"model.name={model}"
    train.run_training(quick_cfg(tmp_path / "full", "train.steps=4", m))
    saved = {}  # the staged checkpoint folder is removed once reported: read it in the callback
    train.run_training(quick_cfg(tmp_path / "part", "train.steps=2", m),
                       report=lambda row, folder: folder and saved.update(resume=runfolder.read_checkpoint(folder)))
    train.run_training(quick_cfg(tmp_path / "part", "train.steps=4", m), resume=saved["resume"])
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
    lora_io.save_lora(c.unet, tmp_path / "lora", c.flavour)
    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "-m", "rayreward.cli", "sample", "--model", "tiny", "--lora",
                           f"{tmp_path / 'lora'}:0.5", "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0", "1",
                           "--set", "sampling.num_steps=4", "--out", str(out), "--save-images", str(tmp_path / "samples")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    assert Image.open(out).size[0] > 2 * 128
    # the README's next step: score the saved images, prompts in their order
    assert (tmp_path / "samples/prompts.txt").read_text().splitlines() == ["a cat"] * 2 + ["a dog"] * 2
    proc = subprocess.run([sys.executable, "-m", "rayreward.cli", "score", "--rewards", "symmetry", "--images",
                           str(tmp_path / "samples"), "--prompts", str(tmp_path / "samples/prompts.txt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    scores = (tmp_path / "samples/scores.csv").read_text().splitlines()
    assert scores[0] == "image,prompt,symmetry" and scores[1].startswith("p000_s0.png,a cat,-")
    proc = subprocess.run([sys.executable, "-m", "rayreward.cli", "sample", "--lora", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "g2.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("method,eta,model", [("draft", 0.5, "tiny"), ("draft_lv", 0.0, "tiny"), ("draft_lv", 0.5, "tiny"),
                                              ("draft_lv", 0.0, "tiny-sd3")])
def test_a_workers_share_is_its_slice_of_the_global_batch(tmp_path, method, eta, model):
    """Worker 1 of 2 (batch 2) samples exactly rows 2..3 of 1 worker with batch 4, step noise and
    DRaFT-LV copies included (both are drawn per global sample), on a DDIM and a flow chain."""
    common = [f"method.name={method}", f"sampling.eta={eta}", f"model.name={model}"]
    one = make_worker(quick_cfg(tmp_path, "train.batch_size=4", *common), "cpu")
    two = make_worker(quick_cfg(tmp_path, "train.batch_size=2", *common), "cpu", rank=1, world=2)
    _, _, res_one = one.forward_backward(3)
    _, _, res_two = two.forward_backward(3)
    n = res_one.copies
    want = res_one.latents.detach().view(n, 4, -1)[:, 2:]
    # float noise of batched matmuls only, which depends on the CPU's kernels for batch 2 against
    # batch 4 (measured: 0 on the UNet on one machine, up to 2.0e-5 on another, latents up to 16;
    # 2.4e-6 on SD3's joint attention); another sample would differ by O(1)
    assert torch.allclose(res_two.latents.detach().view(n, 2, -1), want, atol=1e-4, rtol=0)


def test_draft_lv_hinge_loss_is_the_mean_of_the_copies_losses():
    """Rewards 1.0 and 3.4 for the two copies of one sample, hinge margin 2: the copies' losses
    are 1.0 and 0.0, so the loss is 0.5 (the hinge of the mean reward 2.2 would be 0)."""
    from rayreward.rewards.composite import CompositeReward, reward_and_loss

    first_pixel = CompositeReward(["r"], [1.0], [lambda images, prompts: images.flatten(1)[:, 0]])
    images = torch.zeros(2, 3, 2, 2)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 1.0, 3.4  # copy 0 and copy 1 of sample 0
    loss, r, _ = reward_and_loss(first_pixel, LossConfig("hinge", margin=2.0), images, ["p"], copies=2)
    assert float(loss) == pytest.approx(0.5) and float(r[0]) == pytest.approx(2.2)
    loss, _, _ = reward_and_loss(first_pixel, LossConfig("absolute", margin=2.0), images, ["p"], copies=2)
    assert float(loss) == pytest.approx((1.0 + 1.4) / 2)


def test_a_step_that_trains_nothing_leaves_the_lora_untouched(tmp_path):
    """DRTune with K = 1: when the one trained step falls after the early stop, no UNet call
    carries gradient; the optimizer must not step (AdamW would move the LoRA on momentum)."""
    cfg = quick_cfg(tmp_path, "method.k=1", "method.early_stop_m=4", "train.steps=8")
    empty = [s for s in range(8) if not methods.make_plan(
        cfg.method, 4, 2, torch.Generator().manual_seed(train._seed(cfg.train.seed, s, "plan"))).grad_steps]
    first = next(s for s in empty if s > 0)  # an empty step after trained ones: AdamW has momentum
    w = make_worker(cfg, "cpu")
    for step in range(first + 1):
        before = [p.detach().clone() for p in w.params]
        row = w.train_step(step)
    assert row["trained_steps"] == 0 and row["stepped"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, w.params))
    assert "no trained step" in train.progress_line(row, 8)


@pytest.mark.parametrize("reward,needle", [("helpers:detached_mean", "does not depend on the images"),
                                           ("helpers:zero_gradient", "gradient with respect to the images is zero")])
def test_a_reward_without_gradient_stops_on_the_first_step(tmp_path, reward, needle):
    cfg = quick_cfg(tmp_path, f"rewards=[{{name: '{reward}'}}]", "method.name=draft_k")
    with pytest.raises(train.RewardGradientError, match=needle):
        train.run_training(cfg)
    assert not (tmp_path / "lora").exists()


def test_vae_checkpointing_recomputes_the_decoder_with_the_same_gradient(tmp_path):
    """train.vae_checkpointing turns on diffusers' decoder checkpointing; the image gradient that
    reaches the latents is unchanged (to fp32 rounding)."""
    grads = {}
    for on in (False, True):
        w = make_worker(quick_cfg(tmp_path, f"train.vae_checkpointing={str(on).lower()}"))
        assert w.c.vae.decoder.gradient_checkpointing is on
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
        models.decode(w.c.vae, z).pow(2).mean().backward()
        grads[on] = z.grad
    assert torch.allclose(grads[True], grads[False], rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # torch.compile (inductor) of the tiny UNet: about two minutes on 2 CPU cores
def test_the_compiled_chain_matches_the_eager_one_after_an_optimizer_step(tmp_path):
    """train.compile: the compiled UNet reads the LoRA parameters AdamW updated in place, so after
    a step the compiled chain gives the eager chain's latents, without compiling again."""
    from torch._dynamo.utils import counters

    workers = {mode: make_worker(quick_cfg(tmp_path / mode, f"train.compile={mode}", "method.name=draft_k"))
               for mode in ("off", "default")}
    assert workers["default"].warm_up() > 0 and workers["off"].warm_up() == 0.0
    graphs = counters["stats"]["unique_graphs"]
    before = [p.detach().clone() for p in workers["default"].params]
    rows_ = {mode: w.train_step(0) for mode, w in workers.items()}
    assert all(r["stepped"] == 1 for r in rows_.values())
    assert rows_["default"]["loss"] == pytest.approx(rows_["off"]["loss"], rel=1e-4)
    assert rows_["default"]["grad_norm"] == pytest.approx(rows_["off"]["grad_norm"], rel=1e-3)
    assert not all(torch.equal(p, q) for p, q in zip(workers["default"].params, before))  # AdamW moved the LoRA
    # AdamW's first step is lr * sign(grad): rounding flips the sign of near-zero gradients, so the
    # eager worker takes the compiled worker's updated LoRA before the chains are compared
    with torch.no_grad():
        for a, b in zip(workers["off"].params, workers["default"].params):
            a.copy_(b)
    def chain(w):
        prompts, x_T, _, _ = w.draw_batch(1)
        cond = models.encode_prompts(w.c, prompts, "", w.cfg.model.resolution, "cpu")
        with torch.no_grad():
            return sampling.sample(models.make_denoiser(w.unet, cond, w.cfg.sampling.guidance_scale), w.schedule, x_T,
                                   methods.plan_inference(4)).latents

    compiled, eager = chain(workers["default"]), chain(workers["off"])
    with torch.no_grad():  # what a graph that kept the LoRA of its capture would give
        for a, b in zip(workers["off"].params, before):
            a.copy_(b)
    stale = chain(workers["off"])
    err = lambda y: float((compiled - y).abs().max() / y.abs().max())  # noqa: E731
    assert err(eager) < 1e-5 and err(stale) > 100 * err(eager), (err(eager), err(stale))
    assert counters["stats"]["unique_graphs"] == graphs  # the step and the chain reused the warm-up's graphs
