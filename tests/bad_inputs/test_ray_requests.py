"""Resource requests no cluster node can ever hold (``--cpus-per-worker 100``, too many workers,
``--gpu`` without GPUs) are refused on the driver in one line (exit 2) instead of Ray waiting for
them forever; an autoscaling cluster that could start a fitting node is not refused.
The rule itself (``pipelines._capacity``) is checked on cluster shapes without Ray; one real
``idml train --ray`` on a local Ray instance shows the whole path."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from idml.errors import InputError
from pipelines._capacity import ClusterShape, Request, refuse_unless_it_fits
from pipelines.train import RayOptions, worker_request

TWO_CPUS = ClusterShape([{"CPU": 2.0, "memory": 1e9}])
TWO_NODES = ClusterShape([{"CPU": 4.0}, {"CPU": 4.0}])


def workers(**options) -> Request:
    return worker_request(RayOptions(**options))


@pytest.mark.parametrize("shape, request_, match", [
    (TWO_CPUS, workers(cpus_per_worker=100), r"each training worker needs 100 CPU, but no node of the "
                                             r"cluster has that much \(the largest: 2 CPU\)"),
    (TWO_CPUS, workers(use_gpu=True), r"needs 1 CPU \+ 1 GPU, but no node .* --gpu needs a GPU on a node"),
    (TWO_CPUS, workers(num_workers=3), r"3 training workers of 1 CPU each, but the cluster's 1 node\(s\) hold at most 2"),
    (TWO_CPUS, workers(num_workers=2), r"leave 0 of the cluster's 2 CPUs, less than the 1 CPU\(s\) Ray Data's decode"),
    # A worker never spans nodes: 8 CPUs in all, but no node has 6.
    (TWO_NODES, workers(cpus_per_worker=6), r"no node of the cluster has that much \(the largest: 4 CPU"),
    (TWO_NODES, workers(num_workers=3, cpus_per_worker=3), r"hold at most 2 at once"),
])
def test_requests_the_cluster_can_never_hold_are_refused(shape, request_, match):
    with pytest.raises(InputError, match=match):
        refuse_unless_it_fits(request_, shape)


@pytest.mark.parametrize("shape, request_", [
    (TWO_CPUS, workers(num_workers=2, cpus_per_worker=0.5)),  # one CPU left for Ray Data
    (TWO_NODES, workers(num_workers=2, cpus_per_worker=3.5)),  # one per node, 1 CPU spare
    # Autoscaler v2 / KubeRay: a node type that holds the worker; the count is the autoscaler's.
    (ClusterShape([{"CPU": 8.0}], node_types=[{"CPU": 16.0}]), workers(num_workers=10, cpus_per_worker=16)),
    (ClusterShape([{"CPU": 8.0}], node_types=[{"CPU": 8.0, "GPU": 1.0}]), workers(use_gpu=True)),
    # Ray's v1 autoscaler (`ray up ray_cluster.yaml`) does not tell the driver its node types.
    (ClusterShape([{"CPU": 8.0}], autoscaler_types_unknown=True), workers(cpus_per_worker=100)),
])
def test_requests_that_fit_or_that_an_autoscaler_may_fit_pass(shape, request_):
    refuse_unless_it_fits(request_, shape)


def test_autoscaler_node_types_that_cannot_hold_a_worker_refuse_it():
    shape = ClusterShape([{"CPU": 8.0}], node_types=[{"CPU": 16.0}])
    with pytest.raises(InputError, match="no node type of the autoscaler of the cluster has that much"):
        refuse_unless_it_fits(workers(use_gpu=True), shape)


@pytest.mark.slow
def test_idml_train_ray_with_more_cpus_than_any_node_exits_2_at_once(tiny_dataset, tmp_path):
    """The issue's case, as a user types it (a new local Ray instance): it waited forever."""
    from ray_jobs.ray_helpers import TINY, env_without_ray_address

    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--ray", "--cpus-per-worker", "100",
                           "--set", *TINY, f"data.dataset={tiny_dataset}", "--output-dir", str(tmp_path / "run")],
                          env={**env_without_ray_address(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"},
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("idml: error:")]
    assert len(errors) == 1 and "each training worker needs 100 CPU" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    print(f"refused after {time.monotonic() - started:.1f} s (Ray start included)")


@pytest.mark.parametrize("report, autoscaling", [
    (None, False),  # no status (yet)
    ({"active_nodes": {"node_5e0f": 1}}, False),  # a local instance or `ray start` nodes: watched only
    ({"active_nodes": {"ray.head.default": 1}, "node_type_mapping": {"192.0.2.2": "node_5e0f"}}, False),
    ({"active_nodes": {"head": 1}, "node_type_mapping": {"10.0.0.1": "head"}}, True),  # ray up ray_cluster.yaml
])
def test_a_v1_autoscaler_is_known_by_its_config_node_types(monkeypatch, report, autoscaling):
    import json

    import ray.experimental.internal_kv as kv

    from pipelines._capacity import _v1_autoscaler_with_config

    status = json.dumps({"load_metrics_report": {}, **({"autoscaler_report": report} if report else {})})
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key: status.encode())
    assert _v1_autoscaler_with_config() is autoscaling


@pytest.mark.slow
def test_idml_index_build_with_gpu_actors_on_a_machine_without_gpus_exits_2(tmp_path):
    from ray_jobs.ray_helpers import env_without_ray_address
    from support import make_checkpoint, make_index_dataset

    corpus = make_index_dataset(tmp_path / "corpus", 8)
    checkpoint = make_checkpoint(tmp_path / "ck.pt")
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "index", "build", "--checkpoint", checkpoint,
                           "--corpus", corpus, "--index-dir", str(tmp_path / "idx"), "--gpu", "--no-mlflow"],
                          env=env_without_ray_address(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        pytest.skip("this machine has a GPU")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("idml: error:", "idml index: error:"))]
    assert len(errors) == 1 and "each embedding actor needs 1 CPU + 1 GPU" in errors[0], proc.stderr[-3000:]
    assert "--gpu needs a GPU on a node" in errors[0] and "Traceback" not in proc.stderr
