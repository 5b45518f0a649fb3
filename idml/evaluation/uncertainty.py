"""Analyses of the uncertainty embedding: ``||sigma||^2`` is an image's uncertainty."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from .. import metric
from .retrieval import check_embeddings, check_labels, leave_one_out_per_query, to_numpy

logger = logging.getLogger(__name__)


def image_uncertainty(sigma: Any) -> np.ndarray:
    """Per-image uncertainty ``||sigma_i||^2`` for a (N, D) uncertainty embedding."""
    arr = to_numpy(sigma, "sigma")
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"sigma must be a non-empty (num_items, dim) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("sigma contains NaN or inf; check the model output for divergence")
    return metric.image_uncertainty(arr)


def check_uncertainty(u: Any, name: str, n: int | None = None) -> np.ndarray:
    """One finite uncertainty per item (``n`` of them, when given), as float64; ValueError naming
    ``name`` otherwise."""
    arr = to_numpy(u, name)
    if arr.ndim != 1 or len(arr) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array (one value per item), got shape {arr.shape}")
    if n is not None and len(arr) != n:
        raise ValueError(f"length mismatch: {n} embeddings but {len(arr)} values in {name}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _valid_queries(embeddings: Any, labels: Any, uncertainty: Any, ks: Sequence[int]):
    emb = check_embeddings(embeddings)
    codes = check_labels(labels, len(emb))
    u = check_uncertainty(uncertainty, "uncertainty", len(emb))
    valid, per_query = leave_one_out_per_query(emb, codes, ks)
    if not valid.any():
        raise ValueError("no query has another item with its label; nothing to evaluate")
    return u[valid], per_query


def recall_by_uncertainty(
    embeddings: Any, labels: Any, uncertainty: Any, *, n_bins: int = 4
) -> list[dict]:
    """Leave-one-out retrieval quality per quantile bin of the *query's* uncertainty.

    Per-query hits are computed once against the whole set (like
    :func:`~idml.evaluation.retrieval.retrieval_metrics`, queries without another item of
    their class are excluded), then the queries are sorted by uncertainty and split into
    ``n_bins`` bins of (near) equal size; bin 0 holds the least uncertain queries. Equal
    uncertainties at a bin edge may land in either neighbouring bin, so every bin is
    non-empty and the bins partition the queries.

    Returns one dict per bin: ``bin``, ``low``/``high`` (uncertainty range in the bin),
    ``num_queries``, ``recall@1``, ``map@r``.
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    u, per_query = _valid_queries(embeddings, labels, uncertainty, ks=(1,))
    if n_bins > len(u):
        raise ValueError(f"n_bins={n_bins} exceeds the number of evaluable queries ({len(u)})")
    order = np.argsort(u, kind="stable")
    bins = []
    for b, members in enumerate(np.array_split(order, int(n_bins))):
        bins.append(
            {
                "bin": b,
                "low": float(u[members].min()),
                "high": float(u[members].max()),
                "num_queries": int(len(members)),
                "recall@1": float(per_query["recall@1"][members].mean()),
                "map@r": float(per_query["map@r"][members].mean()),
            }
        )
    return bins


def spearman_uncertainty_vs_error(
    embeddings: Any, labels: Any, uncertainty: Any, *, metric: str = "map@r"
) -> float:
    """Spearman correlation between a query's uncertainty and its error ``1 - metric``.

    ``metric`` is a per-query leave-one-out metric (``map@r``, ``r_precision``,
    ``recall@1``). Positive values mean uncertain queries are retrieved worse. Returns
    ``nan`` when either side is constant.
    """
    ks = (1,)
    allowed = ("map@r", "r_precision", "recall@1")
    if metric not in allowed:
        raise ValueError(f"metric must be one of {allowed}, got {metric!r}")
    u, per_query = _valid_queries(embeddings, labels, uncertainty, ks)
    error = 1.0 - per_query[metric]
    if np.ptp(u) == 0 or np.ptp(error) == 0:
        return float("nan")
    return float(spearmanr(u, error).statistic)


def uncertainty_summary(clean_uncertainty: Any, mixed_uncertainty: Any = None) -> dict[str, float]:
    """Summary statistics of uncertainties, optionally clean vs mixed (ambiguous) images.

    Always: ``num_clean``, ``mean_clean``, ``median_clean``, ``std_clean``. With
    ``mixed_uncertainty``: the same for ``_mixed``, ``ratio_mixed_to_clean`` (mean mixed /
    mean clean; ``nan`` if the clean mean is 0) and ``auroc``: the probability that a mixed
    image is more uncertain than a clean one (ties count half), i.e. ROC AUC with mixed as
    positives and the uncertainty as score. 1.0 means perfect separation.
    """
    clean = check_uncertainty(clean_uncertainty, "clean_uncertainty")
    out: dict[str, float] = {"num_clean": int(len(clean)), **_stats(clean, "clean")}
    if mixed_uncertainty is None:
        return out
    mixed = check_uncertainty(mixed_uncertainty, "mixed_uncertainty")
    out |= {"num_mixed": int(len(mixed)), **_stats(mixed, "mixed")}
    out["ratio_mixed_to_clean"] = (
        out["mean_mixed"] / out["mean_clean"] if out["mean_clean"] != 0 else float("nan")
    )
    scores = np.concatenate([clean, mixed])
    is_mixed = np.concatenate([np.zeros(len(clean)), np.ones(len(mixed))])
    out["auroc"] = float(roc_auc_score(is_mixed, scores))
    return out


def _stats(x: np.ndarray, suffix: str) -> dict[str, float]:
    return {
        f"mean_{suffix}": float(x.mean()),
        f"median_{suffix}": float(np.median(x)),
        f"std_{suffix}": float(x.std()),
    }
