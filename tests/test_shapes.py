"""The shapes world (deterministic scenes whose captions say what is drawn) and its pretraining."""

import json
import subprocess
import sys

import numpy as np
import torch

from rayreward import models
from rayreward.config import ModelConfig
from rayreward.shapes import pretrain
from rayreward.shapes import world as shapes
from rayreward.shapes.config import PretrainConfig

from helpers import ROOT

# the shipped model read by the judge on 64 held-out captions x 2 seeds at T = 10: 92 % of the
# labels (every colour and background, 77-84 % of the kinds), 55 % of the pictures wholly
LABELS_READ, WHOLLY_READ = 0.85, 0.3


def test_a_scene_is_a_function_of_its_seed():
    assert shapes.scene(7) == shapes.scene(7) and shapes.scene(7) != shapes.scene(8)
    a, b = np.asarray(shapes.draw(shapes.scene(7))), np.asarray(shapes.draw(shapes.scene(7)))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert len({shapes.scene(s).caption for s in range(200)}) > 150  # varied


def test_captions_say_what_is_drawn():
    """At every shape's centre the pixel has the colour its caption names; a corner has the
    background's; the caption names as many shapes as are drawn, left to right, in their places."""
    counts = {1: 0, 2: 0, 3: 0}
    for seed in range(300):
        s = shapes.scene(seed)
        img = np.asarray(shapes.draw(s, 64)).astype(int)
        words = s.caption.replace(",", " ").split()
        counts[len(s.shapes)] += 1
        assert sum(w in shapes.KINDS for w in words) == len(s.shapes)
        named = [(w, words[i + 1]) for i, w in enumerate(words) if w in shapes.COLOURS]
        assert named == [(sh.colour, sh.kind) for sh in s.shapes], s.caption
        assert [shapes.PLACES[sh.place][0] for sh in s.shapes] == sorted(shapes.PLACES[sh.place][0] for sh in s.shapes)
        for sh in s.shapes:
            assert shapes.PLACES[sh.place][1] in s.caption
            x, y = shapes.centre(s, sh)
            px = img[int(y * 64), int(x * 64)]
            assert np.abs(px - shapes.COLOURS[sh.colour]).max() < 40, (seed, sh, px)
        corner = img[0, 0]
        want = (150, 150, 150) if s.background == "striped" else shapes.BACKGROUNDS[s.background]
        assert np.abs(corner - want).max() < 10, (seed, s.background, corner)
        assert f"on a {s.background} background" in s.caption
    assert all(n > 30 for n in counts.values()), counts


def test_unplaced_captions_leave_the_place_to_the_noise():
    """A quarter of the scenes are one unplaced shape: the caption names no place (and, half of
    those times, no size); the shape stands anywhere in the world's box, so across such scenes its
    centre spreads like a uniform draw (std 0.3 * 2 / sqrt(12) = 0.17 of the side in x)."""
    unplaced = [s for s in map(shapes.scene, range(2000)) if s.shapes[0].place == "anywhere"]
    assert 0.2 < len(unplaced) / 2000 < 0.3 and all(len(s.shapes) == 1 for s in unplaced)
    for s in unplaced:
        assert not any(words in s.caption for _, words in shapes.PLACES.values() if words), s.caption
        assert (shapes.SIZES.keys() & set(s.caption.split())) == ({s.shapes[0].size} if s.shapes[0].size_said else set())
    said = sum(s.shapes[0].size_said for s in unplaced) / len(unplaced)
    assert 0.4 < said < 0.6
    xs = np.array([shapes.centre(s, s.shapes[0])[0] for s in unplaced])
    assert abs(xs.std() - 0.6 / np.sqrt(12)) < 0.02 and 0.2 <= xs.min() and xs.max() <= 0.8
    # the placed scenes are those of the world before unplaced captions: the same shapes, places and offsets
    assert shapes.scene(3).caption == "a large purple triangle in the centre, on a black background"
    before = [shapes.scene(i, unplaced=False) for i in range(2000)]
    assert all(a == b for a, b in zip(before, map(shapes.scene, range(2000))) if a.shapes[0].place != "anywhere"
               and b.shapes[0].place != "anywhere")
    assert not any(s.shapes[0].place == "anywhere" for s in before)


def test_every_word_of_the_world_is_one_token(tmp_path):
    tok = shapes.tokenizer(tmp_path)
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in shapes.VOCABULARY)
    longest = max(len(tok(shapes.scene(s).caption).input_ids) for s in range(2000))
    assert longest <= tok.model_max_length, longest
    text = shapes.scene(0).caption
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text.replace(",", " ,")  # words, then commas


def test_held_out_prompts_come_from_seeds_pretraining_does_not_draw():
    held = shapes.prompts(5)
    assert held == [shapes.scene(shapes.HELD_OUT + i).caption for i in range(5)]
    # pretraining and the judge's training draw scene seeds far below the held-out ones
    assert pretrain.batch_seeds(10**6, 256, seed=10**6).stop < shapes.HELD_OUT


def test_pretraining_lowers_the_epsilon_loss_in_a_few_steps(tmp_path):
    """30 steps of the UNet objective lower the loss on a fixed held-out batch."""
    cfg = PretrainConfig(out=str(tmp_path / "m"), unet_steps=30, vae_steps=1, batch_size=8, lr=2e-3)
    pipe = pretrain.build_pipeline(0, tmp_path / "tok")
    x, captions = pretrain.batch(0, 16, seed=99)
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    t = torch.randint(0, 1000, (16,), generator=g)
    eps = torch.randn(z.shape, generator=g)
    abar = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)

    def held_out_loss():
        with torch.no_grad():
            pred = pipe.unet(abar.sqrt() * z + (1 - abar).sqrt() * eps, t,
                             encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        return float(torch.nn.functional.mse_loss(pred, eps))

    before = held_out_loss()
    log = []
    pretrain.train_unet(pipe, cfg, log)
    after = held_out_loss()
    assert after < 0.7 * before, (before, after)
    assert [r["phase"] for r in log] == ["unet"] * 30


def test_worker_processes_draw_the_same_batches_in_the_same_order(tmp_path):
    tok = shapes.tokenizer(tmp_path / "tok")
    here = list(pretrain.batches(3, 4, seed=5, workers=0, tok=tok))
    there = list(pretrain.batches(3, 4, seed=5, workers=2, tok=tok))
    assert [c for _, c, _ in here] == [c for _, c, _ in there]
    assert all(torch.equal(a, b) and torch.equal(i, j) for (a, _, i), (b, _, j) in zip(here, there))
    assert here[0][2].shape == (4, tok.model_max_length)


def test_a_pretrained_folder_loads_like_any_diffusers_model(tmp_path):
    out = tmp_path / "shapes-model"
    pretrain.run(PretrainConfig(out=str(out), unet_steps=2, vae_steps=2, batch_size=4, workers=1))
    info = json.loads((out / "pretrain.json").read_text())
    assert info["config"]["unet_steps"] == 2 and info["seconds"] > 0
    assert all((out / f).is_file() for f in ("loss_curve.png", "samples.png", "vae_reconstruction.png"))
    c = models.load_components(ModelConfig(name=str(out), resolution=64))
    assert c.flavour == "sd" and c.vae_scale_factor == 4 and c.unet.config.sample_size == 16
    # stored in fp16 (half the bytes to ship), trained and loaded in fp32
    from safetensors import safe_open
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    assert all(p.dtype == torch.float32 for m in (c.unet, c.vae, *c.text_encoders) for p in m.parameters())
    assert c.vae.config.scaling_factor != 0.18215  # measured from the trained VAE's latents
    cond = models.encode_prompts(c, ["a red circle in the centre, on a black background"], "", 64, "cpu")
    assert cond.embeds.shape == (1, 32, 64)
    # a second run reuses the first one's VAE and trains only the UNet
    again = tmp_path / "again"
    pretrain.run(PretrainConfig(out=str(again), unet_steps=1, vae_steps=99, batch_size=2, vae_from=str(out)))
    assert json.loads((again / "pretrain.json").read_text())["vae_l1_end"] is None
    a, b = (models.load_components(ModelConfig(name=str(f), resolution=64)).vae.state_dict() for f in (out, again))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # --init-from: a fine-tune of the first model (its UNet, text encoder and VAE), recorded as such
    tuned = tmp_path / "tuned"
    pretrain.run(PretrainConfig(out=str(tuned), unet_steps=1, batch_size=2, lr=1e-9, init_from=str(out)))
    rec = json.loads((tuned / "pretrain.json").read_text())
    assert rec["vae_l1_end"] is None and rec["init_from"]["config"]["unet_steps"] == 2
    first, second = (models.load_components(ModelConfig(name=str(f), resolution=64)) for f in (out, tuned))
    a, b = first.vae.state_dict(), second.vae.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = first.unet.state_dict(), second.unet.state_dict()  # lr 1e-9: one step moves a weight by ~1e-9
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)


def test_pretrain_cli_refuses_bad_settings_and_a_used_folder(tmp_path):
    def cli(*a):
        return subprocess.run([sys.executable, "-m", "rayreward.cli", "pretrain", *a], capture_output=True, text=True)

    r = cli("--out", str(tmp_path / "m"), "--unet-steps", "0", "--lr", "-1", "--workers", "-1",
            "--vae-from", str(tmp_path / "nowhere"))
    assert r.returncode == 2
    assert "--unet-steps: 0 is not allowed; need an integer >= 1" in r.stderr and "--lr: -1.0 is not allowed" in r.stderr
    assert "--workers: -1 is not allowed; need an integer >= 0" in r.stderr
    assert f"--vae-from: {str(tmp_path / 'nowhere')!r} holds no VAE" in r.stderr
    r = cli("--out", str(tmp_path / "m"), "--init-from", str(tmp_path), "--vae-from", str(tmp_path))
    assert r.returncode == 2 and f"--init-from: {str(tmp_path)!r} is not a pretrained model folder" in r.stderr
    assert "--init-from and --vae-from: give one" in r.stderr
    assert not (tmp_path / "m").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    r = cli("--out", str(used))
    assert r.returncode == 2 and "--out: " in r.stderr and "is not empty" in r.stderr
    assert (used / "keep.txt").read_text() == "mine"


def test_the_shipped_prompt_sets_are_captions_of_known_seeds():
    """builtin:shapes (training, seeds 0..31) and builtin:shapes_heldout (from shapes.HELD_OUT), of
    the world without unplaced shapes; builtin:shapes_unplaced and _heldout, only unplaced ones."""
    from rayreward import config

    # the world the `shapes` model knows: every caption places its shapes
    assert config.read_prompts("builtin:shapes", "prompt_file") == shapes.prompts(32, start=0, unplaced=False)
    held = config.read_prompts("builtin:shapes_heldout", "prompt_file")
    assert held == shapes.prompts(24, unplaced=False) and not set(held) & set(shapes.prompts(32, 0, unplaced=False))
    assert all(shapes.parse(p).caption == p for p in held)
    # the layout study's sets: unplaced captions, distinct, from the same two seed ranges
    train = config.read_prompts("builtin:shapes_unplaced", "prompt_file")
    held = config.read_prompts("builtin:shapes_unplaced_heldout", "prompt_file")
    assert train == shapes.unplaced_prompts(32, start=0) and held == shapes.unplaced_prompts(24, exclude=train)
    assert len(set(train)) == 32 and len(set(held)) == 24 and not set(train) & set(held)
    assert all(shapes.parse(p).shapes[0].place == "anywhere" for p in train + held)


def test_the_builtin_shapes_model_loads_offline_and_follows_its_captions():
    """model.name: shapes is the shipped pipeline (the real classes, fp16 files loaded as fp32); its
    pictures of held-out captions are read back by the judge."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from rayreward import models, render
    from rayreward.shapes import judge
    from rayreward.config import ModelConfig, SamplingConfig

    c = models.load_components(ModelConfig(name="shapes"))
    assert isinstance(c.unet, UNet2DConditionModel) and isinstance(c.vae, AutoencoderKL)
    assert isinstance(c.text_encoders[0], CLIPTextModel) and c.flavour == "sd" and c.unet.dtype == torch.float32
    prompts = shapes.prompts(16)
    x = render.render(c, prompts, [0], SamplingConfig(num_steps=10, guidance_scale=4.0), 64, "cpu")
    labels, whole = judge.agreement(judge.load(), x, prompts)
    assert labels.mean() > LABELS_READ and whole.mean() > WHOLLY_READ, (labels.mean(), whole.mean())


def test_the_layout_measurement_runs_and_finds_the_shape_where_its_caption_puts_it(tmp_path):
    """experiments/shapes/layout.py on the shipped models, shortened: a shape "on the left" has its
    centre of mass on the left, and x0_hat's centre converges to the final one along the chain."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("layout", ROOT / "experiments/shapes/layout.py")
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    info = layout.main(["--steps", "6", "--seeds", "3", "--captions", "a large red circle on the left, on a white "
                        "background", "--out", str(tmp_path)])
    row = info["rows"][0]
    assert row["centre_mean"][0] < 0.4 and abs(row["centre_mean"][1] - 0.5) < 0.1
    assert row["distance_to_final"][-1] == 0 and row["distance_to_final"][0] > row["distance_to_final"][-2]
    assert (tmp_path / "layout.png").is_file() and (tmp_path / "centres.png").is_file()
    # a caption without a place: shapes-layout puts the shape where the noise says (x spreads
    # 0.11-0.21 of the side across 16 seeds at T = 20; the training data's own spread is 0.17),
    # `shapes` puts it on the left every time (0.04: the jitter of "on the left")
    unplaced = ["--steps", "8", "--seeds", "8", "--captions", "a large yellow star, on a black background"]
    rows = {m: layout.main(["--model", m, *unplaced])["rows"][0] for m in ("shapes-layout", "shapes")}
    assert rows["shapes-layout"]["spread_x"] > 0.1 and rows["shapes"]["spread_x"] < 0.06, rows
    assert rows["shapes"]["data_spread_x"] > 0.15
