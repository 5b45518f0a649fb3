import numpy as np
import pytest

from idml.evaluation.confidence import Confidence, calibration, fit_confidence
from idml.evaluation.selective import query_signals, selective_retrieval


def _clustered(seed=0, classes=40):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 8))
    labels = np.repeat(np.arange(classes), 4)
    noise = rng.uniform(0.05, 2.5, size=len(labels))  # some queries far from their class
    emb = centres[labels] + noise[:, None] * rng.normal(size=(len(labels), 8))
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels, noise


def test_confidence_fitted_on_one_split_orders_and_calibrates_another():
    emb, labels, noise = _clustered(0)
    q = query_signals(emb, labels, noise)
    confidence = fit_confidence(q["uncertainty"], q["top1_similarity"], q["top1_gap"], q["hits"])
    assert confidence.coef[0] < 0  # more uncertain, less likely right
    # on a second draw (the test split) it orders queries at least as well as the best single signal
    emb2, labels2, noise2 = _clustered(1)
    out = selective_retrieval(emb2, labels2, noise2, confidence=confidence)
    signals = out["signals"]
    assert set(signals) == {"uncertainty", "top1_similarity", "top1_gap", "confidence"}
    best_single = min(signals[name]["aurc"] for name in ("uncertainty", "top1_similarity", "top1_gap"))
    assert signals["confidence"]["aurc"] <= best_single + 0.01
    assert signals["confidence"]["r_auroc"] > 0.7
    assert 0 <= out["calibration"]["ece"] < 0.15
    assert sum(b["num_queries"] for b in out["calibration"]["bins"]) == out["num_queries"]


def test_confidence_round_trips_and_refuses_other_features():
    confidence = Confidence([-1.0, 0.5, 2.0], 0.3, [0.0, 0.5, 0.1], [1.0, 0.2, 0.05], num_queries=10)
    again = Confidence.from_dict(confidence.to_dict())
    args = (np.array([0.5, 2.0]), np.array([0.9, 0.4]), np.array([0.2, 0.01]))
    assert np.allclose(again.predict(*args), confidence.predict(*args))
    assert (0 < confidence.predict(*args)).all() and (confidence.predict(*args) < 1).all()
    with pytest.raises(ValueError, match="fitted on features"):
        Confidence.from_dict({**confidence.to_dict(), "features": ["top1_similarity"]})


def test_a_constant_uncertainty_gets_no_weight_and_one_outcome_cannot_be_fitted():
    rng = np.random.default_rng(0)
    top1 = rng.uniform(0.2, 1.0, 200)
    hits = (rng.uniform(size=200) < top1).astype(float)
    confidence = fit_confidence(np.ones(200), top1, rng.uniform(0, 0.1, 200), hits)
    assert confidence.coef[0] == 0 and confidence.coef[1] > 0
    with pytest.raises(ValueError, match="every top-1 neighbour was right"):
        fit_confidence(np.ones(5), top1[:5], top1[:5], np.ones(5))


def test_calibration_error():
    p = np.array([0.95] * 20 + [0.15] * 20)
    hits = np.array([1] * 19 + [0] + [1] * 3 + [0] * 17)
    out = calibration(p, hits)
    assert out["ece"] == pytest.approx(0.5 * abs(0.95 - 0.95) + 0.5 * abs(0.15 - 0.15))
    overconfident = calibration(np.full(40, 0.95), hits)
    assert overconfident["ece"] == pytest.approx(0.95 - hits.mean())


def test_distractors_make_the_calibration_gallery_as_hard_as_a_large_one():
    emb, labels, noise = _clustered(0, classes=10)
    alone = query_signals(emb, labels, noise)
    others, _, _ = _clustered(5, classes=200)  # other classes: never a right answer
    crowded = query_signals(emb, labels, noise, distractors=others)
    assert len(crowded["hits"]) == len(alone["hits"])
    assert crowded["hits"].mean() < alone["hits"].mean()
    assert (crowded["top1_similarity"] >= alone["top1_similarity"] - 1e-6).all()  # a bigger gallery only adds
    # a query is never its own neighbour, distractors or not
    assert query_signals(emb, labels, noise, distractors=others[:1])["hits"].shape == alone["hits"].shape
