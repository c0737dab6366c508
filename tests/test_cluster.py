"""cluster.yaml against the cluster-launcher schema that ships with Ray, and what it must hold."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_rays_schema():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # what `ray up` does: merge the provider defaults, validate
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types["train_gpu"]["resources"]["GPU"] >= 1
    reward_nodes = [n for n, t in types.items() if "reward_host" in t["resources"]]
    assert reward_nodes == ["reward_host"]  # only reward nodes advertise the custom resource
    assert any("constraints.txt -e ~/rayreward" in c for c in cfg["setup_commands"])


def test_the_schema_check_does_catch_a_bad_config():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["available_node_types"]["reward_host"]["resources"]["reward_host"] = "one"
    with pytest.raises(Exception, match="one"):
        validate_config(prepare_config(cfg))
