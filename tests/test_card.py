"""The model card written into every trained LoRA folder, read back with huggingface_hub."""

import ast
import re

from huggingface_hub import ModelCard

from rayreward import card, config, train

from helpers import quick_cfg, rows


def test_a_trained_lora_folder_has_a_model_card_the_hub_parses(tmp_path):
    cfg = quick_cfg(tmp_path, "method.name=drtune")
    train.run_training(cfg)
    lora = tmp_path / "lora"
    c = ModelCard.load(lora / "README.md")
    assert c.data.library_name == "diffusers" and c.data.pipeline_tag == "text-to-image"
    assert c.data.license == "other" and c.data.base_model is None  # tiny is no hub model
    assert {"lora", "text-to-image", "diffusers", "rayreward", "method-drtune", "reward-symmetry"} <= set(c.data.tags)
    final = float(rows(tmp_path / "metrics.csv")[-1]["reward_mean"])
    assert f"| final reward (last step, batch mean) | {final:+.4f} |" in c.text
    for grid in ("grid_start.png", "grid_end.png"):
        assert (lora / grid).is_file() and f"({grid})" in c.text
    code = re.search(r"```python\n(.*?)```", c.text, flags=re.S).group(1)
    ast.parse(code)  # the loading snippet is valid Python
    assert "load_lora_weights" in code and "pytorch_lora_weights.safetensors" in code


def test_a_hub_base_model_is_named_in_the_metadata(tmp_path):
    cfg = config.from_dict({"model": {"name": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
                            "prompts": ["a 'quoted' cat"]})
    path = card.write(cfg, tmp_path, {"reward_mean": 0.25}, {})
    c = ModelCard.load(path)
    assert c.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert 'from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")' in c.text
    ast.parse(re.search(r"```python\n(.*?)```", c.text, flags=re.S).group(1))
