"""Seconds per training step, its split and peak memory, per method, at SD-1.5, SDXL, SD3.5-medium
and FLUX.1 shapes, beside the stock diffusers pipeline on the same model.

    python benchmarks/gpu.py --out docs/benchmarks/gpu.md      # on a GPU: sd15 at 512 px, sdxl at 1024 px
    python benchmarks/gpu.py --shapes sd15 --steps 10 --methods drtune draft_k --compile reduce-overhead
    python benchmarks/gpu.py --shapes sd35m flux1 --steps 25 --batch 1 --methods drtune --offload-text-encoders
    python benchmarks/gpu.py --shapes tiny --device cpu --steps 2 --repeats 1   # the same code, tiny (CI)
    python benchmarks/gpu.py --shapes tiny-sd3 tiny-flux --device cpu --steps 2 --repeats 1 --methods drtune

The pipelines are the real diffusers/transformers classes built in code from the published
SD-1.5, SDXL, SD3.5-medium (MMDiT 2.5 B, CLIP-L, CLIP-G, T5-XXL) and FLUX.1 [dev] (12 B, CLIP-L,
T5-XXL) architectures, with random weights (nothing is downloaded; on a GPU they are built there,
in the compute dtype); speed and memory do not depend on the weights' values. Per shape it prints:
- the stock pipeline (`StableDiffusionPipeline` / `StableDiffusionXLPipeline` / DDIM with CFG,
  `StableDiffusion3Pipeline` with CFG, `FluxPipeline` with its guidance embedding; the compute
  dtype, decode included) and rayreward's no-grad chain (`render.render`, the same work),
  eager and, with --compile, compiled; both without and with the LoRA adapter in the UNet;
- per method and T: s/step (median of --repeats after one warm-up step) split into sample /
  reward / backward, peak memory (torch.cuda.max_memory_allocated), and for DRTune the ratio of
  its step to the sum of its parts timed alone in the same run (no-grad UNet calls, checkpointed
  grad calls with their backward, VAE decode forward and backward, reward);
- the ratios that issue 11 sets goals for.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rayreward import config, methods, models, render, reports, runtime, sampling, serving, tiny, train

ALL_METHODS = list(methods.METHODS)
SHAPES = ("sd15", "sdxl", "sd35m", "flux1", "tiny", "tiny-sd3", "tiny-flux")
RESOLUTION = {"sd15": 512, "sdxl": 1024, "sd35m": 512, "flux1": 512, "tiny": 64, "tiny-sd3": 32, "tiny-flux": 32}
GUIDANCE = {"sd35m": 4.5, "tiny-sd3": 4.5, "flux1": 3.5, "tiny-flux": 3.5}  # the rest: 7.5 (SD's CFG)
FAMILY = {"sdxl": "sdxl", "sd35m": "sd3", "tiny-sd3": "sd3", "flux1": "flux", "tiny-flux": "flux"}  # the rest: sd


# ---------------------------------------------------------------------------------------------
# Real-shape pipelines, random weights.


def _text_config(hidden: int, layers: int, heads: int, intermediate: int, projection: int, tok, act="quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=intermediate, projection_dim=projection, hidden_act=act,
                          vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         scaling_factor=scaling_factor)


def _t5(tok):
    """T5-XXL's encoder (4.7 B): the text encoder of SD3 and FLUX.1."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                   feed_forward_proj="gated-gelu", vocab_size=32128, pad_token_id=tok.pad_token_id))


def _flow_vae(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
                         use_post_quant_conv=False)


def build_flow(shape: str, seed: int = 0):
    """The stock pipeline of a flow shape: "sd35m" (SD3.5 medium: MMDiT of 24 layers with dual
    attention in the first 13, CLIP-L, CLIP-G, T5-XXL), "flux1" (FLUX.1 [dev]: 19 double and 38
    single blocks, guidance embedding, CLIP-L, T5-XXL), or their tiny models."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if shape == "tiny-sd3":
        return tiny.build_sd3(seed)
    if shape == "tiny-flux":
        return tiny.build_flux(seed)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny.tokenizer(Path(tmp), max_length=77)
    clip_l = _text_config(768, 12, 12, 3072, 768, tok)
    if shape == "sd35m":
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_flow_vae(1.5305, 0.0609), text_encoder=CLIPTextModelWithProjection(clip_l), tokenizer=tok,
            text_encoder_2=CLIPTextModelWithProjection(_text_config(1280, 32, 20, 5120, 1280, tok, act="gelu")),
            tokenizer_2=tok, text_encoder_3=_t5(tok), tokenizer_3=tok)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_flow_vae(0.3611, 0.1159),
                        text_encoder=CLIPTextModel(clip_l), tokenizer=tok, text_encoder_2=_t5(tok), tokenizer_2=tok)


def build(shape: str, seed: int = 0, device="cpu", dtype=None):
    """(Components, stock pipeline) sharing the same modules, random-initialised from `seed`.
    Shape "sd15": UNet 860 M, CLIP ViT-L/14 text encoder (12 layers, 768), the SD VAE.
    Shape "sdxl": UNet 2.6 B, CLIP ViT-L and OpenCLIP ViT-bigG (32 layers, 1280) text encoders.
    The tokenizer is the tiny models' byte-level CLIPTokenizer padded to 77 tokens (the real
    vocabulary cannot be downloaded; its size does not change the compute)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    family = FAMILY.get(shape, "sd")
    if family in ("sd3", "flux"):
        # built where it will run, in its dtype: T5-XXL and FLUX.1 in fp32 on a CPU would take minutes
        with torch.device(device), _default_dtype(dtype if torch.device(device).type == "cuda" else None):
            pipe = build_flow(shape, seed)
        encoders = [pipe.text_encoder, pipe.text_encoder_2] + ([pipe.text_encoder_3] if family == "sd3" else [])
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2] + ([pipe.tokenizer_3] if family == "sd3" else [])
        for m in [pipe.transformer, pipe.vae, *encoders]:
            m.eval().requires_grad_(False)
        c = models.Components(pipe.transformer, pipe.vae, encoders, tokenizers, pipe.scheduler, family, f"random {shape}")
        c.stock = pipe
        return c, pipe
    if shape == "tiny":
        pipe = tiny.build_pipeline("sd", seed)
    else:
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory() as tmp:
            tok = tiny.tokenizer(Path(tmp), max_length=77)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
        if shape == "sd15":
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
            te = CLIPTextModel(_text_config(768, 12, 12, 3072, 768, tok))
            pipe = StableDiffusionPipeline(vae=_vae(0.18215), text_encoder=te, tokenizer=tok, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        elif shape == "sdxl":
            unet = UNet2DConditionModel(
                sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
            te1 = CLIPTextModel(_text_config(768, 12, 12, 3072, 768, tok))
            te2 = CLIPTextModelWithProjection(_text_config(1280, 32, 20, 5120, 1280, tok, act="gelu"))
            pipe = StableDiffusionXLPipeline(vae=_vae(0.13025), text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                             tokenizer_2=tok, unet=unet, scheduler=scheduler)
        else:
            raise SystemExit(f"--shapes: {shape!r} is unknown; allowed: {', '.join(SHAPES)}")
    flavour = "sdxl" if shape == "sdxl" else "sd"
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if flavour == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if flavour == "sdxl" else [])
    for m in [pipe.unet, pipe.vae, *encoders]:
        m.eval().requires_grad_(False)
    c = models.Components(pipe.unet, pipe.vae, encoders, tokenizers, pipe.scheduler, flavour, f"random {shape}",
                          force_zeros_for_empty_prompt=flavour == "sdxl")
    return c, pipe


@contextlib.contextmanager
def _default_dtype(dtype):
    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# ---------------------------------------------------------------------------------------------
# Timing.


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() over `repeats`, after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


@contextlib.contextmanager
def peak(device, into: dict):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    into["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def run_config(args, shape: str, method: str, T: int, compile_mode: str) -> config.Config:
    return config.from_dict({
        "sampling": {"num_steps": T, "guidance_scale": GUIDANCE.get(shape, 7.5)},
        "method": {"name": method, "k": args.k, "early_stop_m": max(1, int(0.4 * T)), "refl_window": [1, max(1, T // 4)]},
        "train": {"batch_size": args.batch, "compile": compile_mode, "mixed_precision": args.precision},
        "model": {"name": "tiny", "resolution": args.resolution or RESOLUTION[shape],
                  "offload_text_encoders": bool(getattr(args, "offload_text_encoders", False))},
        "lora": {"rank": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        "rewards": [{"name": "symmetry"}]})


def stock_seconds(pipe, args, shape: str, T: int, device) -> float:
    prompts = ["a photo of a cat"] * args.batch
    side = args.resolution or RESOLUTION[shape]

    def go():
        with torch.no_grad():
            pipe(prompt=prompts, num_inference_steps=T, guidance_scale=GUIDANCE.get(shape, 7.5), output_type="pt",
                 height=side, width=side,
                 generator=torch.Generator().manual_seed(0))

    pipe.set_progress_bar_config(disable=True)
    return timed(go, device, args.repeats)


def chain_seconds(c, unet, args, shape: str, T: int, device, amp) -> float:
    cfg = run_config(args, shape, "drtune", T, "off")
    prompts, seeds = ["a photo of a cat"], list(range(args.batch))
    return timed(lambda: render.render(c, prompts, seeds, cfg.sampling, cfg.model.resolution, device, amp, unet=unet),
                 device, args.repeats)


def drtune_parts(w: train.Worker, device, repeats: int) -> dict[str, float]:
    """The parts of one DRTune step, each timed alone: a no-grad UNet call, a grad-carrying call
    (checkpointed when the run checkpoints) with its backward, the VAE decode forward and
    backward, the reward and loss."""
    prompts, x_T, _, _ = w.draw_batch(0)
    cond = w.prompt_cache(prompts, w.cfg.sampling.negative_prompt, w.cfg.model.resolution)  # encoders may be offloaded
    denoise = models.make_denoiser(w.unet, cond, w.cfg.sampling.guidance_scale, w.amp)
    t = w.schedule.timesteps[0]

    ckpt = w.cfg.train.gradient_checkpointing

    def nograd():
        sampling.call_denoiser(denoise, x_T, t, False, ckpt)

    def grad():
        sampling.call_denoiser(denoise, x_T, t, True, ckpt).float().square().mean().backward()

    z = x_T.clone().requires_grad_(True)

    def vae():
        models.decode_latents(w.c, z).mean().backward()

    with torch.no_grad():
        images = models.decode_latents(w.c, x_T)

    def reward():
        im = images.clone().requires_grad_(True)
        loss, _, _ = w.score(im, prompts, 1)
        loss.backward()

    parts = {name: timed(fn, device, repeats) for name, fn in
             [("nograd_call", nograd), ("grad_call", grad), ("vae", vae), ("reward", reward)]}
    for p in w.params:
        p.grad = None
    return parts


def method_rows(c, args, shape: str, T: int, device, compile_mode: str) -> list[dict]:
    rows = []
    for method in args.methods if compile_mode == "off" else [m for m in args.methods if m in args.compile_methods]:
        cfg = run_config(args, shape, method, T, compile_mode)
        w = train.Worker(cfg, device, serving.LocalReward(cfg.rewards, cfg.loss, str(device)), components=c)
        row = {"shape": shape, "T": T, "method": method, "compile": compile_mode, "s_compile": w.warm_up()}
        w.train_step(0)  # warm-up
        steps = []
        with peak(device, row):
            for i in range(args.repeats):
                sync(device)
                steps.append(w.train_step(1 + i))
        for key in ("s_step", "s_sample", "s_reward", "s_backward", "trained_steps"):
            row[key] = statistics.median(r[key] for r in steps)
        if method == "drtune":
            parts = drtune_parts(w, device, args.repeats)
            trace = w.forward_backward(99)[2].trace
            for p in w.params:
                p.grad = None
            n_grad = sum(r.grad for r in trace)
            predicted = ((len(trace) - n_grad) * parts["nograd_call"] + n_grad * parts["grad_call"] + parts["vae"]
                         + parts["reward"])
            row.update(parts, predicted=predicted, step_over_parts=row["s_step"] / predicted)
        rows.append(row)
        print(f"  {shape} T={T:3d} {method:10s} compile={compile_mode:15s} {row['s_step']:.3f} s/step "
              f"(sample {row['s_sample']:.3f}, reward {row['s_reward']:.3f}, backward {row['s_backward']:.3f}), "
              f"peak {row['peak_GiB']:.2f} GiB" + (f", step/parts {row['step_over_parts']:.2f}" if "predicted" in row
                                                  else ""), file=sys.stderr, flush=True)
        c.denoiser.delete_adapters(["default"])  # the next method's Worker adds its own
        del w
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["sd15", "sdxl"], choices=SHAPES)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=0, help="default: 512 (sd15), 1024 (sdxl), 64 (tiny)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=config.PRECISIONS)
    ap.add_argument("--compile", default="off", choices=config.COMPILE_MODES,
                    help="also measure with this train.compile mode")
    ap.add_argument("--compile-methods", nargs="*", default=["drtune"], choices=ALL_METHODS,
                    help="the methods also timed compiled (each compiles anew); none: only the chain")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--offload-text-encoders", action="store_true",
                    help="training rows: the text encoders on the CPU (model.offload_text_encoders), after the stock "
                         "pipeline and the chain were timed with them on the device")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write the tables here (markdown)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    modes = ["off"] + ([args.compile] if args.compile != "off" else [])
    chains, steps = [], []
    for shape in args.shapes:
        t0 = time.perf_counter()
        amp = runtime.compute_dtype(args.precision, device)
        c, pipe = build(shape, device=device, dtype=amp)
        if amp is not None:
            pipe.to(amp)
        pipe.to(device)
        print(f"[gpu.py] built {shape} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for T in args.steps:
            row = {"shape": shape, "T": T, "stock": stock_seconds(pipe, args, shape, T, device)}
            row["chain"] = chain_seconds(c, c.denoiser, args, shape, T, device, amp)
            models.add_lora(c.denoiser, run_config(args, shape, "drtune", T, "off").lora)
            row["stock_lora"] = stock_seconds(pipe, args, shape, T, device)
            row["chain_lora"] = chain_seconds(c, c.denoiser, args, shape, T, device, amp)
            for mode in modes[1:]:
                compiled = models.compile_unet(c.denoiser, mode)
                t1 = time.perf_counter()
                chain_seconds(c, compiled, args, shape, T, device, amp)  # compiles
                row[f"s_compile_chain_{mode}"] = time.perf_counter() - t1
                row[f"chain_lora_{mode}"] = chain_seconds(c, compiled, args, shape, T, device, amp)
            c.denoiser.delete_adapters(["default"])
            chains.append(row)
            tables(args, argv, name, modes, chains, steps)
            if args.offload_text_encoders:  # the training rows without the text encoders on the device
                for e in c.text_encoders:
                    e.to("cpu", torch.float32)
            for mode in modes:
                steps += method_rows(c, args, shape, T, device, mode)
            if args.offload_text_encoders:
                for e in c.text_encoders:
                    e.to(device, amp)
            tables(args, argv, name, modes, chains, steps)  # after each T: a run cut short keeps its figures
        del c, pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()


def tables(args, argv, name: str, modes: list[str], chains: list[dict], steps: list[dict]) -> str:
    """The markdown tables of the rows so far, printed and written to --out."""
    import pandas as pd

    chain_df, step_df = pd.DataFrame(chains), pd.DataFrame(steps)
    chain_df["chain/stock"] = chain_df["chain_lora"] / chain_df["stock_lora"]
    for mode in modes[1:]:
        chain_df[f"compiled/stock ({mode})"] = chain_df[f"chain_lora_{mode}"] / chain_df["stock_lora"]
    device = torch.device(args.device)
    head = (f"device: {name}; torch {torch.__version__}; batch {args.batch}; guidance 7.5 (SD, SDXL: CFG, DDIM), 4.5 (SD3: CFG, Euler), 3.5 (FLUX: embedded, Euler); compute dtype "
            f"{runtime.compute_dtype(args.precision, device) or torch.float32}; LoRA rank 4 on to_q/to_k/to_v/to_out.0; "
            f"K = {args.k}; gradient checkpointing on; median of {args.repeats}")
    cols = [c for c in ["shape", "method", "T", "compile", "s_step", "s_sample", "s_reward", "s_backward",
                        "trained_steps", "peak_GiB", "step_over_parts", "s_compile"] if c in step_df]
    parts = [head, "No-grad chain against the stock pipeline, seconds (decode included):",
             reports.markdown(chain_df, ".3f", index=False)]
    if cols:
        parts += ["Training steps:", reports.markdown(step_df[cols], ".3f", index=False)]
    text = "\n\n".join(parts)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"# benchmarks/gpu.py\n\n`python benchmarks/gpu.py {' '.join(argv or sys.argv[1:])}`"
                                  f"\n\n{text}\n")
    return text


if __name__ == "__main__":
    main()
