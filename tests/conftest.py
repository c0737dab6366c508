import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py for 'helpers:fn' rewards


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory):
    """One tiny-model cache per test session (built offline on first use)."""
    os.environ.setdefault("RAYREWARD_CACHE", str(tmp_path_factory.mktemp("rayreward-cache")))
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by the whole session."""
    import ray

    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAYREWARD_CACHE": os.environ["RAYREWARD_CACHE"],
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    # one logical GPU, so that the placement of GPU shares is tested for real (Ray schedules
    # logical resources; no test runs CUDA code on it)
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_sd():
    from rayreward.config import ModelConfig
    from rayreward.models import resolve_source

    return resolve_source(ModelConfig(name="tiny"))


def pytest_collection_modifyitems(items):
    """Every test on the session's Ray cluster is `slow` (seconds to minutes each), so that
    `pytest -m "not slow"` is a quick loop; tests that start their own Ray say so themselves."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


# The image-reward package's files, built offline (test_package_rewards, test_experiments).

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "fox", "in", "the", "snow", "painting"]


@pytest.fixture(scope="module")
def bert_tokenizer_cache(tmp_path_factory):
    """The hub cache entry the package's BLIP asks for ('bert-base-uncased'), with a small vocabulary,
    laid out as huggingface_hub stores a download; the hub is offline for this module."""
    hub = tmp_path_factory.mktemp("hf") / "hub"
    rev = "0" * 40
    snap = hub / "models--bert-base-uncased" / "snapshots" / rev
    snap.mkdir(parents=True)
    (hub / "models--bert-base-uncased" / "refs").mkdir()
    (hub / "models--bert-base-uncased" / "refs" / "main").write_text(rev)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *chars, *("##" + c for c in chars)]
    (snap / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (snap / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    (snap / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": len(vocab)}))
    mp = pytest.MonkeyPatch()
    import huggingface_hub.constants
    import transformers.utils.hub

    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(hub), raising=False)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HUB_CACHE", str(hub))
    yield len(vocab) + 2  # BLIP adds [DEC] and [ENC]
    mp.undo()


@pytest.fixture(scope="module")
def imagereward_files(bert_tokenizer_cache, tmp_path_factory):
    """ImageReward.pt (a plain state dict of the package's ImageReward, seeded) and med_config.json."""
    from rayreward.rewards.packages import require

    ir = require("ImageReward.ImageReward", "imagereward")
    d = tmp_path_factory.mktemp("imagereward")
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 256,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 12,
           "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": bert_tokenizer_cache,
           "encoder_width": 1024, "add_cross_attention": True}
    (d / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(0)
    model = ir.ImageReward(med_config=str(d / "med_config.json"), device="cpu")
    with torch.no_grad():  # the package's MLP init is tiny (std 1/769): spread the scores out
        for p in model.mlp.parameters():
            p.normal_(0, 0.05)
    torch.save(model.state_dict(), d / "ImageReward.pt")
    return d
