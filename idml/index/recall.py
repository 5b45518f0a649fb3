"""Recall of the approximate index against exact search, on a sample of stored vectors.

The exact neighbours of the sample are computed once per ``build`` (streaming over the shards)
and kept with the version; ``update`` only drops neighbours that were removed or changed and
merges in exact neighbours among the new vectors, so an update never repeats the exact search
over the whole corpus. ``floor`` is the lowest score of the original exact list: any vector not
in the list scores at most that, so list entries scoring >= floor are certainly the true top.
A query's own id is excluded on both sides (it would be a free hit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..faiss_import import faiss

# Exact neighbours kept per query: enough for later updates to remove some and keep >= k.
GT_DEPTH = 50


@dataclass
class RecallSample:
    query_ids: np.ndarray  # (nq,) str
    queries: np.ndarray  # (nq, d) float32
    gt_ids: np.ndarray  # (nq, depth) str, "" where there is no neighbour
    gt_scores: np.ndarray  # (nq, depth) float32, -inf where there is no neighbour
    floor: np.ndarray  # (nq,) float32

    @classmethod
    def from_exact(cls, query_ids, queries, scores, ids, *, complete: bool) -> "RecallSample":
        """``scores``/``ids``: exact top-(depth+1) of each query over everything (self included);
        ``complete``: the lists hold every stored vector."""
        query_ids = np.asarray(query_ids, dtype=str)
        ids = np.asarray(ids, dtype=str)
        scores = np.asarray(scores, np.float32)
        floor = np.full(len(query_ids), -np.inf, np.float32)
        if not complete and scores.shape[1]:
            floor = scores[:, -1].copy()
        sample = cls(query_ids, np.asarray(queries, np.float32), np.zeros((len(query_ids), 0), str),
                     np.zeros((len(query_ids), 0), np.float32), floor)
        return sample.merged(scores, ids)

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, query_ids=self.query_ids, queries=self.queries, gt_ids=self.gt_ids,
                     gt_scores=self.gt_scores, floor=self.floor)

    @classmethod
    def load(cls, path: Path) -> "RecallSample":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["query_ids"], z["queries"], z["gt_ids"], z["gt_scores"], z["floor"])

    def __len__(self) -> int:
        return len(self.query_ids)

    def without(self, stale_ids) -> "RecallSample":
        """Drop neighbours whose ids are no longer indexed with the same content."""
        stale = np.isin(self.gt_ids, np.asarray(list(stale_ids), dtype=str)) if len(stale_ids) else np.zeros(self.gt_ids.shape, bool)
        scores = np.where(stale, -np.inf, self.gt_scores).astype(np.float32)
        ids = np.where(stale, "", self.gt_ids)
        return RecallSample(self.query_ids, self.queries, ids, scores, self.floor)._sorted()

    def merged(self, scores: np.ndarray, ids: np.ndarray) -> "RecallSample":
        """Add exact neighbours among new vectors (their top-(depth+1) per query)."""
        ids = np.asarray(ids, dtype=str)
        scores = np.where(ids == "", -np.inf, np.asarray(scores, np.float32))
        scores = np.where(ids == self.query_ids[:, None], -np.inf, scores)
        ids = np.where(np.isneginf(scores), "", ids)
        all_ids = np.concatenate([self.gt_ids, ids], axis=1)
        all_scores = np.concatenate([self.gt_scores, scores], axis=1)
        return RecallSample(self.query_ids, self.queries, all_ids, all_scores, self.floor)._sorted()

    def _sorted(self) -> "RecallSample":
        order = np.argsort(-self.gt_scores, axis=1, kind="stable")[:, :GT_DEPTH]
        return RecallSample(self.query_ids, self.queries, np.take_along_axis(self.gt_ids, order, 1),
                            np.take_along_axis(self.gt_scores, order, 1), self.floor)

    def usable(self, k: int) -> np.ndarray:
        """Queries whose exact top-k is certain."""
        certain = (self.gt_ids != "") & (self.gt_scores >= self.floor[:, None])
        return certain.sum(axis=1) >= k

    def recall(self, found_ids: np.ndarray, k: int) -> tuple[float, int]:
        """Mean |found top-k ∩ exact top-k| / k over usable queries; ``found_ids`` (nq, >= k+1)
        may contain the query itself, which is skipped. Returns (recall, queries used)."""
        use = self.usable(k)
        hits = []
        for q in np.flatnonzero(use):
            found = [i for i in found_ids[q] if i and i != self.query_ids[q]][:k]
            hits.append(len(set(found) & set(self.gt_ids[q, :k])) / k)
        return (float(np.mean(hits)) if hits else float("nan")), int(use.sum())


class ExactTopK:
    """Exact inner-product top-k of ``queries`` over vectors added part by part (one part in
    memory at a time). Missing neighbours have label -1 and score -inf."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = np.ascontiguousarray(queries, np.float32)
        self.k = k
        self.heap = faiss.ResultHeap(len(self.queries), k, keep_max=True) if len(self.queries) else None

    def add(self, vecs: np.ndarray, labels: np.ndarray) -> None:
        if self.heap is None or not len(vecs):
            return
        dist, idx = faiss.knn(self.queries, np.ascontiguousarray(vecs, np.float32), min(self.k, len(vecs)),
                              metric=faiss.METRIC_INNER_PRODUCT)
        self.heap.add_result(dist, np.where(idx >= 0, np.asarray(labels)[np.maximum(idx, 0)], -1))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.heap is None:
            return np.zeros((0, self.k), np.float32), np.zeros((0, self.k), np.int64)
        self.heap.finalize()
        return self.heap.D, self.heap.I


def exact_topk(queries: np.ndarray, parts, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``ExactTopK`` over an iterable of (vectors, labels)."""
    acc = ExactTopK(queries, k)
    for vecs, labels in parts:
        acc.add(vecs, labels)
    return acc.result()
