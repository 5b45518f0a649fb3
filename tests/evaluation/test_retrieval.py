import math

import faiss
import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKMeans, FaissKNN

from idml.evaluation import cross_domain_metrics, knn, retrieval_metrics

PML_METRICS = ("precision_at_1", "mean_average_precision_at_r", "r_precision", "NMI")


def on_circle(degrees):
    rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


def clustered(sizes, dim=32, noise=0.9, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), dim))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = centers[labels] + noise * rng.normal(size=(len(labels), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def pml_accuracy(x, labels, seed, knn_func=None, **kwargs):
    calc = AccuracyCalculator(
        include=PML_METRICS,
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=knn_func or FaissKNN(index_init_fn=faiss.IndexFlatIP),
        kmeans_func=FaissKMeans(niter=20, seed=seed),
    )
    return calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels), **kwargs)


CASES = {
    "equal": [5] * 20,
    # unequal sizes, two singleton classes (lone queries) and one big class (deep R)
    "unequal": [1, 2, 3, 9, 4, 1, 17, 6, 5, 2, 8, 3],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_agrees_with_pml_accuracy_calculator(case):
    x, labels = clustered(CASES[case])
    ours = retrieval_metrics(x, labels, seed=7)
    pml = pml_accuracy(x, labels, seed=7)
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
    # Same faiss k-means, seed and niter on the same (already normalised) points, so the
    # clustering is identical; only float32 re-normalisation could perturb it.
    assert ours["nmi"] == pytest.approx(pml["NMI"], abs=1e-6)
    # The metrics are not trivially saturated, so the agreement is informative.
    assert 0.2 < ours["map@r"] < 0.99


def test_agrees_with_pml_default_l2_knn_on_normalised_input():
    # PML's default index is IndexFlatL2; on unit vectors it ranks like inner product.
    x, labels = clustered(CASES["unequal"], seed=3)
    ours = retrieval_metrics(x, labels, nmi=False)
    pml = pml_accuracy(x, labels, seed=0, knn_func=FaissKNN())
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)


def test_nmi_depends_on_seed_only_slightly():
    # Different k-means seeds give different clusterings; on well-separated clusters the
    # NMI stays close, which is why comparisons against PML's default seed need a tolerance.
    x, labels = clustered([6] * 10, noise=0.3, seed=1)
    values = [retrieval_metrics(x, labels, seed=s)["nmi"] for s in (0, 1, 1234)]
    assert max(values) - min(values) < 0.1
    assert min(values) > 0.8


def test_unnormalised_and_torch_inputs_give_same_result():
    x, labels = clustered([4] * 6, seed=2)
    scaled = x * np.linspace(0.5, 3.0, len(x))[:, None]
    a = retrieval_metrics(x, labels, nmi=False)
    b = retrieval_metrics(torch.from_numpy(scaled.astype(np.float64)), torch.from_numpy(labels), nmi=False)
    assert a == pytest.approx(b)
    assert all(isinstance(v, float) for v in b.values())


def test_hand_computed_with_singleton():
    # Angles (deg) and labels; p5 is the only "C" so it is no query (R = 0).
    # Neighbour orders: p0: A B A..  p1: B A A..  p2(B): A A A B..  p3: B A B A..
    # p4(B): A B A C A.
    x = on_circle([0, 20, 33, 50, 85, 160])
    labels = ["A", "A", "B", "A", "B", "C"]
    m = retrieval_metrics(x, labels, ks=(1, 2, 4), nmi=False)
    assert m["recall@1"] == pytest.approx(1 / 5)
    assert m["recall@2"] == pytest.approx(4 / 5)
    assert m["recall@4"] == pytest.approx(1.0)
    # AP@R per query: 1/2, 1/4, 0, 1/4, 0; R-precision: 1/2, 1/2, 0, 1/2, 0
    assert m["map@r"] == pytest.approx(1.0 / 5)
    assert m["r_precision"] == pytest.approx(1.5 / 5)
    assert set(m) == {"recall@1", "recall@2", "recall@4", "map@r", "r_precision"}


def test_hand_computed_map_at_r_with_r3():
    # A at 0, 10, 45, 70 and a lone B at 25. Relevance of the first R=3 results:
    # a0: 1 0 1, a1: 1 0 1, a3: 0 1 1, a4: 1 0 1.
    x = on_circle([0, 10, 25, 45, 70])
    labels = np.array([0, 0, 1, 0, 0])
    m = retrieval_metrics(x, labels, ks=(1,), nmi=False)
    assert m["recall@1"] == pytest.approx(3 / 4)
    assert m["map@r"] == pytest.approx((3 * (1 + 2 / 3) / 3 + (1 / 2 + 2 / 3) / 3) / 4)
    assert m["r_precision"] == pytest.approx(2 / 3)


def test_all_singletons_give_nan_like_pml():
    x = on_circle([0, 40, 90])
    m = retrieval_metrics(x, [0, 1, 2])
    assert math.isnan(m["recall@1"]) and math.isnan(m["map@r"])
    assert m["nmi"] == pytest.approx(1.0)


def test_knn_orders_by_cosine():
    gallery = on_circle([0, 30, 100, 200]) * np.array([[1.0], [5.0], [0.1], [2.0]])
    sims, idx = knn(on_circle([25]), gallery, 3)
    assert idx.tolist() == [[1, 0, 2]]
    assert sims[0] == pytest.approx(np.cos(np.deg2rad([5, 25, 75])), abs=1e-6)


def test_exclude_self_with_duplicates():
    v = on_circle([0, 0, 0, 0, 0, 0, 90, 90])
    for k in (1, 2, 5, 7):
        sims, idx = knn(v, v, k, exclude_self=True)
        assert idx.shape == sims.shape == (8, k)
        for i, row in enumerate(idx):
            assert i not in row
            assert len(set(row.tolist())) == k
    sims, idx = knn(v, v, 1, exclude_self=True)
    assert np.allclose(sims, 1.0, atol=1e-6)  # every item has an identical twin
    assert (idx[:6] < 6).all() and (idx[6:] == [[7], [6]]).all()
    m = retrieval_metrics(v, [0] * 6 + [1] * 2, nmi=False)
    assert m["recall@1"] == 1.0 and m["map@r"] == pytest.approx(1.0)


def test_cross_domain_with_constructed_shift():
    # Domain B is domain A rotated by 50 degrees; class 3 only exists in B and class 9 only
    # in C, so "C" shares no label with anyone.
    a = on_circle([0, 90, 180])
    b = on_circle([50, 140, 230, 270])
    c = on_circle([300])
    x = np.concatenate([a, b, c])
    labels = [0, 1, 2, 0, 1, 2, 3, 9]
    domains = ["A"] * 3 + ["B"] * 4 + ["C"]
    out = cross_domain_metrics(x, labels, domains, ks=(1, 2))
    assert set(out["pairs"]) == {"A->B", "B->A", "A->C", "C->A", "B->C", "C->B"}
    ab, ba = out["pairs"]["A->B"], out["pairs"]["B->A"]
    # A->B: A0 hits B0 first; A1 sees B0 (40 deg) before B1 (50); A2 sees B1 before B2.
    assert ab == pytest.approx({"recall@1": 1 / 3, "recall@2": 1.0, "map@r": 1 / 3,
                                "r_precision": 1 / 3, "num_queries": 3})
    # B->A: B3 (class 3) is no query. B0 sees A1 first, B1 sees A2 first, B2 sees A2.
    assert ba == pytest.approx({"recall@1": 1 / 3, "recall@2": 1.0, "map@r": 1 / 3,
                                "r_precision": 1 / 3, "num_queries": 3})
    assert out["pairs"]["A->C"]["num_queries"] == 0
    assert math.isnan(out["pairs"]["A->C"]["recall@1"])
    assert out["average"] == pytest.approx({"recall@1": 1 / 3, "recall@2": 1.0,
                                            "map@r": 1 / 3, "r_precision": 1 / 3})


def test_cross_domain_average_and_r_counts_gallery_items():
    # Two B items share the query's label, so R = 2 for A's query.
    x = on_circle([0, 10, 60, 20])
    out = cross_domain_metrics(x, [0, 0, 0, 1], ["A", "B", "B", "B"], ks=(1,))
    ab = out["pairs"]["A->B"]
    # A0's results: B1 (10, rel), B3 (20, not), B2 (60, rel) -> AP@2 = 1/2, RP = 1/2
    assert ab["map@r"] == pytest.approx(0.5) and ab["r_precision"] == pytest.approx(0.5)
    assert ab["recall@1"] == 1.0 and ab["num_queries"] == 1
    ba = out["pairs"]["B->A"]  # B1 and B2 query the single A item: both correct
    assert ba["num_queries"] == 2 and ba["map@r"] == pytest.approx(1.0)
    assert out["average"]["map@r"] == pytest.approx(0.75)


def test_cross_domain_agrees_with_pml_query_reference_split():
    x, labels = clustered([6] * 10 + [3] * 5, seed=4)
    rng = np.random.default_rng(0)
    domains = rng.choice(["photo", "sketch"], size=len(x))
    out = cross_domain_metrics(x, labels, domains)
    for q, g in (("photo", "sketch"), ("sketch", "photo")):
        qm, gm = domains == q, domains == g
        calc = AccuracyCalculator(include=PML_METRICS[:3], k="max_bin_count",
                                  device=torch.device("cpu"),
                                  knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP))
        pml = calc.get_accuracy(torch.from_numpy(x[qm]), torch.from_numpy(labels[qm]),
                                torch.from_numpy(x[gm]), torch.from_numpy(labels[gm]))
        ours = out["pairs"][f"{q}->{g}"]
        assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
        assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
        assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: retrieval_metrics(np.ones((4, 3)), [0, 0, 1]), "length mismatch"),
        (lambda: retrieval_metrics(np.array([[1.0, np.nan], [0.0, 1.0]]), [0, 0]), "NaN or inf"),
        (lambda: retrieval_metrics(np.array([[1.0, np.inf], [0.0, 1.0]]), [0, 0]), "NaN or inf"),
        (lambda: retrieval_metrics(np.zeros((0, 3)), []), "empty"),
        (lambda: retrieval_metrics(np.ones(5), [0] * 5), "2-D"),
        (lambda: retrieval_metrics(np.ones((3, 2)), [[0], [0], [1]]), "1-D"),
        (lambda: retrieval_metrics(np.ones((1, 2)), [0]), "at least 2"),
        (lambda: retrieval_metrics(np.eye(3), [0, 0, 1], ks=(0,)), "positive"),
        (lambda: knn(np.ones((2, 3)), np.ones((4, 2)), 1), "dimension"),
        (lambda: knn(np.eye(3), np.eye(3), 3, exclude_self=True), "k must be between"),
        (lambda: knn(np.eye(3)[:2], np.eye(3), 1, exclude_self=True), "queries to be the gallery"),
        (lambda: cross_domain_metrics(np.eye(3), [0, 0, 1], ["A"] * 3), "at least two distinct domains"),
        (lambda: cross_domain_metrics(np.eye(3), [0, 0, 1], ["A"] * 2), "domains must be"),
        (lambda: cross_domain_metrics(np.eye(3), [0, 1, 2], ["A", "B", "B"]), "no label occurs"),
    ],
)
def test_input_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call()
