"""Building a version's shards from the shard plan: the samples drawn on the way (recall queries,
training vectors), the trained template, and every shard's files (embeddings, faiss index and,
for lossy codes, exact vectors)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..faiss_import import faiss
from .exact_vectors import open_vectors, vectors_name, write_vectors
from .faiss_io import read_index, write_index_atomic
from .labels import labels_for
from .parent import ParentVersion
from .partitions import read_vectors, vectors, write_embeddings
from .recall import GT_DEPTH, ExactTopK, RecallSample
from .shard_plan import ShardPlan
from .shards import build_shard, train_index
from .spec import IndexSpec
from .store import link_or_copy

RECALL_SAMPLE_NAME = "recall_sample.npz"
TRAINED_NAME = "trained.faiss"


@dataclass
class Samples:
    queries: np.ndarray  # recall queries: stored vectors
    query_ids: np.ndarray | None  # update: the parent's; build: None until the shards name them
    query_labels: np.ndarray | None  # build: the queries' labels
    train: np.ndarray | None  # build: the training sample


@dataclass
class BuiltShards:
    exact: ExactTopK  # exact neighbours of the recall queries among the new vectors
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # reused files: the parent's checksums
    entries: list[dict[str, Any]] = field(default_factory=list)  # the manifest's shard entries
    ids_by_shard: dict[int, np.ndarray] = field(default_factory=dict)
    indexes: list[Any] = field(default_factory=list)
    vectors: dict[int, np.ndarray] = field(default_factory=dict)  # exact, memory-mapped (lossy codes only)


def draw_samples(spec: IndexSpec, plan: list[ShardPlan], recall_sample: int, parent: ParentVersion | None) -> Samples:
    """One pass over the new shards: recall queries (build; an update, ``parent`` given, keeps its
    parent's) and the training sample (build), drawn uniformly."""
    build = parent is None
    n = sum(p.count for p in plan)
    rng = np.random.default_rng(spec.seed)
    # An exact index's recall is 1 by construction, so it needs no sample.
    query_rows = (np.sort(rng.choice(n, size=min(n, recall_sample), replace=False))
                  if build and not spec.kind.exact else np.zeros(0, int))
    train_rows = (np.sort(rng.choice(n, size=min(n, spec.train_size), replace=False))
                  if build and spec.train_size else np.zeros(0, int))
    queries, query_labels, train, start = [], [], [], 0
    for p in plan:
        q = query_rows[(query_rows >= start) & (query_rows < start + p.count)] - start
        tr = train_rows[(train_rows >= start) & (train_rows < start + p.count)] - start
        if len(q) or len(tr):
            mu = read_vectors(p.src_parquet)
            if p.rows is not None:
                mu = mu[p.rows]
            queries.append(mu[q])
            query_labels.append(labels_for(p.shard, p.count)[q])
            train.append(mu[tr])
        start += p.count
    if not build:
        parent_sample = RecallSample.load(parent.dir / RECALL_SAMPLE_NAME)
        return Samples(parent_sample.queries, parent_sample.query_ids, None, None)
    return Samples(np.concatenate(queries) if queries else np.zeros((0, spec.dim), np.float32), None,
                   np.concatenate(query_labels) if query_labels else np.zeros(0, np.int64),
                   np.concatenate(train) if train else None)


def trained_index(spec: IndexSpec, sample: np.ndarray | None, version_dir: Path, *, parent: ParentVersion | None,
                  work_dir: Path, progress: Callable[[str], None]) -> faiss.Index | None:
    """The version's trained template (``trained.faiss``): an update's parent's; a build's trained
    on ``sample`` once per staging folder (``work_dir``), so a redone finish does not train again."""
    if spec.kind.exact:
        return None
    path = version_dir / TRAINED_NAME
    if parent is not None:
        link_or_copy(parent.dir / TRAINED_NAME, path)
        return read_index(path)
    cached = work_dir / f"trained-{spec.factory}-{spec.train_size}-{spec.niter}-{spec.seed}.faiss"
    if not cached.is_file():
        if spec.train_size:
            progress(f"training {spec.factory} on {len(sample)} vectors")
        write_index_atomic(train_index(sample, spec), cached)
    link_or_copy(cached, path)
    return read_index(path)


def write_shards(plan: list[ShardPlan], spec: IndexSpec, trained, version_dir: Path, queries: np.ndarray,
                 timings: dict[str, float], parent: ParentVersion | None) -> BuiltShards:
    """Each planned shard's embeddings and faiss index in ``version_dir`` (and, for lossy codes,
    its exact vectors); exact neighbours of the recall queries among the new vectors are gathered
    on the way."""
    out = BuiltShards(exact=ExactTopK(queries, GT_DEPTH + 1))
    timings["exact_seconds"] = 0.0
    t = time.time()
    for p in plan:
        rel_parquet, rel_index = f"shards/{p.name}.parquet", f"shards/{p.name}.faiss"
        # Only a search that re-scores (refine > 1) reads them: with refine 0 (an exact index, a
        # lossy one built with --refine 0, or an update of either) there are none to write.
        rel_vectors = f"shards/{vectors_name(p.name)}" if spec.refine > 1 else None
        out_parquet, out_index = version_dir / rel_parquet, version_dir / rel_index
        if p.source == "reused":
            link_or_copy(p.src_parquet, out_parquet)
            link_or_copy(p.src_index, out_index)
            if rel_vectors:
                link_or_copy(p.src_vectors, version_dir / rel_vectors)
            for rel in filter(None, (rel_parquet, rel_index, rel_vectors)):
                out.files[rel] = parent.manifest["files"][rel]
            table = pq.read_table(out_parquet, columns=["id"])
        else:
            if p.rows is None:
                link_or_copy(p.src_parquet, out_parquet)
            else:
                write_embeddings(out_parquet, pq.read_table(p.src_parquet).take(pa.array(p.rows)))
            table = pq.read_table(out_parquet, columns=["id", "mu"])
            mu = vectors(table, "mu")
            spec.kind.write_shard(build_shard(mu, p.shard, spec, trained), out_index)
            if rel_vectors:
                write_vectors(mu, version_dir / rel_vectors)
            if p.source == "new":
                t_exact = time.time()
                out.exact.add(mu, labels_for(p.shard, len(mu)))
                timings["exact_seconds"] += time.time() - t_exact
            del mu
        # IVF shards are memory-mapped: the build never holds the whole index in RAM.
        out.indexes.append(spec.kind.open_shard(out_index, trained))
        if rel_vectors:
            out.vectors[p.shard] = open_vectors(version_dir / rel_vectors, p.count, spec.dim)
        out.ids_by_shard[p.shard] = table.column("id").to_numpy(zero_copy_only=False).astype(str)
        out.entries.append({"shard": p.shard, "count": p.count, "source": p.source,
                            "embeddings": rel_parquet, "index": rel_index,
                            **({"vectors": rel_vectors} if rel_vectors else {})})
    timings["shards_seconds"] = time.time() - t - timings["exact_seconds"]
    return out
