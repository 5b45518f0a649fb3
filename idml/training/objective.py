"""Mixup, the signal that teaches the uncertainty head (see the reference's 'How uncertainty
is learned'): a mixed image cannot sit near both class centres, so the cheapest way to lower
its loss is to raise its uncertainty."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..metric import image_uncertainty
from ..precision import autocast


@dataclass
class MixedBatch:
    images: torch.Tensor
    labels_a: torch.Tensor
    labels_b: torch.Tensor
    lam: float


def mix_batch(images: torch.Tensor, labels: torch.Tensor, *, alpha: float = 1.0) -> MixedBatch:
    """Mix each image with a random partner: lam * x + (1 - lam) * x[perm], lam ~ Beta(alpha, alpha)."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(images)).to(images.device)
    return MixedBatch(lam * images + (1 - lam) * images[perm], labels, labels[perm], lam)


class IntrospectiveObjective(torch.nn.Module):
    """Model + metric loss (+ mixup) as one module, so a DDP wrapper around it also
    synchronises the loss's own parameters (class proxies)."""

    def __init__(self, model: torch.nn.Module, criterion: torch.nn.Module, *, mixup: bool = True, mixup_alpha: float = 1.0,
                 autocast_dtype: torch.dtype | None = None, uncertainty_loss: torch.nn.Module | None = None):
        super().__init__()
        self.model = model
        self.criterion = criterion
        # A stop-gradient head's own objective (idml.uncertainty_losses), on the clean images.
        self.uncertainty_loss = uncertainty_loss
        self.mixup = mixup
        self.mixup_alpha = mixup_alpha
        self.autocast_dtype = autocast_dtype  # the backbone's (idml.precision); the loss runs in fp32

    @property
    def trains_uncertainty(self) -> bool:
        """Whether the uncertainty head gets a gradient (DDP must know when it does not)."""
        return self.uncertainty_loss is not None or self.criterion.uses_uncertainty

    def _with_uncertainty_loss(self, loss, mu, sigma, labels, stats):
        if self.uncertainty_loss is None:
            return loss, stats
        extra = self.uncertainty_loss(mu, sigma, labels)
        return loss + extra, {**stats, "uncertainty_loss": extra.detach()}

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(images.device, self.autocast_dtype):
            return self.model(images)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """loss = L(clean, y) + lam * L(mixed, y_a) + (1 - lam) * L(mixed, y_b)."""
        if not self.mixup:
            mu, sigma = self.embed(images)
            loss = self.criterion(mu, sigma, labels)
            return self._with_uncertainty_loss(loss, mu, sigma, labels,
                                               {"uncertainty_clean": image_uncertainty(sigma.detach()).mean()})
        mixed = mix_batch(images, labels, alpha=self.mixup_alpha)
        # One forward over clean+mixed: BN statistics are frozen, so batch composition is free.
        mu, sigma = self.embed(torch.cat([images, mixed.images]))
        n = len(images)
        mu_c, sigma_c, mu_m, sigma_m = mu[:n], sigma[:n], mu[n:], sigma[n:]
        loss = (
            self.criterion(mu_c, sigma_c, labels)
            + mixed.lam * self.criterion(mu_m, sigma_m, mixed.labels_a)
            + (1 - mixed.lam) * self.criterion(mu_m, sigma_m, mixed.labels_b)
        )
        with torch.no_grad():
            stats = {
                "uncertainty_clean": image_uncertainty(sigma_c).mean(),
                "uncertainty_mixed": image_uncertainty(sigma_m).mean(),
            }
        return self._with_uncertainty_loss(loss, mu_c, sigma_c, labels, stats)
