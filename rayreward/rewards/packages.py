"""Rewards whose models come from the reference packages: HPSv2 / HPSv2.1 (`hpsv2`) and ImageReward
(`image-reward`). Both are optional extras (`rayreward[hps]`, `rayreward[imagereward]`), imported only
when such a reward is built, so the core imports and trains without them.

Each adapter builds the package's own model classes, loads the official checkpoint without running
pickled code, and scores with the package's modules; only the image preprocessing is replaced, by
torch ops (resize of the shortest edge, bicubic with antialias; torchvision's center crop; the
model's mean/std), so the score is differentiable in the images.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Sequence

import torch

from rayreward.rewards.common import OPENAI_MEAN, OPENAI_STD, dtype_of, fetch, load_state, resize_crop_normalize
from rayreward.errors import RewardLoadError, first_line

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv21": "HPS_v2.1_compressed.pt"}
IMAGEREWARD_REPO = "THUDM/ImageReward"
EXTRAS = {"hpsv2": "hps", "ImageReward": "imagereward"}


def require(module: str, what: str):
    """Import a reward package's module, or say which extra installs it."""
    top = module.split(".")[0]
    extra = EXTRAS.get(top, top)
    if importlib.util.find_spec(top) is None:
        raise RewardLoadError(f"reward {what} needs the {top} package, which is not installed. Install the "
                              f"extra: pip install -c constraints.txt -e '.[{extra}]' (or '.[rewards]' for all)")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RewardLoadError(f"reward {what}: {top} is installed but does not import ({e}). The versions it works "
                              f"with are the '{extra}' extra in pyproject.toml, pinned in constraints.txt") from None


def _check_keys(what: str, path: Path, model: torch.nn.Module, state: dict, strict: bool) -> None:
    try:
        missing, _ = model.load_state_dict(state, strict=strict)  # unexpected keys: extra buffers of other versions
    except RuntimeError as e:
        raise RewardLoadError(f"reward {what}: {str(path)!r} does not fit the model "
                              f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    params = {n for n, _ in model.named_parameters()}
    lost = [k for k in missing if k in params]
    if lost:
        raise RewardLoadError(f"reward {what}: {str(path)!r} is not this model's checkpoint: {len(lost)} of its "
                              f"{len(params)} weights are missing (e.g. {lost[0]})")


class HPSScorer(torch.nn.Module):
    """hpsv2's open_clip model (ViT-H-14 by default) with an HPS v2.0 / v2.1 checkpoint."""

    def __init__(self, what: str, checkpoint: str, arch: str, device, dtype: torch.dtype):
        super().__init__()
        oc = require("hpsv2.src.open_clip", what)
        name = arch
        if arch.endswith(".json"):  # a custom open_clip architecture file (same classes, other sizes)
            if not Path(arch).is_file():
                raise RewardLoadError(f"reward {what}: arch file {arch!r} does not exist (rewards[].args.arch)")
            oc.add_model_config(arch)
            name = Path(arch).stem
        if oc.get_model_config(name) is None:
            raise RewardLoadError(f"reward {what}: arch {arch!r} is unknown; allowed: an open_clip config name "
                                  f"(e.g. ViT-H-14) or a .json file (rewards[].args.arch)")
        path = fetch(what, checkpoint, HPS_FILES[what], "checkpoint")
        state = load_state(what, path)
        self.model = oc.create_model(name, pretrained=None, precision="fp32", device="cpu", output_dict=True)
        _check_keys(what, path, self.model, state, strict=True)
        self.tokenizer = oc.get_tokenizer(name)
        size = self.model.visual.image_size
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(getattr(self.model.visual, "image_mean", None) or OPENAI_MEAN)
        self.std = tuple(getattr(self.model.visual, "image_std", None) or OPENAI_STD)
        self.model.eval().requires_grad_(False).to(device, dtype)
        self.device, self.dtype = torch.device(device), dtype

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """cos(image, text) as hpsv2.score computes it. Shape: (b, 3, h, w) in [0, 1] -> (b,)."""
        x = images.to(self.device, torch.promote_types(images.dtype, torch.float32))
        x = resize_crop_normalize(x, self.size, self.size, self.mean, self.std, crop_rounding="round")
        img = self.model.encode_image(x.to(self.dtype), normalize=True)
        with torch.no_grad():
            txt = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device), normalize=True)
        dt = torch.promote_types(img.dtype, torch.float32)
        return (img.to(dt) * txt.to(dt)).sum(-1)


def _hps(what: str):
    def factory(device="cpu", checkpoint: str = HPS_REPO, arch: str = "ViT-H-14", dtype: str = "float32"):
        scorer = HPSScorer(what, checkpoint, arch, device, dtype_of(dtype))

        def reward(images, prompts):
            return scorer(images, prompts)

        reward.scorer = scorer
        return reward

    factory.__name__ = what
    factory.__doc__ = (f"HPS {'v2.1' if what == 'hpsv21' else 'v2.0'}: cos(image, text) of hpsv2's ViT-H-14 "
                       f"with {HPS_FILES[what]} (hub {HPS_REPO}, or a local file/folder in `checkpoint`).")
    return factory


hpsv2 = _hps("hpsv2")
hpsv21 = _hps("hpsv21")


def _bert_tokenizer_files() -> None:
    """The package's BLIP loads its tokenizer from the hub id 'bert-base-uncased' (not configurable):
    check the hub cache (or the hub) has it, so a miss is one clear error, not a TypeError deep in it."""
    from transformers.utils import cached_file

    try:
        cached_file("bert-base-uncased", "vocab.txt")
    except Exception as e:  # noqa: BLE001 - offline or unreachable: the same user error
        raise RewardLoadError(
            "reward imagereward: the image-reward package builds its BLIP tokenizer from the hub id "
            f"'bert-base-uncased', which is not in the Hugging Face cache ({first_line(e)}). Download it "
            "once where the hub is reachable (huggingface-cli download bert-base-uncased vocab.txt tokenizer_config.json "
            "config.json), or point HF_HOME at a cache holding it; the package takes no path for it") from None


class ImageRewardScorer(torch.nn.Module):
    """The image-reward package's ImageReward (BLIP ViT-L + BERT cross-attention + MLP)."""

    def __init__(self, checkpoint: str, med_config: str | None, device, dtype: torch.dtype):
        super().__init__()
        what = "imagereward"
        ir = require("ImageReward.ImageReward", what)
        path = fetch(what, checkpoint, "ImageReward.pt", "checkpoint")
        if med_config is None:  # beside the checkpoint, else from the checkpoint's hub repo
            local = path.parent / "med_config.json"
            med = local if local.is_file() else fetch(what, IMAGEREWARD_REPO if Path(checkpoint).exists() else checkpoint,
                                                      "med_config.json", "med_config")
        else:
            med = fetch(what, med_config, "med_config.json", "med_config")
        state = load_state(what, path)
        _bert_tokenizer_files()
        model = ir.ImageReward(med_config=str(med), device=str(device))
        _check_keys(what, path, model, state, strict=False)
        self.model = model.eval().requires_grad_(False).to(device, dtype)
        self.model.mlp.float()  # the head runs in fp32, as ImageReward.score does
        self.device, self.dtype = torch.device(device), dtype

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """ImageReward.score's computation, batched. Shape: (b, 3, h, w) in [0, 1] -> (b,)."""
        m = self.model
        x = images.to(self.device, torch.promote_types(images.dtype, torch.float32))
        x = resize_crop_normalize(x, 224, 224, OPENAI_MEAN, OPENAI_STD, crop_rounding="round")
        tok = m.blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                               return_tensors="pt").to(self.device)
        emb = m.blip.visual_encoder(x.to(self.dtype))
        atts = torch.ones(emb.shape[:-1], dtype=torch.long, device=self.device)
        out = m.blip.text_encoder(tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=emb,
                                  encoder_attention_mask=atts, return_dict=True)
        feats = out.last_hidden_state[:, 0, :]
        r = m.mlp.to(torch.promote_types(feats.dtype, torch.float32))(feats.to(torch.promote_types(feats.dtype, torch.float32)))
        return ((r - m.mean) / m.std).squeeze(-1)


def imagereward(device="cpu", checkpoint: str = IMAGEREWARD_REPO, med_config: str | None = None,
                dtype: str = "float32"):
    """ImageReward v1.0: ImageReward.pt + med_config.json (hub THUDM/ImageReward or local paths)."""
    scorer = ImageRewardScorer(checkpoint, med_config, device, dtype_of(dtype))

    def reward(images, prompts):
        return scorer(images, prompts)

    reward.scorer = scorer
    return reward
