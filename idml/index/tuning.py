"""Tuning the search parameter of an index (nprobe for IVF, efSearch for HNSW; ``kinds``) for a
recall target within a latency budget, and measuring a query's latency."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..faiss_import import faiss
from .spec import IndexSpec

LATENCY_QUERIES = 32
# The least recall@10 the next nprobe/efSearch value must add for the tuning to go on below its
# target: 5 of the 2,560 neighbours the default 256-query sample checks.
PLATEAU_GAIN = 0.002


def set_search_param(index: faiss.Index, name: str | None, value: int) -> None:
    """Set ``nprobe`` (IVF) or ``efSearch`` (HNSW) on an index and everything it wraps (every
    shard of IndexShards, IDMaps); no-op for a value <= 0 or no parameter."""
    if name and value > 0:
        faiss.ParameterSpace().set_index_parameter(index, name, int(value))


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    set_search_param(index, "nprobe", nprobe)


def apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    set_search_param(index, spec.search_param, spec.search_value)


def query_latency_ms(index: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Median time of one query alone (what a search request waits), over up to LATENCY_QUERIES."""
    queries = np.ascontiguousarray(queries[:LATENCY_QUERIES], np.float32)
    if not len(queries):
        return float("nan")
    k = max(1, min(k, int(index.ntotal)))
    index.search(queries[:1], k)  # warm: page in mmapped lists, allocate
    times = []
    for q in range(len(queries)):
        t = time.perf_counter()
        index.search(queries[q:q + 1], k)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def search_values(spec: IndexSpec, start: int = 0) -> list[int]:
    """nprobe (powers of two up to nlist) or efSearch values tried by the tuning, from ``start``."""
    values = spec.kind.search_values(spec.nlist)
    if not values:
        return [0]
    return [v for v in values if v >= start] or [values[-1]]


@dataclass
class Tuning:
    value: int  # the chosen nprobe / efSearch (0: nothing to tune)
    recall: float
    queries: int
    query_ms: float | None  # None: not measured (exact search)
    reached: bool  # recall >= target within the latency budget
    tried: list[dict[str, float]]


def tune_search(measure: Callable[[int], tuple[float, int]], latency: Callable[[int], float], values: list[int],
                target: float, max_query_ms: float | None = None) -> Tuning:
    """The smallest value (values ascending) whose recall reaches ``target``; when the latency
    budget ``max_query_ms`` runs out first, the largest value within it (or the smallest value,
    if none is); when recall stops rising below the target (lossy codes cap it), the value where
    it stopped. ``measure(v)``: (recall, queries used); ``latency(v)``: ms per query."""
    tried: list[dict[str, float]] = []
    best = None
    for value in values:
        recall, used = measure(value)
        ms = latency(value)
        tried.append({"value": value, "recall": recall, "query_ms": ms})
        over = max_query_ms is not None and ms > max_query_ms
        if over and best is not None:
            break
        if best is not None and recall < target and recall - best[1] < PLATEAU_GAIN:
            break  # more only costs time: IVF4096,PQ64 on tight clusters went to nprobe 4096 (0.3x exact's speed) for 0.65
        best = (value, recall, used, ms)
        if over or recall >= target or math.isnan(recall):
            break
    value, recall, used, ms = best
    reached = recall >= target and (max_query_ms is None or ms <= max_query_ms)
    return Tuning(value, recall, used, ms, bool(reached), tried)
