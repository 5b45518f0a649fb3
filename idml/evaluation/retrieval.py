"""Exact kNN retrieval metrics on the semantic embedding ``mu``.

Retrieval ranks by cosine similarity, i.e. inner product on L2-normalised copies of the
inputs, with an exact faiss ``IndexFlatIP`` search. The metric definitions follow
pytorch-metric-learning's ``AccuracyCalculator`` (``precision_at_1``,
``mean_average_precision_at_r``, ``r_precision``, ``NMI``) so numbers are comparable with
the literature that reports them:

* A query's relevant set is every *other* item with its label; ``R`` is its size.
* Queries with ``R == 0`` (their class has no other member in the gallery) are excluded
  from every retrieval metric, as PML does ("lone" queries). If no query has ``R > 0`` the
  retrieval metrics are ``nan`` (PML returns ``nan`` too) and a warning is logged.
* ``map@r``: ``1/R * sum_{i<=R, rel(i)} precision@i`` over the first ``R`` results.
* ``r_precision``: fraction of the first ``R`` results that are relevant.
* ``recall@K`` (PML has only ``precision_at_1``): fraction of queries with at least one
  relevant item in the first ``K`` results; ``recall@1 == precision_at_1``.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from ..faiss_import import faiss

logger = logging.getLogger(__name__)

# Same number of k-means iterations as PML's default ``FaissKMeans(niter=20)``.
KMEANS_NITER = 20
# Queries per faiss search call: bounds the (batch, k) result buffers for big sets.
SEARCH_BATCH = 8192


def to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert numpy arrays, torch tensors and sequences to a numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} could not be converted to a numpy array: {e}") from e


def check_embeddings(x: Any, name: str = "embeddings") -> np.ndarray:
    """Validate a (N, D) finite embedding matrix; return an L2-normalised float32 copy."""
    arr = to_numpy(x, name)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (num_items, dim), got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one item")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real-valued numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)  # always a copy: normalisation must not touch the input
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{name} contains NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
            "check the model output for divergence"
        )
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    # Same eps as torch.nn.functional.normalize: an all-zero row stays zero instead of NaN.
    arr /= np.maximum(norms, 1e-12)
    return np.ascontiguousarray(arr)


def check_labels(labels: Any, n: int, name: str = "labels") -> np.ndarray:
    """Validate 1-D labels of length ``n``; return integer codes (0..C-1)."""
    arr = to_numpy(labels, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D with one label per item, got shape {arr.shape}")
    if len(arr) != n:
        raise ValueError(
            f"length mismatch: {n} embeddings but {len(arr)} {name}; pass one label per embedding"
        )
    try:
        _, codes = np.unique(arr, return_inverse=True)
    except TypeError as e:
        raise ValueError(f"{name} must be mutually comparable (e.g. all int or all str): {e}") from e
    return codes.reshape(-1).astype(np.int64)


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in ks}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"ks must be a sequence of positive integers, got {ks!r}") from e
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return ks


def knn(
    queries: Any,
    gallery: Any,
    k: int,
    *,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine kNN: ``(similarities, indices)``, each of shape (num_queries, k).

    Both inputs are L2-normalised (float32 copies) and searched with ``faiss.IndexFlatIP``;
    results are sorted by decreasing similarity and ``indices`` index ``gallery``.

    ``exclude_self=True`` means ``queries`` *are* the gallery (row i of both is the same
    item): k+1 neighbours are searched and, per row, the entry equal to the query's own
    index is dropped, or the last entry when the query itself is not among them (possible
    when more than k items are identical to it). This is what PML does.
    """
    q = check_embeddings(queries, "queries")
    g = check_embeddings(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"queries have dimension {q.shape[1]} but gallery has {g.shape[1]}; "
            "they must come from the same embedding space"
        )
    if exclude_self and len(q) != len(g):
        raise ValueError(
            f"exclude_self=True requires queries to be the gallery, but got {len(q)} queries "
            f"and {len(g)} gallery items"
        )
    k = int(k)
    available = len(g) - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(
            f"k must be between 1 and {available} (gallery size"
            f"{' - 1 for exclude_self' if exclude_self else ''}), got {k}"
        )
    search_k = k + int(exclude_self)
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    sims = np.empty((len(q), search_k), dtype=np.float32)
    idx = np.empty((len(q), search_k), dtype=np.int64)
    for start in range(0, len(q), SEARCH_BATCH):
        stop = start + SEARCH_BATCH
        sims[start:stop], idx[start:stop] = index.search(q[start:stop], search_k)
    if exclude_self:
        drop = idx == np.arange(len(q))[:, None]
        drop[~drop.any(axis=1), -1] = True  # exactly one entry per row is dropped
        sims = sims[~drop].reshape(len(q), k)
        idx = idx[~drop].reshape(len(q), k)
    return sims, idx


def per_query_metrics(
    match: np.ndarray, num_relevant: np.ndarray, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Per-query ``recall@K``, ``map@r``, ``r_precision`` from a ranked relevance matrix.

    ``match[i, j]`` says whether the j-th result of query i is relevant; ``num_relevant``
    is R per query (all > 0). ``match`` must have at least ``max(R)`` columns.
    """
    depth = match.shape[1]
    col = np.arange(depth)[None, :]
    r = num_relevant[:, None]
    within_r = match & (col < r)
    hits_in_r = within_r.sum(axis=1)
    precision_at_i = np.cumsum(within_r, axis=1) / (col + 1.0)
    out = {f"recall@{k}": match[:, :k].any(axis=1).astype(np.float64) for k in ks}
    out["map@r"] = (precision_at_i * within_r).sum(axis=1) / num_relevant
    out["r_precision"] = hits_in_r / num_relevant
    return out


def leave_one_out_per_query(
    embeddings: np.ndarray, codes: np.ndarray, ks: Sequence[int]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Leave-one-out retrieval over one set, per query.

    Takes normalised embeddings and integer label codes. Returns ``(valid, metrics)``:
    ``valid`` marks queries with R > 0 and ``metrics`` holds one value per valid query.
    """
    n = len(embeddings)
    if n < 2:
        raise ValueError(f"leave-one-out retrieval needs at least 2 items, got {n}")
    counts = np.bincount(codes)
    num_relevant = counts[codes] - 1
    valid = num_relevant > 0
    if not valid.any():
        return valid, {}
    # R-based metrics need the first max(R) results of every query; recall@K needs K.
    depth = min(max(int(num_relevant.max()), max(ks)), n - 1)
    _, idx = knn(embeddings, embeddings, depth, exclude_self=True)
    match = codes[idx[valid]] == codes[valid][:, None]
    return valid, per_query_metrics(match, num_relevant[valid], ks)


def kmeans_nmi(embeddings: np.ndarray, codes: np.ndarray, seed: int) -> float:
    """NMI between labels and faiss k-means clusters (k = number of distinct labels)."""
    num_clusters = int(codes.max()) + 1
    # faiss prints a warning to stderr when there are fewer than 39 points per cluster (always
    # so with one cluster per class); min_points_per_centroid only gates that warning, so the
    # clustering is the same. It is a debug-log line here, shown with -v.
    logger.debug("NMI k-means: %d points in %d clusters (faiss suggests >= 39 per cluster)", len(embeddings), num_clusters)
    kmeans = faiss.Kmeans(embeddings.shape[1], num_clusters, niter=KMEANS_NITER, seed=seed,
                          min_points_per_centroid=39 if logger.isEnabledFor(logging.DEBUG) else 1)
    kmeans.train(embeddings)
    _, assignment = kmeans.index.search(embeddings, 1)
    return float(normalized_mutual_info_score(codes, assignment[:, 0]))


def _average(valid: np.ndarray, per_query: dict[str, np.ndarray], names: list[str]) -> dict:
    if not valid.any():
        logger.warning(
            "no query has another item with its label; retrieval metrics are nan"
        )
        return {name: float("nan") for name in names}
    return {name: float(per_query[name].mean()) for name in names}


def retrieval_metrics(
    embeddings: Any,
    labels: Any,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    nmi: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Leave-one-out retrieval over one set: every item queries all the others.

    Returns ``recall@K`` for each K, ``map@r``, ``r_precision`` and (if ``nmi``) ``nmi``,
    all fractions in [0, 1], with PML ``AccuracyCalculator`` definitions (see the module
    docstring). Queries whose class has a single member (R = 0) are left out of the
    retrieval metrics, like PML's lone queries; they still count for NMI, which clusters
    every item.

    NMI runs ``faiss.Kmeans`` (``niter=20`` like PML, ``seed``) on the normalised embeddings
    with k = number of distinct labels, then sklearn's ``normalized_mutual_info_score``.
    k-means depends on its random initialisation, so NMI may differ slightly from PML's,
    which uses faiss's default seed (1234) on the *unnormalised* query embeddings; with the
    same seed on normalised inputs the two agree.
    """
    emb = check_embeddings(embeddings)
    codes = check_labels(labels, len(emb))
    ks = check_ks(ks)
    valid, per_query = leave_one_out_per_query(emb, codes, ks)
    if valid.any() and not valid.all():
        logger.info(
            "%d of %d queries have no other item with their label and are excluded",
            int((~valid).sum()),
            len(valid),
        )
    out = _average(valid, per_query, [f"recall@{k}" for k in ks] + ["map@r", "r_precision"])
    if nmi:
        out["nmi"] = kmeans_nmi(emb, codes, seed)
    return out


def cross_domain_metrics(
    embeddings: Any,
    labels: Any,
    domains: Any,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
) -> dict[str, dict]:
    """Cross-domain retrieval for every ordered pair of distinct domains ``q -> g``.

    Queries are the items of domain ``q`` whose label occurs in domain ``g``; the gallery
    is all items of domain ``g``; R is the number of gallery items with the query's label
    (same definitions as :func:`retrieval_metrics`, no self-exclusion needed). Pair keys are
    ``f"{q}->{g}"`` over the sorted distinct domains.

    Returns ``{"pairs": {"q->g": {metric: value, ..., "num_queries": n}},
    "average": {metric: unweighted mean over pairs}}``. A pair without shared labels has
    ``num_queries == 0`` and ``nan`` metrics, and is left out of the average.
    """
    emb = check_embeddings(embeddings)
    codes = check_labels(labels, len(emb))
    doms = to_numpy(domains, "domains")
    if doms.ndim != 1 or len(doms) != len(emb):
        raise ValueError(
            f"domains must be 1-D with one entry per embedding ({len(emb)}), got shape {doms.shape}"
        )
    ks = check_ks(ks)
    unique_domains = np.unique(doms)
    if len(unique_domains) < 2:
        raise ValueError(
            f"cross-domain retrieval needs at least two distinct domains, got "
            f"{[_domain_name(d) for d in unique_domains]}"
        )
    names = [f"recall@{k}" for k in ks] + ["map@r", "r_precision"]
    pairs: dict[str, dict] = {}
    for dq in unique_domains:
        for dg in unique_domains:
            if dq == dg:
                continue
            key = f"{_domain_name(dq)}->{_domain_name(dg)}"
            gallery = np.flatnonzero(doms == dg)
            gallery_counts = np.bincount(codes[gallery], minlength=int(codes.max()) + 1)
            queries = np.flatnonzero((doms == dq) & (gallery_counts[codes] > 0))
            if len(queries) == 0:
                logger.warning("no label of domain %s occurs in domain %s", dq, dg)
                pairs[key] = {name: float("nan") for name in names} | {"num_queries": 0}
                continue
            num_relevant = gallery_counts[codes[queries]]
            depth = min(max(int(num_relevant.max()), max(ks)), len(gallery))
            _, idx = knn(emb[queries], emb[gallery], depth)
            match = codes[gallery][idx] == codes[queries][:, None]
            per_query = per_query_metrics(match, num_relevant, ks)
            pairs[key] = {name: float(per_query[name].mean()) for name in names}
            pairs[key]["num_queries"] = int(len(queries))
    scored = [p for p in pairs.values() if p["num_queries"] > 0]
    if not scored:
        raise ValueError(
            "no label occurs in more than one domain, so no cross-domain query exists; "
            "check that labels are shared across domains"
        )
    average = {name: float(np.mean([p[name] for p in scored])) for name in names}
    return {"pairs": pairs, "average": average}


def _domain_name(d: Hashable) -> str:
    return str(d.item() if isinstance(d, np.generic) else d)
