"""CUDA paths: bf16/fp16 frozen weights with fp32 LoRA parameters. Runs wherever a GPU is present."""

from pathlib import Path

import pytest
import torch

from rayreward import config

from helpers import make_worker

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
@pytest.mark.parametrize("precision,dtype", [("auto", torch.bfloat16), ("fp16", torch.float16)])
def test_cuda_half_precision_training_step(tmp_path, model, precision, dtype):
    cfg = config.load(ROOT / "experiments/tiny.yaml",
                      [f"output_dir={tmp_path}", f"model.name={model}", f"train.mixed_precision={precision}",
                       "train.steps=2", "train.use_gpu=true"])
    w = make_worker(cfg, "cuda")
    assert w.amp == dtype
    assert all(p.dtype == torch.float32 and p.is_cuda for p in w.params)
    assert next(w.c.vae.parameters()).dtype == dtype
    row = w.train_step(0)
    assert row["stepped"] == 1 and row["grad_norm"] > 0


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_offloaded_text_encoders_stay_on_the_cpu_while_the_step_runs_on_cuda(tmp_path, model):
    cfg = config.load(ROOT / "experiments/tiny.yaml",
                      [f"output_dir={tmp_path}", f"model.name={model}", "model.offload_text_encoders=true",
                       "train.steps=2", "train.use_gpu=true"])
    w = make_worker(cfg, "cuda")
    assert all(next(e.parameters()).device.type == "cpu" for e in w.c.text_encoders)
    assert next(w.c.denoiser.parameters()).is_cuda
    row = w.train_step(0)
    assert row["stepped"] == 1 and row["grad_norm"] > 0 and w.prompt_cache.calls == 1


def test_the_chain_has_no_per_step_host_device_sync(tmp_path):
    """torch's sync debug mode warns at each host-device synchronisation: after a warm-up chain (its
    one-off syncs: CUDA's lazy initialisation, first allocations), a chain of 8 steps must warn no
    more often than a chain of 4, i.e. no sync per step."""
    import warnings

    from rayreward import methods, models, sampling

    cfg = config.load(ROOT / "experiments/tiny.yaml", [f"output_dir={tmp_path}", "train.use_gpu=true"])
    w = make_worker(cfg, "cuda")
    prompts, x_T, _, _ = w.draw_batch(0)
    cond = models.encode_prompts(w.c, prompts, "", cfg.model.resolution, "cuda")
    denoise = models.make_denoiser(w.unet, cond, cfg.sampling.guidance_scale, w.amp)
    counts = {}
    for T in (2, 4, 8):  # T = 2 warms up
        schedule = sampling.Schedule.from_scheduler(w.c.scheduler, T).to("cuda")
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sampling.sample(denoise, schedule, x_T, methods.plan_inference(T))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[T] = sum("synchroniz" in str(c.message) for c in caught)
    assert counts[8] == counts[4], counts
