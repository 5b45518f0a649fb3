"""ray_cluster.yaml installs faiss for indexing with exactly one of the package's extras per node
type: faiss-gpu on GPU workers, faiss-cpu elsewhere (both wheels own the `faiss` package)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _setup(config: dict, node_type: str) -> str:
    """The set-up commands the launcher runs on a node of ``node_type`` (Ray's own merging:
    a node type's worker_setup_commands replace the global ones)."""
    from ray.autoscaler._private.util import merge_setup_commands, prepare_config, validate_config

    config = prepare_config(config)
    validate_config(config)
    if node_type == config["head_node_type"]:
        return " ".join(merge_setup_commands(dict(config))["head_setup_commands"])
    own = config["available_node_types"][node_type].get("worker_setup_commands")
    return " ".join(own if own is not None else merge_setup_commands(dict(config))["worker_setup_commands"])


def test_each_node_type_installs_one_faiss_extra():
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    for node_type, extra in (("head", "cpu"), ("cpu_worker", "cpu"), ("gpu_worker", "gpu")):
        commands = _setup(dict(config), node_type)
        assert f"/home/ray/idml[{extra}]" in commands, (node_type, commands)
        other = {"cpu": "gpu", "gpu": "cpu"}[extra]
        assert f"idml[{other}]" not in commands and "faiss" not in commands.replace(f"idml[{extra}]", "")


def test_faiss_comes_with_one_extra_only():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert not [d for d in project["project"]["dependencies"] if d.startswith("faiss")]
    extras = project["project"]["optional-dependencies"]
    assert extras["cpu"][0].startswith("faiss-cpu") and extras["gpu"][0].startswith("faiss-gpu")
    assert [{"extra": "cpu"}, {"extra": "gpu"}] in project["tool"]["uv"]["conflicts"]
    assert "cpu" in (REPO / "scripts" / "setup.sh").read_text().split("pip install -q -e '.[")[1].split("]")[0].split(",")
