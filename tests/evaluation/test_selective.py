import numpy as np
import pytest

from idml.evaluation.selective import risk_coverage, selective_retrieval, uncertainty_ranking


def test_risk_coverage_answers_the_most_confident_first():
    hits = np.array([1, 0, 1, 0])
    curve = risk_coverage(hits, confidence=np.array([4, 3, 2, 1]), coverages=(0.25, 0.5, 1.0))
    assert curve["recall@1"] == pytest.approx([1.0, 0.5, 0.5])
    # errors after each answered query: 0, 1/2, 1/3, 2/4
    assert curve["aurc"] == pytest.approx(np.mean([0, 1 / 2, 1 / 3, 2 / 4]))
    perfect = risk_coverage(hits, confidence=hits.astype(float))
    assert perfect["aurc"] < curve["aurc"]


def test_risk_coverage_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="equally long"):
        risk_coverage(np.ones(3), np.ones(4))


def _clustered(seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, 8))
    labels = np.repeat(np.arange(20), 4)
    noise = rng.uniform(0.05, 2.0, size=len(labels))  # some queries far from their class
    emb = centres[labels] + noise[:, None] * rng.normal(size=(len(labels), 8))
    return emb, labels, noise


def test_an_uncertainty_that_tracks_the_noise_beats_a_random_one():
    emb, labels, noise = _clustered()
    informed = selective_retrieval(emb, labels, noise)
    rng = np.random.default_rng(1)
    random = selective_retrieval(emb, labels, rng.uniform(size=len(labels)))
    assert set(informed["signals"]) == {"uncertainty", "top1_similarity", "top1_gap"}
    assert informed["oracle_aurc"] <= informed["signals"]["uncertainty"]["aurc"]
    assert informed["signals"]["uncertainty"]["aurc"] < random["signals"]["uncertainty"]["aurc"]
    assert informed["signals"]["uncertainty"]["aurc"] < informed["random_aurc"]
    # R-AUROC: low confidence predicts a wrong top-1 better than chance, a random order does not
    assert informed["signals"]["uncertainty"]["r_auroc"] > 0.6
    assert abs(random["signals"]["uncertainty"]["r_auroc"] - 0.5) < 0.15
    # on well-separated clusters the free signals also beat a random order
    assert informed["signals"]["top1_similarity"]["aurc"] < informed["random_aurc"]
    # the free signals do not depend on the uncertainty given
    assert informed["signals"]["top1_gap"] == random["signals"]["top1_gap"]
    curve = informed["signals"]["uncertainty"]
    assert curve["recall@1"][-1] == pytest.approx(informed["recall@1"])
    # the cheap per-epoch form reports the same numbers as the full analysis
    ranking = uncertainty_ranking(emb, labels, noise)
    for signal in ("uncertainty", "top1_gap"):
        assert ranking[f"aurc_{signal}"] == pytest.approx(informed["signals"][signal]["aurc"])
        assert ranking[f"r_auroc_{signal}"] == pytest.approx(informed["signals"][signal]["r_auroc"])


def test_lone_queries_are_left_out():
    emb, labels, noise = _clustered()
    labels = labels.copy()
    labels[0] = 999  # a class with one item
    out = selective_retrieval(emb, labels, noise)
    assert out["num_queries"] == len(labels) - 1
