"""Starting or joining Ray, the same way for every entrypoint."""

from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None, *, log_to_driver: bool = True, dashboard: bool = False):
    """Ray, initialised once: joins ``address``, else ``$RAY_ADDRESS`` (set by ``ray job
    submit``), else starts a new local instance (with the dashboard when ``dashboard``: Ray
    Train's controller checks liveness through the state API it serves).

    Never Ray's own fallback, the cluster last recorded in ``/tmp/ray/ray_current_cluster``:
    a record left by a cluster that is gone makes ``ray.init()`` wait for it and then fail."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        local = {"include_dashboard": dashboard} if address == "local" else {}
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver, **local)
    return ray
