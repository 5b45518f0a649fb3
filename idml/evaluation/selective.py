"""Selective retrieval: what a user of uncertainty does with it.

A search service that may abstain answers only its most confident queries. Its quality at
coverage c is the R@1 of the fraction c of queries it answers; the area under the
risk-coverage curve (AURC, mean error over every coverage 1/n .. 1) sums it up: lower is
better, the oracle (abstain exactly on the misses) is the floor and a random order gives
the overall error rate.

The uncertainty head earns its place only where it orders queries better than the free
confidence signals of the semantic embedding alone: the top-1 similarity and the gap between
the top-1 and top-2 similarities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .retrieval import check_embeddings, check_labels, knn
from .uncertainty import check_uncertainty

DEFAULT_COVERAGES = tuple(np.round(np.linspace(0.1, 1.0, 10), 2))


def risk_coverage(hits: np.ndarray, confidence: np.ndarray, coverages: Sequence[float] = DEFAULT_COVERAGES) -> dict:
    """R@1 at each coverage when answering the most confident queries first, and the AURC.

    ``hits`` is 1 where the query's top-1 result is relevant; ``confidence`` is higher for
    queries to answer first. Ties in confidence are broken by the query's position, so the
    result does not depend on the hits.
    """
    hits = np.asarray(hits, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    if hits.ndim != 1 or hits.shape != confidence.shape or len(hits) == 0:
        raise ValueError(f"hits and confidence must be 1-D and equally long, got {hits.shape} and {confidence.shape}")
    order = np.argsort(-confidence, kind="stable")
    answered = np.arange(1, len(hits) + 1)
    recall_at = np.cumsum(hits[order]) / answered  # R@1 of the first n answered queries
    counts = [max(1, int(round(c * len(hits)))) for c in coverages]
    return {
        "coverage": [float(c) for c in coverages],
        "recall@1": [float(recall_at[n - 1]) for n in counts],
        "aurc": float(np.mean(1.0 - recall_at)),
    }


def query_signals(embeddings: Any, labels: Any, uncertainty: Any, *, distractors: Any = None) -> dict[str, np.ndarray]:
    """Leave-one-out top-1 retrieval over a split and each query's confidence signals: ``hits``
    (1 where the top-1 neighbour has the query's class), ``uncertainty``, ``top1_similarity``
    and ``top1_gap`` (top-1 minus top-2 cosine similarity). Queries whose class has no other
    item are left out, as in :func:`~idml.evaluation.retrieval.retrieval_metrics`.
    ``distractors``: embeddings of other classes added to the gallery (never right), so that a
    small split is searched in a gallery as large as the one its confidence will meet."""
    emb = check_embeddings(embeddings)
    codes = check_labels(labels, len(emb))
    u = check_uncertainty(uncertainty, "uncertainty", len(emb))
    if len(emb) < 3:
        raise ValueError(f"selective retrieval needs at least 3 items, got {len(emb)}")
    gallery_codes = codes
    if distractors is None:
        sims, idx = knn(emb, emb, 2, exclude_self=True)
    else:
        extra = check_embeddings(distractors, "distractors")
        sims, idx = knn(emb, np.concatenate([emb, extra]), 3)
        # the queries are the gallery's first rows: drop each one's own entry (else the third)
        drop = idx == np.arange(len(emb))[:, None]
        drop[~drop.any(axis=1), -1] = True
        sims, idx = sims[~drop].reshape(len(emb), 2), idx[~drop].reshape(len(emb), 2)
        gallery_codes = np.concatenate([codes, np.full(len(extra), -1)])
    valid = np.bincount(codes)[codes] > 1
    if not valid.any():
        raise ValueError("no query has another item with its label; nothing to evaluate")
    return {
        "hits": (gallery_codes[idx[:, 0]] == codes)[valid].astype(np.float64),
        "uncertainty": u[valid],
        "top1_similarity": sims[valid, 0],
        "top1_gap": sims[valid, 0] - sims[valid, 1],
    }


def failure_auroc(hits: np.ndarray, confidence: np.ndarray) -> float:
    """R-AUROC (URL benchmark): how well low confidence predicts a wrong top-1 neighbour (0.5:
    no better than chance; nan when every query is right or every one wrong)."""
    from sklearn.metrics import roc_auc_score

    missed = 1.0 - np.asarray(hits, dtype=np.float64)
    if missed.min() == missed.max():
        return float("nan")
    return float(roc_auc_score(missed, -np.asarray(confidence, dtype=np.float64)))


def uncertainty_ranking(embeddings: Any, labels: Any, uncertainty: Any) -> dict[str, float]:
    """AURC and R-AUROC of the uncertainty and of the free top-1/top-2 gap, leave-one-out over
    one split: the cheap part of :func:`selective_retrieval` (no curves, no blends), reported on
    validation every epoch so that a search can rank an uncertainty's knobs without the test split."""
    q = query_signals(embeddings, labels, uncertainty)
    out = {}
    for name, conf in (("uncertainty", -q["uncertainty"]), ("top1_gap", q["top1_gap"])):
        out[f"aurc_{name}"] = risk_coverage(q["hits"], conf)["aurc"]
        out[f"r_auroc_{name}"] = failure_auroc(q["hits"], conf)
    return out


def selective_retrieval(
    embeddings: Any, labels: Any, uncertainty: Any, *, coverages: Sequence[float] = DEFAULT_COVERAGES,
    confidence=None,
) -> dict[str, Any]:
    """Risk-coverage of leave-one-out R@1 under the confidence signals: ``uncertainty``
    (answer the least uncertain first), ``top1_similarity`` and ``top1_gap``, and with a
    fitted ``confidence`` (``idml.evaluation.confidence.Confidence``) its probability, whose
    calibration is reported too; plus ``oracle`` and ``random`` reference AURCs. Each signal
    also gets its R-AUROC."""
    q = query_signals(embeddings, labels, uncertainty)
    hits = q["hits"]
    signals = {
        "uncertainty": -q["uncertainty"],
        "top1_similarity": q["top1_similarity"],
        "top1_gap": q["top1_gap"],
    }
    if confidence is not None:
        signals["confidence"] = confidence.predict(q["uncertainty"], q["top1_similarity"], q["top1_gap"])
    curves = {}
    for name, conf in signals.items():
        curves[name] = {**risk_coverage(hits, conf, coverages), "r_auroc": failure_auroc(hits, conf)}
    out: dict[str, Any] = {
        "num_queries": int(len(hits)),
        "recall@1": float(hits.mean()),
        "signals": curves,
        "oracle_aurc": risk_coverage(hits, hits, coverages)["aurc"],
        "random_aurc": float(1.0 - hits.mean()),
    }
    if confidence is not None:
        from .confidence import calibration

        out["calibration"] = calibration(signals["confidence"], hits)
    return out
