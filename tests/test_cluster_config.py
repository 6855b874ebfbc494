"""cluster.yaml is a valid Ray cluster-launcher config: CPU head, autoscaling GPU workers."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_ray_validation() -> None:
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)
    head = config["available_node_types"][config["head_node_type"]]
    workers = [node for name, node in config["available_node_types"].items() if name != config["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # the head has no GPU
    assert any(node["node_config"]["InstanceType"].startswith(("g", "p")) for node in workers)
    assert all(node["min_workers"] < node["max_workers"] for node in workers)  # they autoscale
    assert "AWS_SECRET_ACCESS_KEY" not in CLUSTER_YAML.read_text()
