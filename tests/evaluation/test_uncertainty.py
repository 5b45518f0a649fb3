import itertools

import numpy as np
import pytest
import torch

from idml.evaluation import (
    image_uncertainty,
    recall_by_uncertainty,
    retrieval_metrics,
    spearman_uncertainty_vs_error,
    uncertainty_summary,
)


def noisy_by_uncertainty(num_classes=25, per_class=8, dim=16, seed=0):
    """Clustered embeddings whose noise grows with the item's uncertainty."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = np.repeat(np.arange(num_classes), per_class)
    u = rng.uniform(0.0, 1.0, size=len(labels))
    x = centers[labels] + (0.05 + 1.5 * u[:, None]) * rng.normal(size=(len(labels), dim)) / np.sqrt(dim)
    return x, labels, u


def test_image_uncertainty_is_squared_norm():
    sigma = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, -1.0]])
    assert image_uncertainty(sigma) == pytest.approx([25.0, 0.0, 2.0])
    assert image_uncertainty(torch.tensor(sigma, requires_grad=True)) == pytest.approx([25.0, 0.0, 2.0])


def test_bins_partition_queries_and_average_back():
    x, labels, u = noisy_by_uncertainty()
    labels = labels.copy()
    labels[0] = 999  # a singleton: not a query, so not in any bin
    bins = recall_by_uncertainty(x, labels, u, n_bins=4)
    assert [b["bin"] for b in bins] == [0, 1, 2, 3]
    assert sum(b["num_queries"] for b in bins) == len(x) - 1
    assert {b["num_queries"] for b in bins} <= {49, 50}
    for lo, hi in itertools.pairwise(bins):
        assert lo["low"] <= lo["high"] <= hi["low"] <= hi["high"]
    assert bins[0]["low"] == pytest.approx(np.delete(u, 0).min())
    overall = retrieval_metrics(x, labels, ks=(1,), nmi=False)
    weights = np.array([b["num_queries"] for b in bins])
    for key in ("recall@1", "map@r"):
        pooled = np.dot(weights, [b[key] for b in bins]) / weights.sum()
        assert pooled == pytest.approx(overall[key])


def test_uncertain_queries_are_retrieved_worse():
    x, labels, u = noisy_by_uncertainty()
    bins = recall_by_uncertainty(x, labels, u)
    assert bins[0]["recall@1"] > bins[-1]["recall@1"]
    assert bins[0]["map@r"] > bins[-1]["map@r"]
    assert spearman_uncertainty_vs_error(x, labels, u) > 0.3


def test_recall_by_uncertainty_validation():
    x, labels, u = noisy_by_uncertainty(num_classes=2, per_class=2)
    with pytest.raises(ValueError, match="length mismatch"):
        recall_by_uncertainty(x, labels, u[:-1])
    with pytest.raises(ValueError, match="n_bins"):
        recall_by_uncertainty(x, labels, u, n_bins=5)
    with pytest.raises(ValueError, match="n_bins"):
        recall_by_uncertainty(x, labels, u, n_bins=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        recall_by_uncertainty(x, labels, np.array([0.1, np.nan, 0.2, 0.3]))


def test_summary_separable_auroc_is_one():
    clean = np.array([0.1, 0.2, 0.3, 0.25])
    mixed = np.array([0.5, 0.9, 0.7])
    s = uncertainty_summary(clean, mixed)
    assert s["auroc"] == 1.0
    assert s["mean_clean"] == pytest.approx(0.2125)
    assert s["median_mixed"] == pytest.approx(0.7)
    assert s["std_clean"] == pytest.approx(np.std(clean))
    assert s["ratio_mixed_to_clean"] == pytest.approx(0.7 / 0.2125)
    assert s["num_clean"] == 4 and s["num_mixed"] == 3


def test_summary_auroc_is_pairwise_fraction():
    rng = np.random.default_rng(0)
    clean, mixed = rng.normal(0, 1, 40), rng.normal(0.5, 1, 30)
    pairs = (mixed[None, :] > clean[:, None]).mean()
    assert uncertainty_summary(clean, mixed)["auroc"] == pytest.approx(pairs)


def test_summary_clean_only():
    s = uncertainty_summary(torch.tensor([1.0, 2.0, 3.0]))
    assert s == pytest.approx({"num_clean": 3, "mean_clean": 2.0, "median_clean": 2.0,
                               "std_clean": np.std([1.0, 2.0, 3.0])})
    with pytest.raises(ValueError, match="1-D"):
        uncertainty_summary([])
    with pytest.raises(ValueError, match="non-empty"):
        image_uncertainty(np.ones(3))
