"""A two-node cluster on one machine (``ray start --head`` + ``ray start --address``, token
authentication on, shared storage in a temp folder); the training job goes in with
``ray job submit --working-dir`` and finishes.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from ray_jobs.ray_helpers import REPO, TINY, RayCluster, mlflow_runs
from support import make_class_dataset


@pytest.mark.slow
def test_job_submitted_to_a_two_node_cluster_finishes(tmp_path):
    data = make_class_dataset(tmp_path / "data")
    shared = tmp_path / "shared"  # the "network storage" both nodes see
    cluster = RayCluster(tmp_path / "ray", cpus=1, dashboard=True, token=secrets.token_hex(32))
    try:
        cluster.add_node(cpus=2)
        ray = str(REPO / ".venv/bin/ray")
        count = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"  # RAY_ADDRESS is set
        nodes = subprocess.run([sys.executable, "-c", count], env=cluster.env, capture_output=True, text=True, timeout=120)
        assert nodes.stdout.strip().splitlines()[-1:] == ["2"], nodes.stdout + nodes.stderr

        uri = f"sqlite:///{shared / 'mlflow.db'}"
        entrypoint = [sys.executable, "-m", "pipelines.cli", "-v", "train", "--ray", "--set", *TINY, f"data.dataset={data}",
                      "--output-dir", str(shared / "out"), "--storage-path", str(shared / "ray"),
                      "--run-name", "multinode", "--num-workers", "2", "--cpus-per-worker", "0.5"]
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri}}
        cmd = [ray, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
        job = subprocess.run(cmd, env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert job.returncode == 0, job.stdout[-5000:] + job.stderr[-3000:]
        assert "recall@1" in job.stdout and "succeeded" in job.stdout
    finally:
        cluster.stop()

    assert json.loads((shared / "out" / "metrics.json").read_text())["history"][-1]["epoch"] == 1
    assert (shared / "ray" / "multinode" / "checkpoint_epoch_0001" / "last.pt").exists()
    _, runs = mlflow_runs(uri)
    assert [(r.info.run_name, r.info.status) for r in runs] == [("multinode", "FINISHED")]
