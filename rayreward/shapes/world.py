"""A synthetic text-to-image world: captioned pictures of one to three shapes, drawn in code.

Every scene is a function of its seed (`scene(seed)`), drawn with PIL (`draw`), and captioned from
its own description (`caption`), so a caption always says what the picture holds:

    "a large red circle in the centre, on a black background"
    "a blue square on the left and a yellow star on the right, on a striped background"

    "a red star, on a gray background"                  (no place, no size: the noise decides)

What a reward can move here: symmetry and centring (every shape is mirror-symmetric about its
vertical axis; a single shape "in the centre" is placed with a small random offset, and some
single shapes sit on the left or right), colour, shape, counting (one to three) and prompt
alignment (the caption names each shape's colour, kind and place). Half of the single shapes are
"unplaced": the caption leaves the place (and, half of those times, the size) unsaid and the shape
stands anywhere in a wide box, so a model trained on the world must choose the layout from its
initial noise, which is what a layout reward (`centring`) can then train. Nothing is downloaded and no
file is read. The words of the world (`VOCABULARY`) make a word-level CLIP tokenizer
(`tokenizer`), so captions are a few tokens long.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

KINDS = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "purple": (150, 60, 200), "orange": (240, 140, 30)}
BACKGROUNDS = {"black": (20, 20, 20), "white": (235, 235, 235), "gray": (120, 120, 120), "striped": None}
SIZES = {"small": 0.10, "large": 0.17}  # radius as a fraction of the image side (one shape)
# where a shape stands: its horizontal centre as a fraction of the side, and the caption's words
PLACES = {"left": (0.25, "on the left"), "middle": (0.5, "in the middle"), "right": (0.75, "on the right"),
          "centre": (0.5, "in the centre"), "anywhere": (0.5, "")}
UNPLACED_BOX = (0.30, 0.20)  # an unplaced shape's centre: 0.5 plus up to this much in x and in y
HELD_OUT = 10**15  # held-out prompts come from scene seeds from here on; training draws seeds below it
VOCABULARY = sorted({"a", "and", "on", "the", "in", "background", *KINDS, *COLOURS, *BACKGROUNDS, *SIZES, "left",
                     "right", "middle", "centre", ","})


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    place: str  # one of PLACES
    dx: float = 0.0  # offset of the centre from its place, fraction of the side
    dy: float = 0.0
    size_said: bool = True  # False: the caption leaves the size unsaid (an unplaced single shape)


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # left to right
    background: str  # one of BACKGROUNDS

    @property
    def caption(self) -> str:
        return caption(self)


def scene(seed: int, max_shapes: int = 3, unplaced: bool = True) -> Scene:
    """The scene of `seed` (deterministic): one shape in half the scenes, else two or three in
    separate columns. A single shape is "in the centre" 70 % of the time (offset by up to 6 % of
    the side, so not exactly centred), else on the left or right; then, half of the time, it is
    made unplaced: moved anywhere in `UNPLACED_BOX` (uniform), its place dropped from the caption
    and, every other time, its size too. (The unplaced draw comes after every other draw, so the
    placed scenes are those of the world before unplaced captions existed; `unplaced=False` gives
    that world, the one the `shapes` model was trained on.)"""
    rng = random.Random(seed)
    n = 1 if rng.random() < 0.5 or max_shapes == 1 else rng.randint(2, max_shapes)
    if n == 1:
        places = ["centre" if rng.random() < 0.7 else rng.choice(["left", "right"])]
    elif n == 2:
        places = ["left", "right"]
    else:
        places = ["left", "middle", "right"]
    shapes = []
    for place in places:
        jitter = 0.06 if n == 1 else 0.03
        shapes.append(Shape(rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(list(SIZES)) if n == 1 else "small",
                            place, rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)))
    background = rng.choice(list(BACKGROUNDS))
    if unplaced and n == 1 and rng.random() < 0.5:
        bx, by = UNPLACED_BOX
        shapes = [replace(shapes[0], place="anywhere", dx=rng.uniform(-bx, bx), dy=rng.uniform(-by, by),
                          size_said=rng.random() < 0.5)]
    return Scene(tuple(shapes), background)


def caption(s: Scene) -> str:
    """The scene in words: each shape (size only when alone and said), its place (unless
    unplaced), then the background."""
    def one(sh: Shape) -> str:
        words = ["a"] + ([sh.size] if len(s.shapes) == 1 and sh.size_said else []) + [sh.colour, sh.kind]
        return " ".join(words + ([PLACES[sh.place][1]] if sh.place != "anywhere" else []))

    parts = [one(sh) for sh in s.shapes]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body}, on a {s.background} background"


_PART = re.compile(r"a (?:(small|large) )?(\w+) (\w+)(?: (on the left|in the middle|on the right|in the centre))?")
_PLACE_OF = {words: place for place, (_, words) in PLACES.items()}


def parse(text: str) -> Scene:
    """The scene a caption describes (offsets 0; a shape that is not alone is "small"; an unplaced
    one is "anywhere", "large" when its size is unsaid), so that `caption(parse(c)) == c` for every
    caption of the world. Raises ValueError on any other text, naming it."""
    head, sep, tail = text.rpartition(", on a ")
    background = tail.removesuffix(" background")
    parts = head.replace(" and ", ", ").split(", ") if head else []
    found = [_PART.fullmatch(part) for part in parts]
    if (not sep or not tail.endswith(" background") or background not in BACKGROUNDS or not 1 <= len(parts) <= 3
            or not all(found)):
        raise ValueError(f"not a caption of the shapes world: {text!r}")
    out = []
    for m in found:
        size, colour, kind, place = m.groups()
        alone_unplaced = len(parts) == 1 and place is None
        if (colour not in COLOURS or kind not in KINDS or (place is None and len(parts) > 1)
                or (size is None and len(parts) == 1 and not alone_unplaced) or (size is not None and len(parts) > 1)):
            raise ValueError(f"not a caption of the shapes world: {text!r}")
        out.append(Shape(kind, colour, size or ("large" if alone_unplaced else "small"),
                         _PLACE_OF[place] if place else "anywhere", size_said=size is not None or len(parts) > 1))
    scene_ = Scene(tuple(out), background)
    if caption(scene_) != text:
        raise ValueError(f"not a caption of the shapes world: {text!r}")
    return scene_


def centre(s: Scene, sh: Shape) -> tuple[float, float]:
    """A shape's centre as fractions of the side (x right, y down)."""
    return PLACES[sh.place][0] + sh.dx, 0.5 + sh.dy


def radius(s: Scene, sh: Shape) -> float:
    return SIZES[sh.size] if len(s.shapes) == 1 else 0.09


def _outline(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape, mirror-symmetric about x = cx (None: a circle)."""
    if kind == "circle":
        return None
    if kind == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r * math.sqrt(3) / 2, cy + r / 2), (cx - r * math.sqrt(3) / 2, cy + r / 2)]
    points = []  # a five-pointed star, one point up
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return points


def draw(s: Scene, side: int = 64):
    """The scene as a side x side RGB PIL image (drawn at 4x and downsampled: smooth edges)."""
    from PIL import Image, ImageDraw

    big = side * 4
    if s.background == "striped":
        img = Image.new("RGB", (big, big), (200, 200, 200))
        d = ImageDraw.Draw(img)
        for y in range(0, big, big // 8):
            d.rectangle([0, y, big, y + big // 16 - 1], fill=(150, 150, 150))
    else:
        img = Image.new("RGB", (big, big), BACKGROUNDS[s.background])
        d = ImageDraw.Draw(img)
    for sh in s.shapes:
        (cx, cy), r = centre(s, sh), radius(s, sh)
        cx, cy, r = cx * big, cy * big, r * big
        fill = COLOURS[sh.colour]
        poly = _outline(sh.kind, cx, cy, r)
        if poly is None:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            d.polygon(poly, fill=fill)
    return img.resize((side, side), Image.LANCZOS)


def prompts(count: int, start: int = HELD_OUT, unplaced: bool = True) -> list[str]:
    """Captions of scenes from a seed range that pretraining never draws (held-out prompts);
    `unplaced=False`: of the world without unplaced shapes (builtin:shapes and _heldout)."""
    return [scene(seed, unplaced=unplaced).caption for seed in range(start, start + count)]


def unplaced_prompts(count: int, start: int = HELD_OUT, exclude: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The first `count` distinct unplaced captions (one shape, no place) of the scenes from seed
    `start` on, none of `exclude`: the prompts of a layout study, where the model chooses the place.
    (There are 288 such captions, so a held-out set excludes the training set's texts.)"""
    out: list[str] = []
    seed = start
    while len(out) < count:
        s = scene(seed)
        if (len(s.shapes) == 1 and s.shapes[0].place == "anywhere" and s.caption not in out
                and s.caption not in exclude):
            out.append(s.caption)
        seed += 1
    return out


# ---------------------------------------------------------------------------------------------
# A word-level CLIP tokenizer for the world's captions.


def _bpe(chars: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP's byte-pair merge loop: merge the lowest-ranked adjacent pair until none is known."""
    word = chars
    while len(word) > 1:
        pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        out, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                out.append(word[i] + word[i + 1])
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = tuple(out)
    return word


def tokenizer_files(folder: str | Path) -> Path:
    """Write vocab.json and merges.txt of a CLIPTokenizer for which every word of VOCABULARY is
    one token. Merges are added word by word, each at the lowest priority, until BPE turns the
    word into one token; a merge added later never applies to an earlier word (BPE always had a
    higher-priority pair to merge there). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ranks: dict[tuple[str, str], int] = {}
    tokens: list[str] = []
    for word in VOCABULARY:
        chars = tuple(word[:-1]) + (word[-1] + "</w>",)
        tokens += chars
        while len(seg := _bpe(chars, ranks)) > 1:
            ranks[(seg[0], seg[1])] = len(ranks)
            tokens.append(seg[0] + seg[1])
    vocab = list(dict.fromkeys(tokens + ["<|startoftext|>", "<|endoftext|>"]))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    merges = sorted(ranks, key=ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def tokenizer(folder: str | Path, max_length: int = 32):
    from transformers import CLIPTokenizer

    f = tokenizer_files(folder)
    return CLIPTokenizer(str(f / "vocab.json"), str(f / "merges.txt"), model_max_length=max_length)

