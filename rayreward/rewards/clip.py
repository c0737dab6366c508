"""Model rewards built on transformers' CLIP: PickScore, CLIPScore, LAION aesthetic.

Each is frozen (eval mode, requires_grad False) on a configured device and dtype, and
preprocesses with torch ops only (resize of the shortest edge, bicubic with antialias as
CLIPImageProcessor's PIL path does; center crop; the model's own mean/std), so the score is
differentiable in the images. Weights come from a hub id or a local folder/file given in the
reward's `args`; with no network a clear error names what is missing and the key to set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rayreward import tiny
from rayreward.errors import RewardLoadError, first_line
from rayreward.rewards.common import dtype_of, load_pretrained, read_state_dict, resize_crop_normalize

CLIP_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's processor
CLIP_L14 = "openai/clip-vit-large-patch14"
def _source(name: str | None) -> str | None:
    return str(tiny.folder("clip")) if name == "tiny" else name


def _field(size, key: str) -> int:
    """An image processor's size: an int, a dict, or (transformers 5) a SizeDict."""
    if isinstance(size, int):
        return size
    value = size[key] if isinstance(size, dict) else getattr(size, key)
    return int(value)


def _features(out) -> torch.Tensor:
    """get_image/text_features: a tensor in transformers 4, a ModelOutput in 5."""
    return out if torch.is_tensor(out) else out.pooler_output


def clip_preprocess(images: torch.Tensor, size: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Differentiable CLIPImageProcessor. Shape: (b, 3, h, w) in [0, 1] -> (b, 3, crop, crop)."""
    return resize_crop_normalize(images, size, crop, mean, std, crop_rounding="floor")


class ClipScorer(torch.nn.Module):
    """A frozen CLIPModel with its processor's preprocessing and tokenizer."""

    def __init__(self, model: str, processor: str | None, device, dtype: torch.dtype, what: str):
        super().__init__()
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        model, processor = _source(model), _source(processor or model)
        self.model = load_pretrained(what, CLIPModel.from_pretrained, model, "model")  # fp32, cast below (transformers 4 and 5)
        ip = load_pretrained(what, CLIPImageProcessor.from_pretrained, processor, "processor")
        self.tokenizer = load_pretrained(what, AutoTokenizer.from_pretrained, processor, "processor")
        self.size = _field(ip.size, "shortest_edge")
        self.crop = _field(ip.crop_size, "height")
        self.mean, self.std = list(ip.image_mean), list(ip.image_std)
        self.model.eval().requires_grad_(False).to(device, dtype)
        self.device, self.dtype = torch.device(device), dtype

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings. Shape: (b, 3, h, w) -> (b, d)."""
        x = images.to(self.device, torch.promote_types(images.dtype, torch.float32))
        x = clip_preprocess(x, self.size, self.crop, self.mean, self.std)
        e = _features(self.model.get_image_features(pixel_values=x.to(self.dtype)))
        e = e.to(torch.promote_types(e.dtype, torch.float32))
        return e / e.norm(dim=-1, keepdim=True)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
        with torch.no_grad():
            e = _features(self.model.get_text_features(**tok))
            e = e.to(torch.promote_types(e.dtype, torch.float32))
        return e / e.norm(dim=-1, keepdim=True)


def pickscore(device="cpu", model: str = "yuvalkirstain/PickScore_v1", processor: str = CLIP_H14,
              dtype: str = "float32"):
    """PickScore: logit_scale.exp() * cos(text, image) of the PickScore_v1 CLIP-H/14."""
    scorer = ClipScorer(model, processor, device, dtype_of(dtype), "pickscore")

    def reward(images, prompts):
        img, txt = scorer.image_embeds(images), scorer.text_embeds(prompts)
        return scorer.model.logit_scale.exp() * (img * txt.to(img.dtype)).sum(-1)

    reward.scorer = scorer
    return reward


def clipscore(device="cpu", model: str = CLIP_L14, processor: str | None = None, weight: float = 2.5,
              dtype: str = "float32"):
    """CLIPScore (Hessel et al.): weight * max(cos(text, image), 0)."""
    scorer = ClipScorer(model, processor, device, dtype_of(dtype), "clipscore")

    def reward(images, prompts):
        img = scorer.image_embeds(images)
        return weight * (img * scorer.text_embeds(prompts).to(img.dtype)).sum(-1).clamp(min=0)

    reward.scorer = scorer
    return reward


class AestheticMLP(torch.nn.Module):
    """The LAION improved-aesthetic-predictor head (`sac+logos+ava1-l14-linearMSE.pth` layout)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def load_aesthetic_head(path: str | Path, dim: int) -> AestheticMLP:
    """The MLP from a .pth / .safetensors state dict, without running pickled code."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RewardLoadError(f"reward aesthetic: head {str(path)!r} does not exist. Set rewards[].args.head to the "
                              "local sac+logos+ava1-l14-linearMSE.pth (LAION improved-aesthetic-predictor)")
    state = read_state_dict(f"reward aesthetic: head {str(path)!r}", p)
    head = AestheticMLP(dim)
    try:
        head.load_state_dict(state)
    except (RuntimeError, AttributeError, TypeError) as e:
        raise RewardLoadError(f"reward aesthetic: head {str(path)!r} is not in the LAION MLP layout "
                              f"(layers.0 ... layers.7 for a {dim}-d embedding): {first_line(e)}") from None
    return head


def aesthetic(device="cpu", head: str = "sac+logos+ava1-l14-linearMSE.pth", model: str = CLIP_L14,
              processor: str | None = None, dtype: str = "float32"):
    """LAION aesthetic score: MLP(normalised CLIP ViT-L/14 image embedding)."""
    scorer = ClipScorer(model, processor, device, dtype_of(dtype), "aesthetic")
    mlp = load_aesthetic_head(head, scorer.model.config.projection_dim).eval().requires_grad_(False).to(device)

    def reward(images, prompts):
        img = scorer.image_embeds(images)
        return mlp.to(img.dtype)(img).squeeze(-1)

    reward.scorer, reward.head = scorer, mlp
    return reward
