"""With token authentication (as ray_cluster.yaml starts every node), the dashboard and its job
server refuse requests without the token: why ray_cluster.yaml may let the dashboard listen on
every interface of the head (worker nodes and the SSH tunnel reach it) behind the cloud's
private network."""

from __future__ import annotations

import secrets
import urllib.error
import urllib.request

from .ray_helpers import RayCluster


def _status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_dashboard_refuses_requests_without_the_token(tmp_path):
    token = secrets.token_hex(32)
    cluster = RayCluster(tmp_path / "ray", cpus=1, dashboard=True, token=token)
    try:
        jobs = f"{cluster.dashboard_url}/api/jobs/"
        assert _status(jobs) in (401, 403)
        assert _status(jobs, "not-the-token") in (401, 403)
        assert _status(jobs, token) == 200
    finally:
        cluster.stop()
