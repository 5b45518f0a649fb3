"""The introspective metric.

An image is represented by a semantic embedding ``mu`` (L2-normalised) and an uncertainty
embedding ``sigma`` (not normalised: its squared norm is the image's uncertainty). For a pair,

    alpha = ||mu_i - mu_j||^2                      (in [0, 4])
    beta  = ||sigma_i||^2 + ||sigma_j||^2          (a proxy has sigma = 0)
    D     = alpha * exp(-lambda * beta / alpha)    (introspective distance)
    s     = 1 - D / 2                              (introspective similarity; = cos at lambda 0)

pytorch-metric-learning losses see one embedding per image, so ``mu`` and ``sigma`` travel
packed side by side (``pack``); the distances below unpack them. A reference embedding that is
only ``semantic_dim`` wide (a class proxy) has zero uncertainty.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_metric_learning.distances import BaseDistance, LpDistance

# alpha below this counts as zero: exp(-lambda*beta/alpha) is then 0 (or 1 when lambda*beta is
# 0), so clamping only avoids 0/0 without changing any value that matters.
_ALPHA_EPS = 1e-12


def pack(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Pack semantic and uncertainty embeddings into one (N, 2D) tensor for PML losses."""
    if mu.shape != sigma.shape:
        raise ValueError(f"mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} must have the same shape")
    return torch.cat([mu, sigma], dim=1)


def image_uncertainty(sigma):
    """Uncertainty of each image: the squared norm of its uncertainty embedding (the one
    definition every module uses; rows of a torch tensor, or of a numpy array in float64)."""
    if isinstance(sigma, torch.Tensor):
        return sigma.pow(2).sum(dim=1)
    sigma = np.asarray(sigma, dtype=np.float64)
    return np.einsum("ij,ij->i", sigma, sigma)


def introspective_distance(alpha: torch.Tensor, beta: torch.Tensor, uncertainty_weight: float) -> torch.Tensor:
    """D = alpha * exp(-lambda * beta / alpha), safe at alpha -> 0 (where D -> 0)."""
    if uncertainty_weight == 0:
        return alpha
    t = uncertainty_weight * beta / alpha.clamp_min(_ALPHA_EPS)
    return alpha * torch.exp(-t)


class _IntrospectiveMixin:
    """Unpacking and normalisation shared by the two PML distance classes below."""

    semantic_dim: int
    uncertainty_weight: float

    def _init_introspective(self, semantic_dim: int, uncertainty_weight: float) -> None:
        if semantic_dim <= 0:
            raise ValueError(f"semantic_dim must be positive, got {semantic_dim}")
        if uncertainty_weight < 0:
            raise ValueError(f"uncertainty_weight (lambda) must be >= 0, got {uncertainty_weight}")
        self.semantic_dim = int(semantic_dim)
        self.uncertainty_weight = float(uncertainty_weight)

    def _split(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        width = emb.shape[1]
        if width == self.semantic_dim:
            return emb, None
        if width == 2 * self.semantic_dim:
            return emb[:, : self.semantic_dim], emb[:, self.semantic_dim :]
        raise ValueError(
            f"embeddings are {width} wide; expected {self.semantic_dim} (semantic only, e.g. a proxy) "
            f"or {2 * self.semantic_dim} (semantic + uncertainty, see idml.metric.pack)"
        )

    def normalize(self, embeddings: torch.Tensor, dim: int = 1, **kwargs) -> torch.Tensor:
        # Only the semantic part lives on the sphere; the uncertainty part keeps its norm.
        mu, sigma = self._split(embeddings)
        mu = torch.nn.functional.normalize(mu, p=2, dim=dim, **kwargs)
        return mu if sigma is None else torch.cat([mu, sigma], dim=1)

    def get_norm(self, embeddings, dim=1, **kwargs):
        return torch.norm(self._split(embeddings)[0], p=2, dim=dim, **kwargs)

    @staticmethod
    def _uncertainty(sigma: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(len(like)) if sigma is None else image_uncertainty(sigma)

    def _unpack_pair(self, query_emb, ref_emb, *, matrix: bool):
        mu_q, sigma_q = self._split(query_emb)
        mu_r, sigma_r = self._split(ref_emb)
        u_q, u_r = self._uncertainty(sigma_q, mu_q), self._uncertainty(sigma_r, mu_r)
        beta = u_q[:, None] + u_r[None, :] if matrix else u_q + u_r
        return mu_q, mu_r, beta


class IntrospectiveDistance(_IntrospectiveMixin, LpDistance):
    """PML distance returning D**(power/2): power=1 pairs with losses written on Euclidean
    distance (contrastive, triplet, margin), power=2 with those on squared distance (ProxyNCA,
    FastAP). At lambda=0 it equals PML's normalised ``LpDistance(power=power)``.

    Subclasses ``LpDistance`` because some PML code asserts that type (FastAP).
    """

    def __init__(self, semantic_dim: int, uncertainty_weight: float, power: int = 1, **kwargs):
        if power not in (1, 2):
            raise ValueError(f"power must be 1 or 2, got {power}")
        super().__init__(normalize_embeddings=True, p=2, power=power, **kwargs)
        self._init_introspective(semantic_dim, uncertainty_weight)

    def forward(self, query_emb, ref_emb=None):
        # BaseDistance.forward would raise the matrix to `power` again; compute_mat applies it.
        self.reset_stats()
        self.check_shapes(query_emb, ref_emb)
        query = self.normalize(query_emb)
        ref = query if ref_emb is None else self.normalize(ref_emb)
        return self.compute_mat(query, ref)

    def compute_mat(self, query_emb, ref_emb):
        mu_q, mu_r, beta = self._unpack_pair(query_emb, ref_emb, matrix=True)
        # cdist is exact (with a zero gradient) at zero distance, unlike sqrt(2 - 2cos).
        return self._from_euclidean(torch.cdist(mu_q, mu_r), beta)

    def pairwise_distance(self, query_emb, ref_emb):
        mu_q, mu_r, beta = self._unpack_pair(self.normalize(query_emb), self.normalize(ref_emb), matrix=False)
        return self._from_euclidean(torch.nn.functional.pairwise_distance(mu_q, mu_r, p=2), beta)

    def _from_euclidean(self, dist: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        if self.uncertainty_weight == 0:
            return dist if self.power == 1 else dist.pow(2)
        alpha = dist.pow(2)
        t = self.uncertainty_weight * beta / alpha.clamp_min(_ALPHA_EPS)
        # sqrt(D) = dist * exp(-t/2): no sqrt, so no infinite gradient at 0.
        return dist * torch.exp(-t / 2) if self.power == 1 else alpha * torch.exp(-t)


class IntrospectiveSimilarity(_IntrospectiveMixin, BaseDistance):
    """PML similarity s = 1 - D/2; at lambda=0 it equals PML's ``CosineSimilarity``."""

    def __init__(self, semantic_dim: int, uncertainty_weight: float, **kwargs):
        super().__init__(normalize_embeddings=True, p=2, power=1, is_inverted=True, **kwargs)
        self._init_introspective(semantic_dim, uncertainty_weight)

    def compute_mat(self, query_emb, ref_emb):
        mu_q, mu_r, beta = self._unpack_pair(query_emb, ref_emb, matrix=True)
        cos = mu_q @ mu_r.t()
        if self.uncertainty_weight == 0:
            return cos
        alpha = (2 - 2 * cos).clamp_min(0)  # rounding can push cos above 1
        return 1 - introspective_distance(alpha, beta, self.uncertainty_weight) / 2

    def pairwise_distance(self, query_emb, ref_emb):
        mu_q, mu_r, beta = self._unpack_pair(self.normalize(query_emb), self.normalize(ref_emb), matrix=False)
        alpha = (mu_q - mu_r).pow(2).sum(dim=1)
        return 1 - introspective_distance(alpha, beta, self.uncertainty_weight) / 2
