"""The cluster's MLflow server (scripts/mlflow_server.sh, run by ray_cluster.yaml's head) refuses
clients without the password and serves those with it."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from ray_jobs.ray_helpers import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mlflow_server.sh"
PASSWORD = "a-long-test-password"


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_PASSWORD": PASSWORD, "IDML_MLFLOW_AUTH_DIR": str(tmp / "auth"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_USERNAME", None)
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(["bash", str(SCRIPT), "127.0.0.1", str(port), f"sqlite:///{tmp / 'mlflow.db'}", str(tmp / "artifacts")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {(tmp / 'server.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(1)
    else:
        pytest.fail("mlflow server did not start in 120 s")
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
    log.close()


def test_requests_without_the_password_are_refused(server):
    api = f"{server}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(api) == 401
    assert _status(api, ("admin", "wrong-password-x")) == 401
    assert _status(api, ("admin", PASSWORD)) == 200


def test_clients_with_the_password_log_runs_and_register_models(server, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = MlflowClient(server)
    experiment = client.create_experiment("auth-check")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "x", 1.0)
    client.create_registered_model("auth-check-model")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-x")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a 401 is final
    with pytest.raises(MlflowException):
        MlflowClient(server).get_registered_model("auth-check-model")


def test_the_script_refuses_a_missing_password(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_PASSWORD"}
    out = subprocess.run(["bash", str(SCRIPT), "127.0.0.1", "1", "sqlite:///x.db", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "MLFLOW_TRACKING_PASSWORD" in out.stderr
