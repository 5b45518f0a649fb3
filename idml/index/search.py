"""Querying a published index version: top-k neighbours with similarities and uncertainties,
optionally re-ranked by the introspective distance."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from . import combined
from .combined import merge_ondisk
from .faiss_io import read_index
from .labels import labels_for, split_labels
from .spec import IndexSpec
from .exact_vectors import ShardVectors
from .partitions import vectors
from .store import IndexStore, merge_sources
from idml.evaluation.confidence import Confidence
from idml.integrity import StatWatch

log = logging.getLogger(__name__)

COMBINE_MODES = ("auto", "shards", "ondisk")


@dataclass
class Hit:
    id: str
    similarity: float  # cosine, or the introspective similarity 1 - D/2 when re-ranked
    cosine: float
    uncertainty: float  # the result's ||sigma||^2


@dataclass
class QueryResult:
    query: str
    uncertainty: float  # the query's ||sigma||^2
    hits: list[Hit]
    # P(the top-1 hit is right): the model's confidence (idml.evaluation.confidence, fitted on its
    # validation split) from the query's uncertainty and its top-1 and top-2 cosines; None when
    # the model has none (trained without a validation split, or before confidences existed)
    confidence: float | None = None
    abstained: bool = False  # below min_confidence: no hits are returned


class IndexSearcher:
    """All shards of one version (the published one by default) searched as one index.

    ``combine``: ``shards`` searches the shard files together (IndexShards / IndexShardsIVF);
    ``ondisk`` (IVF only) merges their lists once per version into ``cache/<version>/`` (one
    memory-mapped file, as fast as one unsharded index; a sharded IVF search is 1.6-1.9x
    slower; its checksums are checked at every open, a damaged copy is merged again); ``auto``
    is ``ondisk`` for an IVF index of several shards (``shards`` where the cache cannot be
    written, with a warning), else ``shards``. ``gpu``: search a Flat index on
    the GPUs faiss sees (``combined.combine``). ``refine``: for lossy codes (PQ, SQ), how many
    candidates per result are re-scored by exact cosine (default: the version's, as its recall
    was measured; 0 or 1: off, scores are the codes' approximations).
    """

    def __init__(self, index_dir: str | os.PathLike, version: str | None = None, *, combine: str = "auto",
                 nprobe: int | None = None, gpu: bool = False, refine: int | None = None):
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {', '.join(COMBINE_MODES)}, got {combine!r}")
        if refine is not None and refine < 0:
            raise ValueError(f"refine must be >= 0 (0 or 1: off), got {refine}")
        self.store = IndexStore(index_dir)
        version = self.store.resolve_version(version)
        # Stat before the check, so that a write after it shows in ``changed_files``.
        self.watch = StatWatch()
        for rel in self.store.read_manifest(version).get("files", {}):
            self.watch.add(self.store.version_dir(version) / rel)
        # Sizes and checksums once at open, not per query: a damaged file is refused, never searched.
        self.version, self.manifest = self.store.checked_manifest(version, purpose="query")
        self.dir = self.store.version_dir(self.version)
        self.spec = IndexSpec.from_dict(self.manifest["faiss"])
        if nprobe is not None:
            if self.spec.search_param != "nprobe":
                log.info("--nprobe has no effect on a %s index (not IVF)", self.spec.factory)
            elif not 1 <= nprobe <= self.spec.nlist:
                raise ValueError(f"nprobe={nprobe} must be between 1 and nlist={self.spec.nlist}")
            else:
                self.spec.nprobe = nprobe
        if refine is not None:
            if not self.spec.refine:
                log.info("--refine has no effect on this %s index: its scores are exact, or it was built "
                         "without exact vectors (--refine 0, or before re-scoring existed; rebuild it to re-score)",
                         self.spec.factory)
            else:
                self.spec.refine = refine
        recorded = self.manifest["checkpoint"].get("confidence")
        self.confidence = Confidence.from_dict(recorded) if recorded else None
        self.ids: dict[int, np.ndarray] = {}
        self.uncertainty: dict[int, np.ndarray] = {}
        for entry in self.manifest["shards"]:
            table = pq.read_table(self.dir / entry["embeddings"], columns=["id", "uncertainty"])
            self.ids[entry["shard"]] = table.column("id").to_numpy(zero_copy_only=False).astype(str)
            self.uncertainty[entry["shard"]] = table.column("uncertainty").to_numpy()
        shard_paths = [self.dir / e["index"] for e in self.manifest["shards"]]
        vectors = ShardVectors.open(self.dir, self.manifest["shards"], self.spec.dim) if self.spec.refine > 1 else None
        if combine == "ondisk" and gpu:
            raise ValueError("--gpu searches exact (Flat) indexes in memory, not a merged on-disk IVF")
        merge = combine == "ondisk" or (combine == "auto" and self.spec.kind.shared_quantizer and len(shard_paths) > 1
                                        and not gpu)
        self.index = None
        if merge:
            try:
                merged_dir = self.store.merged_dir(self.version)
                self.index = merge_ondisk(self.dir / "trained.faiss", shard_paths, merged_dir, self.spec,
                                          vectors=vectors, built_from=merge_sources(self.manifest))
                found, expected = self.index.ntotal, sum(int(e["count"]) for e in self.manifest["shards"])
                if found != expected:  # a last guard: sealed by a merge of other shards than these
                    self.index = None
                    raise RuntimeError(f"{merged_dir} holds {found} vectors, version {self.version} has {expected}; "
                                       "delete that folder to merge it again")
            except (OSError, RuntimeError) as e:  # e.g. a read-only index folder
                if combine == "ondisk":
                    raise
                log.warning("searching the %d shards of %s one by one (slower): cannot merge them into %s: %s",
                            len(shard_paths), self.version, self.store.cache_dir, e)
        if self.index is None:
            trained = read_index(self.dir / "trained.faiss") if self.spec.kind.shared_quantizer else None
            self.index = combined.combine([self.spec.kind.open_shard(p, trained) for p in shard_paths],
                                    self.spec, trained, gpu=gpu, vectors=vectors)
        for path, st in self.index.files.items():  # derived files: no other version links them
            self.watch.add(path, st, ctime=True)
        self._where: dict[str, int] | None = None

    def changed_files(self) -> list[str]:
        """Files this searcher reads that changed on disk since they were checked (stat only: cheap
        enough per request); answers read from them may be damaged until it is opened again."""
        return self.watch.changed()

    @property
    def uncertainty_weight(self) -> float:
        """lambda of the checkpoint the index was built with."""
        return float(self.manifest["checkpoint"].get("uncertainty_weight", 0.0))

    def __len__(self) -> int:
        return self.index.ntotal

    def lookup(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Stored ``(mu, uncertainty)`` of indexed images, by id."""
        if self._where is None:
            self._where = {}
            for shard, shard_ids in self.ids.items():
                labels = labels_for(shard, len(shard_ids))
                self._where.update(zip(shard_ids.tolist(), labels.tolist()))
        missing = [i for i in ids if i not in self._where]
        if missing:
            raise ValueError(f"id(s) not in index version {self.version}: {missing[:5]}; check the ids or query by image")
        shards, rows = split_labels(np.array([self._where[i] for i in ids], np.int64))
        mu = np.zeros((len(ids), self.spec.dim), np.float32)
        u = np.zeros(len(ids), np.float32)
        by_shard = {e["shard"]: e for e in self.manifest["shards"]}
        for shard in np.unique(shards):
            mask = shards == shard
            table = pq.read_table(self.dir / by_shard[int(shard)]["embeddings"], columns=["mu", "uncertainty"])
            mu[mask] = vectors(table.take(rows[mask]))
            u[mask] = table.column("uncertainty").to_numpy()[rows[mask]]
        return mu, u

    def search(self, mu: np.ndarray, uncertainty: np.ndarray, k: int = 10, *, rerank: bool = False,
               rerank_k: int | None = None, uncertainty_weight: float | None = None,
               exclude: Sequence[str | None] | None = None, names: Sequence[str] | None = None,
               min_confidence: float | None = None) -> list[QueryResult]:
        """Top-``k`` neighbours of each query (lossy candidates re-scored first: ``refine``).
        ``rerank``: take ``rerank_k`` (default max(10k, 100)) candidates by cosine, then order
        them by the introspective distance
        D = alpha * exp(-lambda * beta / alpha) (alpha = 2 - 2cos, beta = u_query + u_result)
        and report s = 1 - D/2. ``exclude``: an id to leave out per query (itself). Each result
        carries the model's ``confidence`` that its top-1 hit is right (when the model has one);
        ``min_confidence``: below it a query abstains (no hits)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if min_confidence is not None:
            if not 0 <= min_confidence <= 1:
                raise ValueError(f"min_confidence must be a probability in [0, 1], got {min_confidence}")
            if self.confidence is None:
                raise ValueError(f"index version {self.version}'s model has no confidence to abstain by (it was "
                                 "trained without a validation split, or before confidences existed)")
        mu = np.ascontiguousarray(mu, np.float32)
        uncertainty = np.asarray(uncertainty, np.float32)
        depth = max(k, rerank_k or max(10 * k, 100)) if rerank else k
        depth = max(depth, 2)  # the confidence reads the top-2 cosines
        depth += exclude is not None
        scores, labels = self.index.search(mu, depth)
        ids, u = self._resolve(labels)
        lam = self.uncertainty_weight if uncertainty_weight is None else uncertainty_weight
        results = []
        for q in range(len(mu)):
            valid = labels[q] >= 0
            if exclude is not None and exclude[q] is not None:
                valid &= ids[q] != exclude[q]
            cand_ids, cos, cand_u = ids[q][valid], scores[q][valid], u[q][valid]
            confidence = self._confidence(float(uncertainty[q]), cos)
            if min_confidence is not None and (confidence is None or confidence < min_confidence):
                results.append(QueryResult(names[q] if names is not None else f"query {q}", float(uncertainty[q]), [],
                                           confidence, abstained=True))
                continue
            sim = cos
            if rerank and len(cos):
                from idml.metric import introspective_distance  # pulls in PML + scipy: only when needed

                alpha = torch.from_numpy(np.clip(2 - 2 * cos, 0, None).astype(np.float32))
                beta = torch.from_numpy((uncertainty[q] + cand_u).astype(np.float32))
                sim = (1 - introspective_distance(alpha, beta, lam) / 2).numpy()
                order = np.argsort(-sim, kind="stable")
                cand_ids, cos, cand_u, sim = cand_ids[order], cos[order], cand_u[order], sim[order]
            hits = [Hit(str(cand_ids[j]), float(sim[j]), float(cos[j]), float(cand_u[j])) for j in range(min(k, len(cand_ids)))]
            results.append(QueryResult(names[q] if names is not None else f"query {q}", float(uncertainty[q]), hits,
                                       confidence))
        return results

    def _confidence(self, uncertainty: float, cosines: np.ndarray) -> float | None:
        """P(top-1 right) from the candidates' cosines in cosine order (before any re-ranking)."""
        if self.confidence is None or len(cosines) < 2:
            return None
        top1, top2 = float(cosines[0]), float(cosines[1])
        return float(self.confidence.predict([uncertainty], [top1], [top1 - top2])[0])

    def _resolve(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full(labels.shape, "", dtype=object)
        u = np.full(labels.shape, np.nan, np.float32)
        shards, rows = split_labels(labels)
        valid = labels >= 0
        for shard in np.unique(shards[valid]):
            mask = valid & (shards == shard)
            ids[mask] = self.ids[int(shard)][rows[mask]]
            u[mask] = self.uncertainty[int(shard)][rows[mask]]
        return ids.astype(str), u


def format_results(results: list[QueryResult], *, reranked: bool = False) -> str:
    """A plain-text table: one block per query."""
    lines = []
    for res in results:
        confidence = "" if res.confidence is None else f", confidence {res.confidence:.2f}"
        lines.append(f"{res.query}  (uncertainty {_num(res.uncertainty)}{confidence})")
        if res.abstained:
            lines.append("  (abstained: confidence below min_confidence)")
            continue
        if not res.hits:
            lines.append("  (no results)")
            continue
        width = max(len("id"), *(len(h.id) for h in res.hits))
        head = f"  {'rank':>4}  {'id':<{width}}  " + (f"{'introspective sim':>17}  " if reranked else "")
        lines.append(head + f"{'cosine':>8}  {'uncertainty':>11}")
        for rank, h in enumerate(res.hits, 1):
            row = f"  {rank:>4}  {h.id:<{width}}  " + (f"{h.similarity:>17.4f}  " if reranked else "")
            lines.append(row + f"{h.cosine:>8.4f}  {_num(h.uncertainty):>11}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _num(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.4g}"
