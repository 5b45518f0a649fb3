"""ray_cluster.yaml is a valid cluster-launcher config (Ray's own schema) with the node types,
set-up and authentication the docs promise."""

from __future__ import annotations

from pathlib import Path

import yaml

CONFIG = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"


def load():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(CONFIG.read_text()))
    validate_config(config)  # raises on anything the launcher would refuse
    return config


def test_cluster_config_is_valid_for_the_launcher():
    config = load()
    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert types["cpu_worker"]["resources"].get("GPU", 0) == 0 and types["cpu_worker"]["max_workers"] >= 1
    assert types["gpu_worker"]["resources"]["GPU"] >= 1 and "gpu" in types["gpu_worker"]["docker"]["worker_image"]


def test_every_node_installs_this_package_and_authenticates_with_a_token():
    config = load()
    assert config["file_mounts"]["/home/ray/idml"] == "."
    assert any("pip install" in c and "-e /home/ray/idml" in c for c in config["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert "RAY_AUTH_MODE=token" in start and "ray start" in start
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]


def test_mlflow_listens_on_the_private_address_and_needs_a_password():
    config = load()
    head = " ".join(config["head_start_ray_commands"])
    assert "scripts/mlflow_server.sh $HEAD_IP" in head and "mlflow server" not in head
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "MLFLOW_TRACKING_PASSWORD=$(cat ~/.idml/mlflow_password)" in " ".join(config[key])
    assert "/home/ray/.idml/mlflow_password" in config["file_mounts"]
