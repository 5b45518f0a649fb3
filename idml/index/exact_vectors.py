"""Exact vectors beside lossy shards, to re-score candidates by exact cosine.

PQ and SQ codes approximate the vectors, so the scores an index with them returns are
approximations and its recall@10 vs exact search is capped by the code size whatever nprobe
is. Such a version (``IndexSpec.refine`` > 0) keeps, next to every shard index, its exact ``mu``
as a float32 ``.npy`` file (one row per row of the shard's embeddings), and a search fetches
refine x k candidates and orders them by exact cosine.

The files are memory-mapped: a query reads only its candidates' rows, never a whole Parquet
column, and the vectors stay on disk, outside the index's memory. faiss's ``IndexRefineFlat``
re-scores too, but holds every full vector in RAM, which would defeat ``--max-index-memory``
(and it cannot wrap shards that share one IVF coarse search).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from idml.errors import DamagedFileError

from .labels import split_labels


def vectors_name(shard_name: str) -> str:
    return f"{shard_name}.vectors.npy"


def write_vectors(mu: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(mu, np.float32), allow_pickle=False)
    os.replace(tmp, path)


def open_vectors(path: Path, count: int, dim: int) -> np.ndarray:
    """The (count, dim) float32 vectors of ``path``, memory-mapped; DamagedFileError when the
    file holds anything else."""
    try:
        vecs = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DamagedFileError(f"cannot read the exact vectors {path} ({e}); the file is damaged") from None
    if vecs.dtype != np.float32 or vecs.shape != (count, dim):
        raise DamagedFileError(f"{path} holds {vecs.dtype} vectors of shape {vecs.shape}, expected float32 "
                               f"({count}, {dim}); the file is damaged")
    return vecs


class ShardVectors:
    """Every shard's exact vectors, by shard number."""

    def __init__(self, by_shard: dict[int, np.ndarray], dim: int):
        self.by_shard = by_shard
        self.dim = dim

    @classmethod
    def open(cls, version_dir: Path, entries: list[dict[str, Any]], dim: int) -> "ShardVectors":
        """The vector files a manifest's shard ``entries`` list (the caller has checked their
        sizes and checksums)."""
        by_shard = {}
        for entry in entries:
            if not entry.get("vectors"):
                raise DamagedFileError(f"the manifest lists no exact vectors for shard {entry['shard']} of this "
                                       "lossy index; the version is damaged")
            by_shard[entry["shard"]] = open_vectors(Path(version_dir) / entry["vectors"], entry["count"], dim)
        return cls(by_shard, dim)

    def gather(self, labels: np.ndarray) -> np.ndarray:
        """Vectors of ``labels`` (any shape; zeros where a label is -1), shape ``labels.shape + (dim,)``."""
        flat = np.asarray(labels, np.int64).ravel()
        out = np.zeros((len(flat), self.dim), np.float32)
        shards, rows = split_labels(flat)
        valid = flat >= 0
        for shard in np.unique(shards[valid]):
            mask = valid & (shards == shard)
            out[mask] = self.by_shard[int(shard)][rows[mask]]  # reads only these rows of the file
        return out.reshape(*np.shape(labels), self.dim)

    def rescore(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` of each query's ``candidates`` (labels, -1 = none) by exact inner
        product: ``(scores, labels)`` like a faiss search, -inf / -1 where there is none."""
        scores = np.einsum("qd,qcd->qc", queries, self.gather(candidates))
        scores = np.where(candidates >= 0, scores, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)
