"""The model card of a trained LoRA folder: `README.md` in the Hugging Face model-card format.

Written with huggingface_hub's own `ModelCard` / `ModelCardData`, so `huggingface-cli upload
USER/NAME RUN/lora` gives a model page: YAML metadata (base model, tags, library, pipeline,
license placeholder), then the training settings, the final reward, the start and end grids
(copied into the folder) and how to load the LoRA with diffusers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rayreward import config as config_mod
from rayreward import families, files

TAGS = ["lora", "text-to-image", "diffusers", "rayreward", "stable-diffusion"]


def base_model_id(cfg: config_mod.Config) -> str | None:
    """The base model as a hub id when it is one (a local folder or a built-in model has none)."""
    name = cfg.model.name
    return name if config_mod.looks_like_hub_id(name) else None


def write(cfg: config_mod.Config, folder: Path, final: dict, grids: dict[str, Path], flavour: str = "sd") -> Path:
    """README.md in `folder` (the saved LoRA); `final` is the last metrics row, `grids` the
    images to show ({"start": path, "end": path}), copied next to the card; `flavour` the model
    family the LoRA is for (its tags). Returns its path."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    shown = {}
    for label, path in grids.items():
        if Path(path).is_file():
            shutil.copyfile(path, folder / f"grid_{label}.png")
            shown[label] = f"grid_{label}.png"
    base = base_model_id(cfg)
    rewards = [r.name for r in cfg.rewards]
    data = ModelCardData(
        base_model=base, license="other", library_name="diffusers", pipeline_tag="text-to-image",
        tags=TAGS + list(families.get(flavour).tags) + [f"method-{cfg.method.name}"]
        + [f"reward-{r}" for r in rewards],
    )
    m, t = cfg.method, cfg.train
    reward = final.get("reward_mean")
    images = "\n".join(f"![{label} of training]({file})" for label, file in shown.items())
    load_base = base or "<the base model's hub id or folder>"
    example = (cfg.grid.prompts or cfg.training_prompts())[0]
    body = f"""
# {cfg.name}: a LoRA trained with {m.name} on {", ".join(rewards)}

Trained with rayreward by back-propagating the reward's gradient through the
sampling chain into LoRA weights of the {families.get(flavour).denoiser_class}. Base model: `{cfg.model.name}`. **License:** set
`license` above to the base model's license before you publish this card.

| setting | value |
|---|---|
| method | `{m.name}` (K = {m.k}) |
| rewards | {", ".join(f"`{r.name}` x {r.weight:g}" for r in cfg.rewards)} |
| loss | `{cfg.loss.kind}` |
| sampling | {"flow-matching Euler" if families.get(flavour).flow else "DDIM"}, T = {cfg.sampling.num_steps}, guidance {cfg.sampling.guidance_scale:g}, eta {cfg.sampling.eta:g} |
| LoRA | rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}, on {", ".join(cfg.lora.target_modules)} |
| optimizer | AdamW, lr {cfg.optim.lr:g}, grad clip {cfg.optim.grad_clip:g} |
| steps x batch | {t.steps} x {t.batch_size} per worker x {t.num_workers} worker(s) |
| resolution | {cfg.model.resolution} px |
| seed | {t.seed} |
| final reward (last step, batch mean) | {"n/a" if reward is None else f"{reward:+.4f}"} |

{images}

## Use it with diffusers

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{load_base}")
pipe.load_lora_weights("THIS_FOLDER_OR_HUB_ID")  # pytorch_lora_weights.safetensors
image = pipe({example!r}, num_inference_steps={cfg.sampling.num_steps}).images[0]
```

`rayreward export --lora THIS_FOLDER --format kohya --out lora.safetensors` writes the file that
ComfyUI, AUTOMATIC1111 and kohya's scripts load.
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = folder / "README.md"
    files.write_text(path, str(card))
    return path
