"""A confidence a user can act on: the probability that a query's top-1 neighbour is right.

The uncertainty head says how ambiguous an image is; a user deciding whether to trust an answer
wants a probability. ``Confidence`` is a logistic regression from three signals of a query to
"its top-1 neighbour has its class": the query's uncertainty (log ||sigma||^2), and the two free
signals of the embedding alone, the top-1 similarity and the top-1 minus top-2 gap. On some data
sets the top-1 similarity alone is nearly an oracle, on emoji it is worse than random: the fit
finds the mix each data set needs. It is fitted on the validation split only (leave-one-out
retrieval there: classes never trained on, never the test split), stored with the checkpoint,
and evaluated on test by its risk-coverage (AURC), R-AUROC and calibration error (ECE).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FEATURES = ("log_uncertainty", "top1_similarity", "top1_gap")
# log of a zero uncertainty (a constant or collapsed head) stays finite
_LOG_FLOOR = 1e-12


def signal_matrix(uncertainty: Any, top1_similarity: Any, top1_gap: Any) -> np.ndarray:
    """The (N, 3) features of ``FEATURES``, in that order."""
    u = np.asarray(uncertainty, dtype=np.float64)
    columns = [np.log(np.maximum(u, _LOG_FLOOR)), np.asarray(top1_similarity, dtype=np.float64),
               np.asarray(top1_gap, dtype=np.float64)]
    if len({c.shape for c in columns}) != 1 or columns[0].ndim != 1:
        raise ValueError(f"uncertainty, top1_similarity and top1_gap must be 1-D and equally long, got "
                         f"{[c.shape for c in columns]}")
    x = np.stack(columns, axis=1)
    if not np.isfinite(x).all():
        raise ValueError("confidence signals contain NaN or inf")
    return x


@dataclass
class Confidence:
    """P(top-1 right) = sigmoid(intercept + coef . (x - mean) / scale), x = ``signal_matrix``."""

    coef: list[float]
    intercept: float
    mean: list[float]
    scale: list[float]
    fitted_on: str = "val"
    num_queries: int = 0
    features: tuple[str, ...] = FEATURES

    def predict(self, uncertainty: Any, top1_similarity: Any, top1_gap: Any) -> np.ndarray:
        x = (signal_matrix(uncertainty, top1_similarity, top1_gap) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(x @ np.asarray(self.coef) + self.intercept)))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "features": list(self.features)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Confidence":
        if tuple(data.get("features", ())) != FEATURES:
            raise ValueError(f"confidence was fitted on features {data.get('features')}, this version reads {FEATURES}")
        return cls(**{**data, "features": FEATURES})


def fit_confidence(uncertainty: Any, top1_similarity: Any, top1_gap: Any, hits: Any, *, fitted_on: str = "val") -> Confidence:
    """Logistic regression of ``hits`` (1: the top-1 neighbour was right) on the signals."""
    from sklearn.linear_model import LogisticRegression

    x = signal_matrix(uncertainty, top1_similarity, top1_gap)
    y = np.asarray(hits, dtype=np.float64)
    if y.shape != (len(x),):
        raise ValueError(f"{len(x)} queries but hits of shape {y.shape}")
    if len(np.unique(y)) < 2:
        raise ValueError(f"cannot fit a confidence on {fitted_on}: every top-1 neighbour was "
                         f"{'right' if y.all() else 'wrong'} ({len(y)} queries)")
    mean, scale = x.mean(0), x.std(0)
    scale[scale == 0] = 1.0  # a constant signal (the released code's uncertainty) gets weight 0
    model = LogisticRegression(C=1.0).fit((x - mean) / scale, y)
    return Confidence(model.coef_[0].tolist(), float(model.intercept_[0]), mean.tolist(), scale.tolist(),
                      fitted_on=fitted_on, num_queries=len(y))


def calibration(probability: Any, hits: Any, *, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error (ECE: the query-weighted mean |accuracy - confidence| over
    ``bins`` equal-width confidence bins) and the per-bin table behind a reliability plot."""
    p = np.asarray(probability, dtype=np.float64)
    y = np.asarray(hits, dtype=np.float64)
    if p.shape != y.shape or p.ndim != 1 or len(p) == 0:
        raise ValueError(f"probability and hits must be 1-D and equally long, got {p.shape} and {y.shape}")
    which = np.minimum((p * bins).astype(int), bins - 1)
    table = []
    ece = 0.0
    for b in range(bins):
        members = which == b
        if not members.any():
            continue
        accuracy, confidence = float(y[members].mean()), float(p[members].mean())
        ece += members.mean() * abs(accuracy - confidence)
        table.append({"low": b / bins, "high": (b + 1) / bins, "num_queries": int(members.sum()),
                      "confidence": confidence, "accuracy": accuracy})
    return {"ece": float(ece), "bins": table}
