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
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env})
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
