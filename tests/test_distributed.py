"""Data parallelism, remote rewards and fault tolerance on a local multi-process Ray (CPU, gloo)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rayreward import config, driver, lora_io, models, runfolder, runtime, serving, train

from helpers import quick_cfg, rows


@pytest.mark.parametrize("method", [
    # K = 1 with an early stop: steps 0 and 5 train nothing (no worker may step the optimizer)
    ["method.name=drtune", "method.k=1", "method.early_stop_m=4"],
    ["method.name=draft_lv"],  # the re-noised copies, drawn per sample
    # a flow-matching chain (an ODE: no step noise), DRTune with its sg(x_t)
    ["model.name=tiny-sd3", "sampling.eta=0", "method.name=drtune", "method.k=2", "method.early_stop_m=2"],
], ids=["drtune_empty_steps", "draft_lv", "sd3_drtune"])
def test_two_workers_stay_in_sync_and_equal_one_worker_on_the_union(tmp_path, ray_session, method):
    # AdamW's first update is ~lr * sign(g): a gradient at float-noise level (1e-10) could flip
    # sign between the two summation orders; eps=1e-6 keeps such noise from being amplified.
    # eta = 0.5: every step draws noise, per global sample.
    steps = ["train.steps=6", "train.checkpoint_every=3", "optim.eps=1e-6", "sampling.eta=0.5", *method]
    two = quick_cfg(tmp_path / "two", "train.num_workers=2", "train.batch_size=2", *steps)
    result = driver.fit(two)
    assert result.error is None
    log = rows(tmp_path / "two/metrics.csv")
    assert [float(r["lora_divergence"]) for r in log if r["lora_divergence"]] == [0.0, 0.0]  # both workers alike

    one = quick_cfg(tmp_path / "one", "train.num_workers=1", "train.batch_size=4", *steps)
    train.run_training(one)  # one worker, the union of both workers' batches
    a = load_file(tmp_path / "two/lora" / lora_io.LORA_WEIGHT_NAME)
    b = load_file(tmp_path / "one/lora" / lora_io.LORA_WEIGHT_NAME)
    assert a.keys() == b.keys()
    moved = max(float(v.abs().max()) for k, v in b.items() if "lora_B" in k)
    assert moved > 1e-3  # training did change the LoRA
    # a step's update is ~lr = 1e-2 per weight (AdamW), and a wrong momentum-only step ~2/3 of
    # that; summation order between 1 and 2 workers leaves float noise that AdamW amplifies
    # (measured up to 6.3e-5 after 6 steps), so 2e-4 (2 % of one update) separates the two
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"largest LoRA difference, 2 workers vs 1: {worst:.2e}")
    assert worst < 2e-4, worst
    one_log = rows(tmp_path / "one/metrics.csv")
    for r1, r2 in zip(log, one_log):
        assert float(r1["reward_mean"]) == pytest.approx(float(r2["reward_mean"]), abs=1e-5)
        assert r1["stepped"] == r2["stepped"]
    if "method.k=1" in method:  # the case this parametrisation is for: an empty step after trained ones
        assert any(r["stepped"] == "0" and float(r["trained_steps"]) == 0 for r in log[1:]), log


def test_remote_reward_gives_the_same_loss_and_gradient(tmp_path, ray_session):
    """Same batch, in-process vs a reward actor: equal loss and LoRA gradient (rtol 1e-5)."""
    cfg = quick_cfg(tmp_path, "rewards=[{name: symmetry, weight: 1.0}, {name: brightness, weight: 0.5}]",
                  "loss.kind=hinge", "loss.margin=1.0", "reward_server.mode=remote", "reward_server.replicas=2")
    actors = serving.start_reward_actors(cfg)
    try:
        local = train.Worker(cfg, torch.device("cpu"), serving.LocalReward(cfg.rewards, cfg.loss, "cpu"))
        remote = train.Worker(cfg, torch.device("cpu"), serving.RemoteReward(actors))
        s_local, _, _ = local.forward_backward(0)
        s_remote, _, _ = remote.forward_backward(0)
        assert torch.allclose(s_local.pack(), s_remote.pack(), rtol=1e-5, atol=1e-7)  # loss, reward, components
        g_local = torch.cat([p.grad.flatten() for p in local.params])
        g_remote = torch.cat([p.grad.flatten() for p in remote.params])
        assert g_local.abs().max() > 0
        assert torch.allclose(g_local, g_remote, rtol=1e-5, atol=1e-9)
    finally:
        for a in actors:
            ray_session.kill(a)


def test_a_killed_worker_resumes_from_its_last_checkpoint(tmp_path, ray_session, monkeypatch):
    monkeypatch.setenv(runtime.FAULT_STEP_ENV, "3")  # worker 0 exits at step 3 (a test hook, not config)
    cfg = quick_cfg(tmp_path, "train.steps=6", "train.checkpoint_every=2", "train.batch_size=2",
                  "train.max_failures=1")
    result = driver.fit(cfg)
    assert result.error is None
    assert (tmp_path / ".fault-injected-at-step-3").exists()  # the worker did die
    assert [int(r["step"]) for r in rows(tmp_path / "metrics.csv")] == [0, 1, 2, 3, 4, 5]
    assert runfolder.read_checkpoint(result.checkpoint.path).step == 6


def test_a_killed_reward_actor_is_restarted_and_training_finishes(tmp_path, ray_session, monkeypatch):
    monkeypatch.setenv(runtime.FAULT_REWARD_CALLS_ENV, "2")  # reward actor 0 exits after 2 calls
    cfg = quick_cfg(tmp_path, "train.steps=4", "train.batch_size=2", "reward_server.mode=remote")
    result = driver.fit(cfg)
    assert result.error is None
    assert [int(r["step"]) for r in rows(tmp_path / "metrics.csv")] == [0, 1, 2, 3]
    (state,) = json.loads((tmp_path / "reward_servers.json").read_text())
    assert state["restarted"] is True  # it died after 2 calls, came back, served the rest


def test_remote_mode_rejects_unplaceable_reward_servers_at_validation():
    with pytest.raises(config.ConfigError, match="reward_server.replicas: 0 is not allowed"):
        config.from_dict({}, ["reward_server.mode=remote", "reward_server.replicas=0"])
    with pytest.raises(config.ConfigError, match="reward_server.mode: 'grpc' is unknown; allowed: local, remote"):
        config.from_dict({}, ["reward_server.mode=grpc"])
    with pytest.raises(config.ConfigError, match="reward_server.resources"):
        config.from_dict({}, ["reward_server.resources={reward_host: -1}"])


def test_a_worker_and_a_reward_actor_share_one_gpu(ray_session):
    """train.gpus_per_worker 0.5 + reward_server.num_gpus 0.5 fit a one-GPU cluster: checked, and
    placed for real as the run's bundles on the session's Ray (one logical GPU). Without the
    share, the same run is refused before anything starts."""
    shared = ["train.use_gpu=true", "reward_server.mode=remote", "reward_server.num_gpus=0.5", "train.start_timeout_s=20"]
    cfg = config.from_dict({}, shared + ["train.gpus_per_worker=0.5"])
    assert runtime.worker_resources(cfg) == {"CPU": 1.0, "GPU": 0.5}
    assert runtime.resources_needed(cfg) == {"CPU": 2.0, "GPU": 1.0}
    assert ray_session.cluster_resources()["GPU"] == 1
    runtime.check_resources(cfg, ray_session.cluster_resources(), fixed=True)
    runtime.wait_for_resources(cfg)  # raises ClusterError when Ray cannot place the bundles
    whole = config.from_dict({}, shared)
    with pytest.raises(config.ConfigError, match="GPU: needs 1.5, the cluster has 1.*train.gpus_per_worker"):
        runtime.check_resources(whole, ray_session.cluster_resources(), fixed=True)
    with pytest.raises(runtime.ClusterError, match="within train.start_timeout_s"):
        runtime.wait_for_resources(config.from_dict({}, shared + ["train.start_timeout_s=2"]))
    with pytest.raises(config.ConfigError, match=r"train.gpus_per_worker: 1.5 is not allowed; need a GPU share in \(0, 1\]"):
        config.from_dict({}, ["train.gpus_per_worker=1.5"])


def test_fault_injection_is_not_a_config_setting_any_more():
    """An older run's saved config.yaml holds the retired keys as null: it still loads."""
    cfg = config.from_dict({"train": {"fail_at_step": None}, "reward_server": {"fail_after_calls": None}})
    assert not hasattr(cfg.train, "fail_at_step") and not hasattr(cfg.reward_server, "fail_after_calls")
    with pytest.raises(config.ConfigError, match="train.fail_at_step: this setting was removed; .*RAYREWARD_FAULT_STEP"):
        config.from_dict({}, ["train.fail_at_step=3"])


def test_more_resources_than_a_fixed_cluster_has_is_a_clear_error():
    cfg = config.from_dict({}, ["train.num_workers=3", "reward_server.mode=remote", "reward_server.num_gpus=1",
                                "reward_server.resources={reward_host: 1}"])
    assert runtime.resources_needed(cfg) == {"CPU": 4.0, "GPU": 1.0, "reward_host": 1.0}
    with pytest.raises(config.ConfigError) as e:
        runtime.check_resources(cfg, {"CPU": 2.0}, fixed=True)
    msg = str(e.value)
    assert "CPU: needs 4, the cluster has 2" in msg and "GPU: needs 1, the cluster has 0" in msg
    assert "reward_host: needs 1, the cluster has 0" in msg
    runtime.check_resources(cfg, {"CPU": 2.0}, fixed=False)  # an autoscaling cluster: a warning only
    runtime.check_resources(cfg, {"CPU": 8.0, "GPU": 1.0, "reward_host": 1.0}, fixed=True)
