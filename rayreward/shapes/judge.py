"""The shapes world's judge: a small CNN that reads a picture back into what a caption says.

A caption of the world names, for each of three columns (left, middle, right), the kind and the
colour of the shape standing there, or nothing, and the background. A single shape "in the
centre" stands in the middle column; an unplaced one (a caption without a place) in the column its
centre falls in (thirds of the side, edges at 0.375 and 0.625 so that each column is as wide as a
placed shape's jitter around it allows). The judge predicts these seven labels from a picture:

    slot kinds    3 x (none, circle, square, triangle, star)
    slot colours  3 x (none, red, green, blue, yellow, purple, orange)
    background    (black, white, gray, striped)

It is trained on drawn pictures (`shapes.draw`), blurred, noised and shifted in colour at random
so that it also reads a small diffusion model's softer output. Two uses:

- `alignment(...)`: the mean log-probability of the caption's labels, differentiable in the
  image; the `shapes_alignment` reward. An unplaced caption is read in whichever column holds
  the shape: the labels' joint probability is summed over the three ways to place it. Hacking a symmetry reward (the picture stops showing what
  the prompt asks) shows as this number falling.
- `agreement(...)`: how many of the caption's labels the judge's argmax reads, per picture (0 to
  1), and whether all of them are read; what the evaluation reports.

The judge is saved as `judge.safetensors` plus `judge.json` (its settings and how it was made);
the built-in one lives in the package (`rayreward/assets/shapes-judge`). `rayreward pretrain
--part judge` makes one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rayreward import files
from rayreward.shapes import world as shapes

SLOTS = ("left", "middle", "right")
SLOT_OF = {"left": 0, "middle": 1, "centre": 1, "right": 2}
KIND_CLASSES = ("none",) + shapes.KINDS
COLOUR_CLASSES = ("none",) + tuple(shapes.COLOURS)
BACKGROUND_CLASSES = tuple(shapes.BACKGROUNDS)
N_LABELS = 2 * len(SLOTS) + 1
BUILTIN = Path(__file__).parent.parent / "assets" / "shapes-judge"


def slot(scene: shapes.Scene, sh: shapes.Shape) -> int:
    """The column a shape stands in: its place's, or for an unplaced one the third its centre is in."""
    if sh.place != "anywhere":
        return SLOT_OF[sh.place]
    x = shapes.centre(scene, sh)[0]
    return 0 if x < 0.375 else 2 if x > 0.625 else 1


def labels(scene: shapes.Scene, slots: Sequence[int] | None = None) -> list[int]:
    """The seven label indices of a scene: kind and colour of each slot, then the background.
    `slots`: the column of each shape (default: where it stands, `slot`)."""
    kinds, colours = [0] * len(SLOTS), [0] * len(SLOTS)
    for j, sh in enumerate(scene.shapes):
        i = slot(scene, sh) if slots is None else slots[j]
        kinds[i], colours[i] = KIND_CLASSES.index(sh.kind), COLOUR_CLASSES.index(sh.colour)
    return kinds + colours + [BACKGROUND_CLASSES.index(scene.background)]


def readings(caption: str) -> list[list[int]]:
    """Every label list a picture may show for a caption: one for a caption that places its
    shapes, three (one per column) for an unplaced shape."""
    scene = shapes.parse(caption)
    if any(sh.place == "anywhere" for sh in scene.shapes):
        return [labels(scene, [i]) for i in range(len(SLOTS))]
    return [labels(scene)]


class Judge(nn.Module):
    """Five 3x3 conv layers (three of them stride 2: a small shape is a dozen pixels across, so the
    first layer keeps full resolution) on a 64 px picture in [0, 1], an average over rows (the
    columns keep their places), and a two-layer head to every label's logits."""

    def __init__(self, width: int = 32, side: int = 64):
        super().__init__()
        self.width, self.side = width, side
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU())
        cols = side // 8
        self.sizes = [len(KIND_CLASSES)] * len(SLOTS) + [len(COLOUR_CLASSES)] * len(SLOTS) + [len(BACKGROUND_CLASSES)]
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * cols, 8 * w), nn.SiLU(),
                                  nn.Linear(8 * w, sum(self.sizes)))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per label, logits (B, classes)."""
        if images.shape[-1] != self.side or images.shape[-2] != self.side:
            images = F.interpolate(images, size=(self.side, self.side), mode="bilinear", antialias=True,
                                   align_corners=False)
        h = self.features(images * 2 - 1).mean(dim=2)  # (B, C, cols): the rows averaged
        return list(self.head(h).split(self.sizes, dim=1))


def targets(prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, 7) label indices of each caption's readings (`readings`, repeated to three) and
    (B, 3) which of them are distinct; a ValueError names a prompt that is not a caption."""
    ys, valid = [], []
    for p in prompts:
        r = readings(p)
        ys.append(r + [r[0]] * (len(SLOTS) - len(r)))
        valid.append([True] * len(r) + [False] * (len(SLOTS) - len(r)))
    return torch.tensor(ys, device=device), torch.tensor(valid, device=device)


def log_probs(judge: Judge, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, 7): log p(label) for each reading of the caption and each label; (B, 3): valid."""
    y, valid = targets(prompts, images.device)
    return torch.stack([F.log_softmax(lg.float(), dim=1)[:, None, :].expand(-1, y.shape[1], -1)
                        .gather(2, y[:, :, i:i + 1])[..., 0] for i, lg in enumerate(judge(images))], dim=2), valid


def alignment(judge: Judge, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """log p(the caption's labels) / 7, (B,); 0 is perfect. For a caption that places its shapes,
    the mean log-probability of its seven labels; for an unplaced one, of their joint probability
    summed over the columns the shape may stand in."""
    lp, valid = log_probs(judge, images, prompts)
    joint = lp.sum(dim=2).masked_fill(~valid, float("-inf"))
    return torch.logsumexp(joint, dim=1) / N_LABELS


@torch.no_grad()
def label_hits(judge: Judge, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """(B, 7): whether the judge's argmax reads each of the caption's labels, in the caption's
    reading that it reads best (an unplaced caption: the column holding the shape)."""
    y, valid = targets(prompts, images.device)
    hit = torch.stack([lg.argmax(dim=1)[:, None] == y[:, :, i] for i, lg in enumerate(judge(images))], dim=2).float()
    best = hit.mean(dim=2).masked_fill(~valid, -1.0).argmax(dim=1)
    return hit[torch.arange(len(best)), best]


@torch.no_grad()
def agreement(judge: Judge, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of the caption's labels the judge reads, all of them read), each (B,); an
    unplaced caption is read in its best column."""
    hit = label_hits(judge, images, prompts)
    return hit.mean(dim=1), (hit.min(dim=1).values == 1).float()


# ---------------------------------------------------------------------------------------------
# Making one.


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Pictures in [0, 1], each blurred (Gaussian, sigma up to 1.5 px), noised (std up to 0.06)
    and its colours scaled and shifted a little: a generator's pictures are softer than drawings."""
    b = x.shape[0]
    out = []
    for i in range(b):
        sigma = float(torch.rand((), generator=g)) * 1.5
        xi = x[i:i + 1]
        if sigma > 0.2:
            r = max(1, int(3 * sigma))
            k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
            k = k / k.sum()
            xi = F.conv2d(F.pad(xi, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
            xi = F.conv2d(F.pad(xi, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
        out.append(xi)
    x = torch.cat(out)
    scale = 1 + 0.1 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)
    shift = 0.06 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)
    noise = torch.randn(x.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 0.06
    return (x * scale + shift + noise).clamp(0, 1)


def train(steps: int = 2500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, workers: int = 0,
          device: str = "cpu") -> tuple[Judge, dict]:
    """A judge trained on drawn scenes (seeds disjoint from pretraining's and from the held-out
    prompts'), and its record: held-out accuracy on clean and on augmented drawings."""
    from rayreward.shapes import pretrain

    torch.manual_seed(seed)
    judge = Judge().to(device)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    data = pretrain.batches(steps, batch_size, 7_000_003 + seed, workers)
    t0, losses = time.time(), []
    with pretrain.progress(steps, "judge") as bar:
        for step, (x, scenes_, _) in enumerate(data):
            y = torch.tensor([labels(sc) for sc in scenes_], device=device)
            logits = judge(augment((x + 1) / 2, g).to(device))
            loss = sum(F.cross_entropy(lg, y[:, i]) for i, lg in enumerate(logits)) / N_LABELS
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update()
    judge.eval().requires_grad_(False)
    x, caps = pretrain.batch(0, 512, 9_000_001 + seed)
    x = (x + 1) / 2
    clean = agreement(judge, x.to(device), caps)
    noisy = agreement(judge, augment(x, torch.Generator().manual_seed(1)).to(device), caps)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "seconds": round(time.time() - t0, 1),
            "loss_start": sum(losses[:20]) / len(losses[:20]), "loss_end": sum(losses[-20:]) / len(losses[-20:]),
            "held_out_labels_read": float(clean[0].mean()), "held_out_all_read": float(clean[1].mean()),
            "held_out_augmented_labels_read": float(noisy[0].mean()),
            "held_out_augmented_all_read": float(noisy[1].mean()), "width": judge.width, "side": judge.side,
            "torch": torch.__version__}
    return judge.cpu(), info


def save(judge: Judge, info: dict, folder: str | Path) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(folder / "judge.safetensors"))
    files.write_text(folder / "judge.json", json.dumps(info, indent=1))
    return folder


def load(folder: str | Path | None = None, device="cpu") -> Judge:
    """A saved judge (the built-in one by default), frozen, in eval mode. safetensors: no pickled
    code runs."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder else BUILTIN
    if not (folder / "judge.safetensors").is_file():
        raise FileNotFoundError(f"no judge at {folder} (expected judge.safetensors and judge.json; "
                                "`rayreward pretrain --part judge --out DIR` makes one)")
    info = json.loads((folder / "judge.json").read_text())
    judge = Judge(width=info["width"], side=info["side"])
    judge.load_state_dict(load_file(str(folder / "judge.safetensors")))
    return judge.to(device).eval().requires_grad_(False)


def run(out: str | Path, steps: int, batch_size: int, seed: int, workers: int, device: str) -> Path:
    from rayreward.shapes.pretrain import require_finite

    judge, info = train(steps, batch_size, seed=seed, workers=workers, device=device)
    require_finite({"judge": judge}, Path(out))
    save(judge, info, out)
    print(f"[rayreward] judge saved to {out}: reads {info['held_out_labels_read']:.1%} of held-out labels "
          f"({info['held_out_all_read']:.1%} of pictures wholly); augmented {info['held_out_augmented_labels_read']:.1%} "
          f"({info['held_out_augmented_all_read']:.1%}); {info['seconds'] / 60:.1f} min", flush=True)
    return Path(out)
