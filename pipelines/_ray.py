"""Starting or joining Ray, the same way for every entrypoint."""

from __future__ import annotations

import copy
import logging
import os
import socket
import tempfile
from pathlib import Path

RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def init_ray(address: str | None = None, *, log_to_driver: bool = True, dashboard: bool = False,
             verbose: bool = False):
    """Ray, initialised once: joins ``address``, else ``$RAY_ADDRESS`` (set by ``ray job
    submit``), else starts a new local instance (with the dashboard when ``dashboard``: Ray
    Train's controller checks liveness through the state API it serves).

    Never Ray's own fallback, the cluster last recorded in ``/tmp/ray/ray_current_cluster``:
    a record left by a cluster that is gone makes ``ray.init()`` wait for it and then fail.

    A new local instance keeps Ray Data's own lines (every execution's start, plan and end, its
    "progress bars disabled" notices) in its log file, off the console, unless ``verbose``."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        local: dict = {}
        env_vars: dict[str, str] = {}
        if address == "local":
            local["include_dashboard"] = dashboard
            if dashboard:
                # Ray Train's PlacementGroupCleaner asks the state API whether the controller lives,
                # and without an address finds the cluster last recorded by `ray start`: a stale
                # record makes it fail, another live cluster makes it remove our placement group.
                # Name this instance's dashboard for every process of the job.
                port = _free_port()
                local["dashboard_port"] = port
                env_vars[API_SERVER_ENV] = os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
            if not verbose and RAY_DATA_LOGGING_ENV not in os.environ:
                # A file path: valid on this machine only, so only for an instance started here.
                os.environ[RAY_DATA_LOGGING_ENV] = _quiet_ray_data_logging_config()
                from ray.data._internal.logging import configure_logging

                configure_logging()  # this process imported ray.data before the variable was set
                env_vars[RAY_DATA_LOGGING_ENV] = os.environ[RAY_DATA_LOGGING_ENV]
            if env_vars:
                local["runtime_env"] = {"env_vars": env_vars}
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver, **local)
    return ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_ray_data_logging_config() -> str:
    """Ray Data's own default logging config with the console handler at ERROR."""
    import yaml
    from ray.data._internal.logging import DEFAULT_CONFIG

    config = copy.deepcopy(DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = "ERROR"
    path = Path(tempfile.gettempdir()) / f"idml-ray-data-logging-{os.getuid()}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)
