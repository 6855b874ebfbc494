"""The deployment files: cluster.yaml passes Ray's own cluster-config validation, and the KubeRay
RayJob manifest has the kinds and fields KubeRay needs; neither holds a credential."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "jobs" / "rayjob.yaml"
SECRET_NAMES = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "aws_secret_access_key")


def test_cluster_yaml_passes_ray_validation() -> None:
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)
    head = config["available_node_types"][config["head_node_type"]]
    workers = {name: node for name, node in config["available_node_types"].items() if name != config["head_node_type"]}
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # the head has no GPU
    gpu = [node for node in workers.values() if node["node_config"]["InstanceType"].startswith(("g", "p"))]
    cpu = [node for node in workers.values() if node["node_config"]["InstanceType"].startswith(("c", "m"))]
    assert gpu and cpu
    assert all(node["min_workers"] == 0 < node["max_workers"] for node in workers.values())  # they autoscale from 0
    assert all(node["node_config"]["IamInstanceProfile"]["Name"] for node in [head, *workers.values()])
    assert config["docker"]["worker_image"].startswith("rayproject/ray:")
    assert any("pip install" in command and "constraints.txt" in command for command in config["setup_commands"])
    assert not any(name in CLUSTER_YAML.read_text() for name in SECRET_NAMES)


def test_the_kuberay_rayjob_manifest() -> None:
    manifest = yaml.safe_load(RAYJOB_YAML.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("segpipe run --spec ")
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] and "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    (gpu_group,) = cluster["workerGroupSpecs"]
    assert gpu_group["minReplicas"] == 0 < gpu_group["maxReplicas"]
    worker = gpu_group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert head["serviceAccountName"] == worker["serviceAccountName"]  # credentials from the service account
    assert not any(name in RAYJOB_YAML.read_text() for name in SECRET_NAMES)
