"""Objectives that teach a stop-gradient uncertainty head beside the base loss
(``model.uncertainty``; the head reads a detached copy of the features, so the embedding and
retrieval are exactly the base loss's, and the uncertainty cannot trade retrieval for itself).

- ``pfe``: Probabilistic Face Embeddings' mutual likelihood score (Shi & Jain, ICCV 2019) on the
  batch's positive pairs: sum_d (mu_i - mu_j)^2 / (v_i + v_j) + log(v_i + v_j), with v = sigma^2.
  The optimum variance tracks how far an image sits from its class-mates; the log term is the
  counter-force that keeps variances from running away.
- ``failure``: a failure predictor, in the spirit of "Pretrained Visual Uncertainties" (a
  stop-gradient head trained on what retrieval gets wrong): ||sigma||^2 is the predicted odds
  that the image's nearest neighbour has another class, trained with a logistic loss on whether
  it does. The gallery is the batch plus a memory bank of recent embeddings of other classes, so
  as at test time an image competes with many classes, not the batch's 15: the bank holds only
  negatives, since an image's own stale copy from an earlier step would otherwise be its easy
  top-1.

``metric`` (IDML's introspective metric) has no objective here: its uncertainty is learned
through the base loss. Adding an objective is one entry in ``UNCERTAINTY_LOSSES``.
"""

from __future__ import annotations

import torch
from torch import nn

from .metric import image_uncertainty


class MutualLikelihoodLoss(nn.Module):
    """PFE's mutual likelihood score over the positive pairs of a batch (mean per dimension)."""

    def forward(self, mu: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
        positive = labels[i] == labels[j]
        if not positive.any():
            return sigma.sum() * 0.0  # no pair to learn from; keeps the graph for DDP
        i, j = i[positive], j[positive]
        mu = mu.detach()
        var = sigma.pow(2)
        pair_var = var[i] + var[j]
        return ((mu[i] - mu[j]).pow(2) / pair_var + pair_var.log()).mean()


class FailurePredictionLoss(nn.Module):
    """Logistic loss of log ||sigma||^2 against "the nearest other-class item is closer than the
    nearest same-class one" (batch + memory bank of other classes)."""

    def __init__(self, bank_size: int):
        super().__init__()
        self.bank_size = bank_size
        # Transient state, not part of the model: not saved, and rebuilt after a restart.
        self.register_buffer("bank", torch.empty(0), persistent=False)
        self.register_buffer("bank_labels", torch.empty(0, dtype=torch.long), persistent=False)

    def forward(self, mu: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mu = mu.detach()
        n = len(labels)
        sims = mu @ mu.T
        same = labels[:, None] == labels[None, :]
        self_pair = torch.eye(n, dtype=torch.bool, device=mu.device)
        nearest_positive = sims.masked_fill(~same | self_pair, -torch.inf).amax(1)
        nearest_negative = sims.masked_fill(same, -torch.inf).amax(1)
        if len(self.bank):
            bank_sims = (mu @ self.bank.T).masked_fill(labels[:, None] == self.bank_labels[None, :], -torch.inf)
            nearest_negative = torch.maximum(nearest_negative, bank_sims.amax(1))
        has_positive = torch.isfinite(nearest_positive)
        failed = (nearest_negative > nearest_positive).float()
        log_odds = image_uncertainty(sigma).log()
        self._remember(mu, labels)
        if not has_positive.any():
            return log_odds.sum() * 0.0
        return nn.functional.binary_cross_entropy_with_logits(log_odds[has_positive], failed[has_positive])

    @torch.no_grad()
    def _remember(self, mu: torch.Tensor, labels: torch.Tensor) -> None:
        self.bank = torch.cat([mu, self.bank.to(mu.dtype).reshape(-1, mu.shape[1])])[: self.bank_size]
        self.bank_labels = torch.cat([labels, self.bank_labels])[: self.bank_size]


UNCERTAINTY_LOSSES = {"pfe": MutualLikelihoodLoss, "failure": FailurePredictionLoss}


# Each objective's own knobs, as constructor arguments taken from the model config.
UNCERTAINTY_LOSS_OPTIONS = {"failure": {"bank_size": "failure_bank_size"}}


def build_uncertainty_loss(model_cfg) -> nn.Module | None:
    """The objective of ``model.uncertainty`` (None for ``metric``), with its knobs from ``model_cfg``."""
    method = model_cfg.uncertainty
    if method not in UNCERTAINTY_LOSSES:
        return None
    options = {arg: getattr(model_cfg, key) for arg, key in UNCERTAINTY_LOSS_OPTIONS.get(method, {}).items()}
    return UNCERTAINTY_LOSSES[method](**options)
