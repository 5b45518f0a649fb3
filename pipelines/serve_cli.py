"""``idml serve``: the search service (``pipelines.serve``) on a local Ray instance or a cluster,
until Ctrl-C. Ray is imported only when it starts (``pipelines.cli`` wires this in)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .serve import ServeOptions

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def add_serve_args(p: argparse.ArgumentParser) -> None:
    # Defaults of the service's own options are ServeOptions' (None here = not given).
    p.add_argument("--index-dir", required=True, help="folder holding the index versions (built by `idml index build`); "
                                                      "on a cluster, shared storage every replica reads")
    p.add_argument("--checkpoint", help="model that embeds query images: a path, a shared-storage URI or an MLflow "
                                        "model URI (models:/NAME@alias) (default: the checkpoint the published "
                                        "version's manifest records; its sha256 must match the manifest's)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address the HTTP proxy binds (default: 127.0.0.1, this machine only). The service has no "
                        "authentication: to expose it, put it behind a reverse proxy that authenticates rather than "
                        "binding 0.0.0.0")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default: {DEFAULT_PORT})")
    p.add_argument("--replicas", type=int, help="replicas, each with the model and the index in memory (default: 1)")
    p.add_argument("--cpus-per-replica", type=float, help="CPUs each replica reserves (default: 1)")
    p.add_argument("--poll-s", type=float, help="seconds between checks for a newly published index version (default: 1)")
    p.add_argument("--max-bytes", type=int, help="largest request body in bytes; larger ones get 413 (default: 16 MiB)")
    p.add_argument("--max-k", type=int, help="largest k a request may ask for (default: 100)")
    p.add_argument("--max-images", type=int, help="most images in one JSON request (default: 16)")
    p.add_argument("--refine", type=int, metavar="N",
                   help="lossy indexes (PQ, SQ): re-score N x k candidates by exact cosine, as `idml index query "
                        "--refine` (default: the served version's, as its recall was measured; 0 or 1: off)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")


SERVICE_OPTIONS = ("index_dir", "checkpoint", "replicas", "cpus_per_replica", "poll_s", "max_bytes", "max_k", "max_images",
                   "refine")


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """The ``ServeOptions`` of parsed ``idml serve`` arguments; a bad value is a ValueError naming its flag."""
    from pydantic import ValidationError

    from .serve import ServeOptions

    try:
        return ServeOptions(**{k: getattr(args, k) for k in SERVICE_OPTIONS if getattr(args, k) is not None})
    except ValidationError as e:
        raise ValueError("; ".join(f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}"
                                   for err in e.errors())) from None


def run_serve(args: argparse.Namespace) -> int:
    from ._ray import init_ray
    from .serve import APP_NAME, app, check_servable

    options = serve_options(args)
    version = check_servable(options)  # before Ray starts: nothing to serve is a one-line error
    local = not (args.address or os.environ.get("RAY_ADDRESS"))
    if local:
        _check_port_free(args.host, args.port)
    ray = init_ray(args.address, verbose=args.verbose)
    from ray import serve

    # A service is stopped with SIGTERM too (kill, systemd, a test): shut down as for Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app(options), name=APP_NAME, route_prefix="/")
        print(f"serving index {version} of {options.index_dir} at http://{args.host}:{args.port} "
              f"({options.replicas} replica(s); new versions are picked up within {options.poll_s:g}s). Ctrl-C stops.",
              flush=True)
        while True:
            time.sleep(3600)
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)  # the cluster's other Serve applications keep running


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
