"""Whether a Ray cluster can ever hold a request (training workers, trials, embedding actors).

Ray waits, without a word and without end, for resources that no node has: ``--cpus-per-worker
100`` on an 8-CPU machine, ``--gpu`` where there is no GPU. The driver refuses such a request
before Ray waits for it (one line, exit 2), by the rule:

- each worker (a resource bundle) must fit on ONE node: Ray never splits a worker across nodes;
- on a cluster of fixed size, all workers must fit at once, and ``spare_cpus`` must be left
  beside them (Ray Data's read and decode tasks need a CPU, or the first batch never comes);
- a cluster with an autoscaler may grow: a worker must fit on a live node or on one of the node
  types the autoscaler may start (Ray's cluster config: autoscaler v2, KubeRay), and the count
  is not checked (the autoscaler adds nodes). Ray's v1 autoscaler (``ray up ray_cluster.yaml``)
  does not tell the driver its node types: there nothing is refused.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

from idml.errors import InputError

log = logging.getLogger(__name__)

# Ray's own rounding of fractional resources is to 1e-4; below that a request "fits".
_EPSILON = 1e-4
# Without a cluster config the v1 autoscaler only watches the nodes: it names their types
# node_<id>, its head type ray.head.default (a `ray up` config naming its head type so too, with no
# worker up, reads as watched only: ray_cluster.yaml's is "head").
_WATCH_ONLY_NODE_TYPE = "node_"
_WATCH_ONLY_HEAD_TYPE = "ray.head.default"


@dataclass(frozen=True)
class ClusterShape:
    """What a cluster can hold: its live nodes and the node types an autoscaler may add."""

    nodes: list[dict[str, float]]
    node_types: list[dict[str, float]] = field(default_factory=list)
    autoscaler_types_unknown: bool = False  # Ray's v1 autoscaler: it may add nodes of types not known here

    @property
    def autoscales(self) -> bool:
        return bool(self.node_types) or self.autoscaler_types_unknown


@dataclass(frozen=True)
class Request:
    """``count`` workers of ``bundle`` resources each, and CPUs to leave free beside them."""

    what: str  # "training worker", "embedding actor": named in the refusal
    bundle: dict[str, float]
    count: int
    spare_cpus: float = 0.0
    spare_why: str = ""  # what the spare CPUs are for (named in the refusal)
    fix: str = ""  # the flags or keys that change the request


def cluster_shape() -> ClusterShape:
    """The connected cluster's shape (``ray.init`` already called)."""
    import ray

    nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    return ClusterShape(nodes, _autoscaler_node_types(), _v1_autoscaler_with_config())


def _autoscaler_node_types() -> list[dict[str, float]]:
    """Resources of the node types an autoscaler (v2, KubeRay) reports to Ray and may start."""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None:
        return []
    return [{k: float(v) for k, v in group.resources.items()} for group in config.node_group_configs
            if group.max_count != 0 and (group.max_count == -1 or group.max_count > group.min_count)]


def _v1_autoscaler_with_config() -> bool:
    """Whether Ray's v1 autoscaler runs with a cluster config (``ray up``): its status names node
    types of that config; without one (``ray start``, a local instance) it only watches the nodes."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        status = json.loads(_internal_kv_get(DEBUG_AUTOSCALING_STATUS) or b"{}")
    except (ValueError, TypeError):
        return False
    report = status.get("autoscaler_report") or {}
    types = set(report.get("active_nodes") or {}) | set((report.get("node_type_mapping") or {}).values())
    return any(not t.startswith(_WATCH_ONLY_NODE_TYPE) and t != _WATCH_ONLY_HEAD_TYPE for t in types)


def refuse_unless_it_fits(request: Request, shape: ClusterShape | None = None) -> None:
    """Raise ``InputError`` when ``shape`` (default: the connected cluster) can never hold ``request``."""
    shape = shape or cluster_shape()
    if shape.autoscaler_types_unknown:
        log.info("an autoscaler may add nodes for %d %s(s) of %s", request.count, request.what, _describe(request.bundle))
        return
    fix = f"; {request.fix}" if request.fix else ""
    if not any(_holds(node, request.bundle) for node in shape.nodes + shape.node_types):
        largest = max(shape.nodes + shape.node_types, key=lambda n: n.get("CPU", 0.0), default={})
        where = "node type of the autoscaler" if shape.node_types else "node"
        raise InputError(f"each {request.what} needs {_describe(request.bundle)}, but no {where} of the cluster has "
                         f"that much (the largest: {_describe(largest, request.bundle)}); Ray would wait for it "
                         f"forever{fix}")
    if shape.autoscales:
        return
    placed = sum(_how_many(node, request.bundle) for node in shape.nodes)
    if placed < request.count:
        raise InputError(f"{request.count} {request.what}s of {_describe(request.bundle)} each, but the cluster's "
                         f"{len(shape.nodes)} node(s) hold at most {placed} at once; Ray would wait for the rest "
                         f"forever{fix}")
    left = sum(n.get("CPU", 0.0) for n in shape.nodes) - request.count * request.bundle.get("CPU", 0.0)
    if left + _EPSILON < request.spare_cpus:
        raise InputError(f"{request.count} {request.what}s x {request.bundle.get('CPU', 0.0):g} CPUs leave {max(left, 0):g} "
                         f"of the cluster's {left + request.count * request.bundle.get('CPU', 0.0):g} CPUs, less than the "
                         f"{request.spare_cpus:g} {request.spare_why}; it would wait forever{fix}")


def _holds(node: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + _EPSILON >= v for k, v in bundle.items() if v > 0)


def _how_many(node: dict[str, float], bundle: dict[str, float]) -> int:
    counts = [math.floor((node.get(k, 0.0) + _EPSILON) / v) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 0


def _describe(resources: dict[str, float], keys: dict[str, float] | None = None) -> str:
    names = [k for k in (keys or resources) if (keys or resources)[k] > 0]
    return " + ".join(f"{resources.get(k, 0.0):g} {k}" for k in names) or "nothing"
