"""Metric-learning losses, each usable plain or with the introspective metric (IDML).

The losses and miners are pytorch-metric-learning's; IDML swaps their distance for
``IntrospectiveSimilarity`` / ``IntrospectiveDistance`` and feeds them packed
``[mu | sigma]`` embeddings. With ``uncertainty_weight=0`` every IDML loss equals its base loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from pytorch_metric_learning import distances, losses, miners
from pytorch_metric_learning.utils import distributed

from .metric import IntrospectiveDistance, IntrospectiveSimilarity, pack


@dataclass(frozen=True)
class _LossSpec:
    # Which PML distance the base loss is written on: "cosine", or an Lp power (1 or 2).
    distance: str | int
    default_margin: float | None
    default_scale: float | None
    # Builds (loss, miner, mine_on_semantic) from (distance, num_classes, dim, margin, scale).
    build: Callable


def _proxy_anchor(distance, num_classes, dim, margin, scale):
    return losses.ProxyAnchorLoss(num_classes, dim, margin=margin, alpha=scale, distance=distance), None, False


def _proxy_nca(distance, num_classes, dim, margin, scale):
    return losses.ProxyNCALoss(num_classes, dim, softmax_scale=scale, distance=distance), None, False


def _multi_similarity(distance, num_classes, dim, margin, scale):
    # `margin` is the miner's epsilon; alpha/beta/base are the paper's MS defaults.
    loss = losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5, distance=distance)
    return loss, miners.MultiSimilarityMiner(epsilon=margin, distance=distance), False


def _contrastive(distance, num_classes, dim, margin, scale):
    return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=margin, distance=distance), None, False


def _triplet(distance, num_classes, dim, margin, scale):
    loss = losses.TripletMarginLoss(margin=margin, distance=distance)
    miner = miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard", distance=distance)
    return loss, miner, False


def _margin(distance, num_classes, dim, margin, scale):
    # Distance-weighted sampling corrects for the density of distances on the unit sphere of
    # the *semantic* space, so it runs on mu alone with the plain Euclidean distance.
    loss = losses.MarginLoss(margin=margin, nu=0.0, beta=1.2, distance=distance)
    return loss, miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4), True


def _fastap(distance, num_classes, dim, margin, scale):
    return losses.FastAPLoss(num_bins=int(scale), distance=distance), None, False


_SPECS = {
    "proxy_anchor": _LossSpec("cosine", 0.1, 32.0, _proxy_anchor),
    "proxy_nca": _LossSpec(2, None, 3.0, _proxy_nca),
    "multi_similarity": _LossSpec("cosine", 0.1, None, _multi_similarity),
    "contrastive": _LossSpec(1, 0.5, None, _contrastive),
    "triplet": _LossSpec(1, 0.1, None, _triplet),
    "margin": _LossSpec(1, 0.2, None, _margin),
    # FastAP's `scale` is its histogram bin count.
    "fastap": _LossSpec(2, None, 10.0, _fastap),
}
LOSS_NAMES = tuple(_SPECS)  # a new loss is one builder above and one entry in _SPECS


def loss_defaults(name: str) -> dict:
    """Default margin and scale of a base loss (None where the loss has no such knob)."""
    spec = _spec(name)
    return {"margin": spec.default_margin, "scale": spec.default_scale}


def _spec(name: str) -> _LossSpec:
    if name not in _SPECS:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    return _SPECS[name]


class MetricLoss(torch.nn.Module):
    """A PML loss (and optional miner) called on a batch of (mu, sigma, labels).

    ``introspective=False`` is the plain base loss on mu; ``True`` feeds packed [mu | sigma]
    through the introspective distance.
    """

    def __init__(self, loss, miner=None, *, introspective: bool, mine_on_semantic: bool = False):
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.introspective = introspective
        self.mine_on_semantic = mine_on_semantic
        self.gather = False  # see gather_across_workers

    @property
    def uses_proxies(self) -> bool:
        # Proxy losses (ProxyAnchor, ProxyNCA) are the ones with learnable parameters.
        return any(True for _ in self.loss.parameters())

    def gather_across_workers(self, enabled: bool = True) -> bool:
        """Under torch.distributed (DDP), let a pair-based loss and its miner see the embeddings
        of every worker, via pytorch-metric-learning's distributed wrappers: each worker's loss
        is ``world_size * L(all workers' embeddings)`` with gradients flowing into its own
        embeddings only, so DDP's gradient averaging yields exactly the gradient of ``L`` on the
        concatenated batch (the value is ``world_size`` times ``L``).

        Proxy losses are left alone (returns False): their proxies are parameters, kept
        identical on every worker by DDP's gradient all-reduce, and gathering would multiply
        their gradient by the world size.
        """
        self.gather = bool(enabled) and not self.uses_proxies
        return self.gather

    @property
    def uncertainty_weight(self) -> float:
        return self.loss.distance.uncertainty_weight if self.introspective else 0.0

    @property
    def uses_uncertainty(self) -> bool:
        """Whether sigma reaches the loss: not for the plain loss, nor at lambda = 0 (then the
        uncertainty head gets no gradient, which DDP must be told about)."""
        return self.uncertainty_weight > 0

    def forward(self, mu: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings = pack(mu, sigma) if self.introspective else mu
        loss, miner = self.loss, self.miner
        if self.gather and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Both wrappers order the gathered batch the same way (own rows first), so the
            # miner's indices address the loss's gathered embeddings.
            loss = distributed.DistributedLossWrapper(loss)
            miner = None if miner is None else distributed.DistributedMinerWrapper(miner)
        indices = None
        if miner is not None:
            indices = miner(mu if self.mine_on_semantic else embeddings, labels)
        return loss(embeddings, labels, indices)


def build_loss(
    name: str = "proxy_anchor",
    *,
    num_classes: int,
    embedding_dim: int,
    introspective: bool = True,
    uncertainty_weight: float = 0.1,
    margin: float | None = None,
    scale: float | None = None,
) -> MetricLoss:
    """Build base loss ``name``; with ``introspective`` its distance becomes the IDML metric.

    ``margin``/``scale`` default per loss (see ``loss_defaults``); passing one to a loss that
    has no such knob is an error rather than silently ignored.
    """
    spec = _spec(name)
    if num_classes < 1 or embedding_dim < 1:
        raise ValueError(f"num_classes and embedding_dim must be positive, got {num_classes}, {embedding_dim}")
    if margin is not None and spec.default_margin is None:
        raise ValueError(f"loss {name!r} has no margin parameter")
    if scale is not None and spec.default_scale is None:
        raise ValueError(f"loss {name!r} has no scale parameter")
    margin = spec.default_margin if margin is None else float(margin)
    scale = spec.default_scale if scale is None else float(scale)
    distance = _distance(spec.distance, embedding_dim, uncertainty_weight if introspective else None)
    loss, miner, mine_on_semantic = spec.build(distance, num_classes, embedding_dim, margin, scale)
    return MetricLoss(loss, miner, introspective=introspective, mine_on_semantic=mine_on_semantic)


def _distance(kind: str | int, dim: int, uncertainty_weight: float | None):
    if uncertainty_weight is None:
        if kind == "cosine":
            return distances.CosineSimilarity()
        return distances.LpDistance(normalize_embeddings=True, p=2, power=kind)
    if kind == "cosine":
        return IntrospectiveSimilarity(dim, uncertainty_weight)
    return IntrospectiveDistance(dim, uncertainty_weight, power=kind)
