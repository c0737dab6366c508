"""Pretraining a small text-to-image model on the shapes world (`rayreward pretrain`).

An SD-1.x pipeline of the real classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer, DDIMScheduler), small enough to train on a CPU, trained in two phases:

1. the VAE (64 px <-> 4 x 16 x 16 latents) as an autoencoder on shapes images, on the posterior
   mean: an L1 weighted toward the shapes (`shape_weight`) plus a tiny KL; it is saved as soon as
   this phase ends, and `--vae-from` starts another run from it;
2. the UNet and the text encoder together, with the VAE frozen: the standard epsilon objective
   (DDPM noise, scaled-linear betas as in SD), the caption dropped 10 % of the time so that
   classifier-free guidance works.

`--placed-only` draws the world without unplaced shapes (every caption says where its shapes
stand), the world the built-in `shapes` model was trained on. `--init-from DIR` starts phase 2 from an earlier model (its UNet, text encoder and VAE) instead of
random weights: how the built-in `shapes-layout` model learnt the unplaced captions, from
`shapes`, without training from scratch again. Its pretrain.json then holds the earlier run's under "init_from".

Every batch is drawn fresh from the world (seed = step * batch + i), so there is no dataset on
disk and no epoch; `--workers N` draws batches in N processes ahead of the trainer (on a GPU the
drawing, not the model, is the bottleneck otherwise), with the same batches in the same order. The
result is a normal diffusers folder (weights stored in fp16, loaded as fp32), with `pretrain.json`
(the command's settings, seed, time and losses), `loss_curve.png` and `samples.png` (held-out
captions, four seeds each).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from rayreward import files
from rayreward.errors import RunError
from rayreward.shapes import world as shapes
from rayreward.shapes.config import PretrainConfig, vae_folder

SIDE = 64  # image side, px


def build_pipeline(seed: int, tokenizer_dir: Path):
    """The untrained pipeline: real classes, random weights from `seed`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = shapes.tokenizer(tokenizer_dir)
        te = CLIPTextModel(CLIPTextConfig(
            hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tok),
            max_position_embeddings=tok.model_max_length, projection_dim=64, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        vae = AutoencoderKL(block_out_channels=(32, 64, 64), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                            layers_per_block=1, norm_num_groups=16, sample_size=SIDE)
        unet = UNet2DConditionModel(
            sample_size=SIDE // 4, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def batch_seeds(step: int, size: int, seed: int) -> range:
    """The scene seeds of a batch: far below `shapes.HELD_OUT` for any seed in use."""
    base = seed * 1_000_003 + step * size
    return range(base, base + size)


def batch(step: int, size: int, seed: int, unplaced: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] (size, 3, 64, 64) and their captions, from scene seeds of this step
    (`unplaced=False`: the world without unplaced shapes)."""
    x, scenes = scene_batch(step, size, seed, unplaced)
    return x, [s.caption for s in scenes]


def scene_batch(step: int, size: int, seed: int, unplaced: bool = True) -> tuple[torch.Tensor, list]:
    """`batch` with the scenes themselves (where each shape stands) instead of their captions."""
    scenes = [shapes.scene(i, unplaced=unplaced) for i in batch_seeds(step, size, seed)]
    return images(scenes), scenes


def images(scenes) -> torch.Tensor:
    """The scenes drawn, in [-1, 1], (len(scenes), 3, 64, 64)."""
    import numpy as np

    arr = np.stack([np.asarray(shapes.draw(s, SIDE), dtype=np.float32) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


class _Batches(torch.utils.data.Dataset):
    """Batch `i` of a phase: images, scenes, and the captions' token ids when given a tokenizer,
    so that a DataLoader's worker processes can draw and tokenize them ahead."""

    def __init__(self, steps: int, size: int, seed: int, tok=None, unplaced: bool = True):
        self.steps, self.size, self.seed, self.tok, self.unplaced = steps, size, seed, tok, unplaced

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        x, scenes = scene_batch(step, self.size, self.seed, self.unplaced)
        return x, scenes, None if self.tok is None else token_ids(self.tok, [s.caption for s in scenes])


def token_ids(tok, captions: list[str]) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def batches(steps: int, size: int, seed: int, workers: int, tok=None, unplaced: bool = True):
    """The phase's (images, scenes, token ids or None) in step order: drawn here, or by
    `workers` processes (the same batches)."""
    data = _Batches(steps, size, seed, tok, unplaced)
    if workers < 1:
        return (data[step] for step in range(steps))
    return iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers, prefetch_factor=4,
                                            collate_fn=lambda b: b))


def progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=2.0, file=sys.stderr)


def _autocast(device: str):
    """bf16 autocast on a GPU (fp32 weights and optimizer); plain fp32 on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def shape_weight(x: torch.Tensor, boost: float = 10.0) -> torch.Tensor:
    """Per-pixel weight of the VAE's L1: 1 on the background, up to 1 + boost on a shape. Every
    background of the world is grey and every shape colour saturated, so saturation (max - min
    over RGB) finds the shapes. Unweighted, the background (over 90 % of the pixels) dominates the
    loss and a small VAE learns it first, reconstructing every shape as a blur of the mean colour."""
    return 1 + boost * (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 2


def train_vae(vae, cfg: PretrainConfig, log: list[dict]) -> None:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    with progress(cfg.vae_steps, "vae") as bar:
        for step, (x, _, _) in enumerate(batches(cfg.vae_steps, cfg.batch_size, cfg.seed + 1, cfg.workers,
                                                                 unplaced=not cfg.placed_only)):
            x = x.to(cfg.device)
            with _autocast(cfg.device):
                post = vae.encode(x).latent_dist
                rec = vae.decode(post.mean).sample
            kl = post.kl().mean() / x[0].numel()
            err = (rec.float() - x).abs()
            l1 = err.mean()
            w = shape_weight(x)
            loss = (err * w).sum() / (w.sum() * x.shape[1]) + 1e-4 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.append({"phase": "vae", "step": step, "loss": float(l1.detach())})
            bar.set_postfix(l1=f"{log[-1]['loss']:.4f}")
            bar.update()
    vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_scale(vae, cfg: PretrainConfig) -> float:
    """1 / std of the latents, as SD's scaling_factor: the UNet then sees unit-variance latents."""
    x, _ = batch(0, 256, cfg.seed + 2, not cfg.placed_only)
    return float(1 / vae.encode(x.to(cfg.device)).latent_dist.mean.std())


def train_unet(pipe, cfg: PretrainConfig, log: list[dict]) -> None:
    from diffusers import DDPMScheduler

    unet, te, tok, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    abar = noise_sched.alphas_cumprod
    unet.train().requires_grad_(True)
    te.train().requires_grad_(True)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.unet_steps))))
    g = torch.Generator().manual_seed(cfg.seed + 3)
    scale = vae.config.scaling_factor
    empty = token_ids(tok, [""])
    with progress(cfg.unet_steps, "unet") as bar:
        for step, (x, _, ids) in enumerate(batches(cfg.unet_steps, cfg.batch_size, cfg.seed, cfg.workers, tok,
                                                                   not cfg.placed_only)):
            drop = torch.rand(len(ids), generator=g) < 0.1
            ids = torch.where(drop[:, None], empty, ids).to(cfg.device)
            with torch.no_grad():
                post = vae.encode(x.to(cfg.device)).latent_dist
                z = post.mean * scale
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (x.shape[0],), generator=g)
            eps = torch.randn(z.shape, generator=g).to(cfg.device)
            a = abar[t].view(-1, 1, 1, 1).to(cfg.device)
            t = t.to(cfg.device)
            z_t = a.sqrt() * z + (1 - a).sqrt() * eps
            with _autocast(cfg.device):
                pred = unet(z_t, t, encoder_hidden_states=te(ids)[0]).sample
            loss = F.mse_loss(pred.float(), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            log.append({"phase": "unet", "step": step, "loss": float(loss.detach())})
            if step % 10 == 0:
                recent = [r["loss"] for r in log[-100:] if r["phase"] == "unet"]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            bar.update()
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)


def _plot(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, phase, label in zip(axes, ("vae", "unet"), ("VAE L1", "UNet epsilon MSE")):
        ys = [r["loss"] for r in log if r["phase"] == phase]
        k = max(1, len(ys) // 100)
        smooth = [sum(ys[i:i + k]) / len(ys[i:i + k]) for i in range(0, len(ys), k)]
        ax.plot([i * k for i in range(len(smooth))], smooth)
        ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("step")
    fig.tight_layout()
    with files.written(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def load_model(folder: str | Path, tokenizer_dir: Path):
    """A pretrained shapes pipeline in fp32, its tokenizer rebuilt from today's vocabulary (the
    saved one must agree: a model whose words differ is refused)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    tok = shapes.tokenizer(tokenizer_dir)
    if tok.get_vocab() != pipe.tokenizer.get_vocab():
        raise RunError(f"--init-from: {str(folder)!r} has a tokenizer of other words than the shapes world's "
                       "(made by another version of the world); start from random weights instead")
    pipe.tokenizer = tok
    return pipe


def load_vae(folder: str | Path):
    """The VAE of a pretrained shapes folder (or a VAE folder itself), in fp32."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_folder(folder), torch_dtype=torch.float32).eval().requires_grad_(False)


@torch.no_grad()
def reconstructions(vae, path: Path, device: str, count: int = 8) -> Path:
    """Held-out drawings (top row) and the VAE's reconstructions of them (bottom row): what the
    UNet can at best draw."""
    from rayreward import render

    x = images([shapes.scene(shapes.HELD_OUT + i) for i in range(count)])
    rec = vae.decode(vae.encode(x.to(device)).latent_dist.mean).sample.float().cpu()
    return render.save_grid(torch.cat([x, rec]).add(1).div(2), ["drawn", "VAE"], list(range(count)), path)


@torch.no_grad()
def samples(pipe, path: Path, device: str, count: int = 8, seeds: tuple[int, ...] = (0, 1, 2, 3)) -> Path:
    """A grid of the pipeline's pictures for `count` held-out captions (rows) and `seeds`
    (columns): DDIM 25 steps, guidance 4."""
    from rayreward import render

    caps = shapes.prompts(count)
    pipe.set_progress_bar_config(disable=True)
    images = torch.cat([pipe(prompt=[c] * len(seeds), num_inference_steps=25, guidance_scale=4.0, output_type="pt",
                             generator=[torch.Generator(device).manual_seed(s) for s in seeds]).images.cpu()
                        for c in caps])
    return render.save_grid(images, caps, seeds, path)


def require_finite(parts: dict[str, torch.nn.Module], out: Path) -> None:
    """Refuse to save a model with a NaN or inf weight (a learning rate too high diverged): a
    RunError naming the part and what was kept."""
    for name, module in parts.items():
        bad = sum(int((~torch.isfinite(p)).sum()) for p in module.parameters())
        if bad:
            raise RunError(f"pretrain: the {name} has {bad:,} non-finite weights after training (the loss diverged: "
                           f"lower --lr); nothing of it was saved to {str(out)!r}")


def run(cfg: PretrainConfig) -> Path:
    """Pretrain and save; returns the folder."""
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    log: list[dict] = []
    torch.manual_seed(cfg.seed)
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(cfg.seed, Path(tmp) / "tokenizer")
        if cfg.init_from:
            pipe = load_model(cfg.init_from, Path(tmp) / "tokenizer")
        if cfg.vae_from:
            pipe.vae = load_vae(cfg.vae_from)
        pipe.to(cfg.device)
        out.mkdir(parents=True, exist_ok=True)
        if not (cfg.vae_from or cfg.init_from):
            train_vae(pipe.vae, cfg, log)
            pipe.vae.register_to_config(scaling_factor=latent_scale(pipe.vae, cfg))
            require_finite({"vae": pipe.vae}, out)
            pipe.vae.to("cpu", torch.float16).save_pretrained(out / "vae")  # kept if the UNet phase is cut short
            pipe.vae.to(cfg.device, torch.float32)
        reconstructions(pipe.vae, out / "vae_reconstruction.png", cfg.device)
        t_vae = time.time() - t0
        train_unet(pipe, cfg, log)
        seconds = time.time() - t0
        require_finite({"unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae": pipe.vae}, out)
        samples(pipe, out / "samples.png", cfg.device)
        pipe.to("cpu", torch.float16).save_pretrained(out)

    def ends(phase: str) -> tuple[float | None, float | None]:
        """Mean loss of the first and of the last fifth of a phase (at most 100 steps each)."""
        ys = [r["loss"] for r in log if r["phase"] == phase]
        if not ys:
            return None, None
        k = max(1, min(100, len(ys) // 5))
        return sum(ys[:k]) / k, sum(ys[-k:]) / k

    (vae_start, vae_end), (unet_start, unet_end) = ends("vae"), ends("unet")
    info = {"config": asdict(cfg), "seconds": round(seconds, 1), "vae_seconds": round(t_vae, 1),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "vae_l1_start": vae_start, "vae_l1_end": vae_end, "unet_loss_start": unet_start, "unet_loss_end": unet_end}
    if cfg.init_from:
        before = Path(cfg.init_from) / "pretrain.json"
        info["init_from"] = json.loads(before.read_text()) if before.is_file() else None
    files.write_text(out / "pretrain.json", json.dumps(info, indent=1))
    _plot(log, out / "loss_curve.png")
    print(f"[rayreward] pretrained {out} in {seconds / 60:.1f} min (UNet loss {unet_start:.4f} -> {unet_end:.4f}, "
          "first and last fifth of its steps)", flush=True)
    return out
