"""The IDML model: backbone -> (avg + max) pooled feature -> semantic head and uncertainty head."""

from __future__ import annotations

import torch
from torch import nn

from .backbones import create_backbone


UNCERTAINTY_NORMS = ("batch", "unit", "none")


class UncertaintyNorm(nn.Module):
    """How the uncertainty head's raw output becomes ``sigma`` (uncertainty = ||sigma||^2).

    - ``batch`` (default): like batch norm for the uncertainty budget. In training, sigma is
      scaled so that the batch's mean uncertainty is 1: an image can gain uncertainty only by
      taking it from the others in its batch. Without this the introspective loss rewards
      uncertainty everywhere (it shrinks positive distances far more than negative ones), so
      under Adam ||sigma||^2 runs away (625 in one warm-up epoch at lr 1e-3) until every
      distance is ~0 and training collapses. The budget is the counter-force: uncertainty is
      spent where it lowers the loss most (ambiguous images). At evaluation a running mean of
      the training batches' raw uncertainty is used, so 1 means "as uncertain as the average
      training image" and a single image's value does not depend on its batch.
    - ``unit``: the released code's variant, sigma L2-normalised: every image's uncertainty is 1
      (kept as an ablation; it carries no information).
    - ``none``: the raw head output, unbounded (kept as an ablation; it collapses at the
      learning rates plain ProxyAnchor trains with).
    """

    def __init__(self, mode: str = "batch", momentum: float = 0.1):
        super().__init__()
        if mode not in UNCERTAINTY_NORMS:
            raise ValueError(f"uncertainty norm {mode!r} is not one of {', '.join(UNCERTAINTY_NORMS)}")
        self.mode = mode
        self.momentum = momentum
        self.register_buffer("running_uncertainty", torch.ones(()))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return raw
        if self.mode == "unit":
            return nn.functional.normalize(raw, dim=1)
        if self.training:
            mean = raw.pow(2).sum(dim=1).mean()
            with torch.no_grad():
                self.running_uncertainty.lerp_(mean.detach().float(), self.momentum)  # fp32 buffer, also under autocast
        else:
            mean = self.running_uncertainty
        return raw * torch.rsqrt(mean.clamp_min(1e-12))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class IDMLModel(nn.Module):
    """Maps images to ``(mu, sigma)``: ``mu`` L2-normalised semantic embedding, ``sigma`` the
    uncertainty embedding whose squared norm is the image's uncertainty (per image, scaled by
    ``UncertaintyNorm``).

    Inputs are float images in [0, 1] (or uint8 in [0, 255]), NCHW; the model applies the
    backbone's own mean/std so every caller (local loop, Ray workers, indexer) feeds the same.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, *, embedding_dim: int = 512,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), uncertainty_norm: str = "batch"):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.embedding_dim = embedding_dim
        self.semantic_head = nn.Linear(feature_dim, embedding_dim)
        self.uncertainty_head = nn.Linear(feature_dim, embedding_dim)
        self.uncertainty_norm = UncertaintyNorm(uncertainty_norm)
        if uncertainty_norm == "none":
            # Unbounded: start near zero uncertainty, or every introspective distance starts ~0.
            nn.init.normal_(self.uncertainty_head.weight, std=1e-4)
            nn.init.zeros_(self.uncertainty_head.bias)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        x = (images - self.mean) / self.std
        fmap = self.backbone(x)
        return fmap.mean(dim=(2, 3)) + fmap.amax(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.pooled_features(images)
        mu = nn.functional.normalize(self.semantic_head(feats), dim=1)
        sigma = self.uncertainty_norm(self.uncertainty_head(feats))
        return mu, sigma

    def train(self, mode: bool = True):
        super().train(mode)
        # BN statistics stay frozen (as in the paper): small class-balanced batches would
        # otherwise overwrite the pretrained running statistics.
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Warm-up trains only the heads (and the loss's proxies): freeze the backbone."""
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)


def build_model(backbone: str = "efficientnet_lite0", *, embedding_dim: int = 512, pretrained: bool = True,
                weights_path: str | None = None, uncertainty_norm: str = "batch") -> IDMLModel:
    bb = create_backbone(backbone, pretrained=pretrained, weights_path=weights_path)
    return IDMLModel(bb.module, bb.feature_dim, embedding_dim=embedding_dim, mean=bb.mean, std=bb.std,
                     uncertainty_norm=uncertainty_norm)
