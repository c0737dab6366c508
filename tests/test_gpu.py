"""CUDA paths: bf16/fp16 frozen weights with fp32 LoRA parameters. Runs wherever a GPU is present."""

from pathlib import Path

import pytest
import torch

from rayreward import config, train

from helpers import make_worker

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
@pytest.mark.parametrize("precision,dtype", [("auto", torch.bfloat16), ("fp16", torch.float16)])
def test_cuda_half_precision_training_step(tmp_path, model, precision, dtype):
    cfg = config.load(ROOT / "experiments/quickstart.yaml",
                      [f"output_dir={tmp_path}", f"model.name={model}", f"train.mixed_precision={precision}",
                       "train.steps=2", "train.use_gpu=true"])
    w = make_worker(cfg, "cuda")
    assert w.amp == dtype
    assert all(p.dtype == torch.float32 and p.is_cuda for p in w.params)
    assert next(w.c.vae.parameters()).dtype == dtype
    row = w.train_step(0)
    assert row["stepped"] == 1 and row["grad_norm"] > 0
