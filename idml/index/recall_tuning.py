"""Measuring a new version's recall@10 against exact search, as the searcher delivers it (lossy
candidates re-scored by exact cosine), and tuning nprobe (IVF) or efSearch (HNSW) for the target
recall within the latency budget. The recall sample is saved with the version: ``verify`` and
the next update use it again."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from .combined import CombinedIndex, combine
from .exact_vectors import ShardVectors
from .labels import split_labels
from .parent import ParentVersion
from .recall import GT_DEPTH, RecallSample
from .shard_build import RECALL_SAMPLE_NAME, BuiltShards, Samples
from .spec import IndexSpec
from .tuning import Tuning, query_latency_ms, search_values, set_search_param, tune_search

RECALL_K = 10


def measure_recall(shards: BuiltShards, spec: IndexSpec, trained, samples: Samples, from_parent: pa.Table,
                   n_vectors: int, version_dir: Path, *, parent: ParentVersion | None,
                   progress: Callable[[str], None]) -> Tuning:
    """recall@10 of the combined index against exact search and its query latency, nprobe or
    efSearch tuned; ``parent``: the version an update starts from (None for a build)."""
    vectors = ShardVectors(shards.vectors, spec.dim) if shards.vectors else None
    combined = combine(shards.indexes, spec, trained, vectors=vectors)
    scores, labels = shards.exact.result()
    query_ids = samples.query_ids
    if query_ids is None:  # build: the queries are stored vectors, named once all shards are known
        query_ids = labels_to_ids(samples.query_labels, shards.ids_by_shard)
    found = labels_to_ids(labels, shards.ids_by_shard)
    if parent is None:
        sample = RecallSample.from_exact(query_ids, samples.queries, scores, found, complete=n_vectors <= GT_DEPTH + 1)
    else:
        sample = _updated_sample(parent, from_parent, scores, found)
    tuning = _tune(combined, spec, sample, shards.ids_by_shard, from_value=spec.search_value if parent else 0,
                   progress=progress)
    sample.save(version_dir / RECALL_SAMPLE_NAME)
    return tuning


def _updated_sample(parent: ParentVersion, from_parent: pa.Table, scores: np.ndarray, ids: np.ndarray) -> RecallSample:
    """The parent's sample, minus neighbours that are gone, plus those among the new vectors."""
    sample = RecallSample.load(parent.dir / RECALL_SAMPLE_NAME)
    # Exact neighbours that are not indexed any more (removed, or changed content) go.
    kept = set(from_parent.column("id").to_pylist())
    old_ids = set(np.unique(sample.gt_ids).tolist()) - {""}
    sample = sample.without(old_ids - kept)
    return sample.merged(scores, ids)


def _tune(combined: CombinedIndex, spec: IndexSpec, sample: RecallSample, ids_by_shard, *, from_value: int,
          progress: Callable[[str], None]) -> Tuning:
    """recall@10 of the index on the sample and its single-query latency; with nprobe_auto, the
    smallest nprobe (IVF) or efSearch (HNSW) from ``from_value`` reaching target_recall within
    max_query_ms."""
    if spec.kind.exact:
        return Tuning(0, 1.0, 0, None, True, [])  # exact search: nothing to measure

    def apply(value: int) -> None:
        set_search_param(combined.index, spec.search_param, value)

    def measure(value: int) -> tuple[float, int]:
        apply(value)
        _, labels = combined.search(sample.queries, RECALL_K + 1)
        return sample.recall(labels_to_ids(labels, ids_by_shard), RECALL_K)

    def latency(value: int) -> float:
        apply(value)
        return query_latency_ms(combined, sample.queries, RECALL_K)

    values = search_values(spec, from_value) if spec.nprobe_auto else [spec.search_value]
    tuning = tune_search(measure, latency, values, spec.target_recall, spec.max_query_ms)
    spec.kind.set_tuned_value(spec, tuning.value)
    apply(tuning.value)
    if not tuning.reached and not math.isnan(tuning.recall):
        budget = f" within {spec.max_query_ms:g} ms/query" if spec.max_query_ms else ""
        progress(f"note: recall@{RECALL_K} {tuning.recall:.3f} is below the target {spec.target_recall:g}{budget} "
                 f"({spec.factory}, {spec.search_param or 'nothing to tune'} {tuning.value or ''}); "
                 "a larger index (more bytes per vector) or a larger --max-query-ms would reach it")
    return tuning


def labels_to_ids(labels: np.ndarray, ids_by_shard: dict[int, np.ndarray]) -> np.ndarray:
    labels = np.asarray(labels, np.int64)
    out = np.full(labels.shape, "", dtype=object)
    shards, rows = split_labels(labels)
    valid = labels >= 0
    for shard in np.unique(shards[valid]):
        mask = valid & (shards == shard)
        out[mask] = ids_by_shard[int(shard)][rows[mask]]
    return out.astype(str)
