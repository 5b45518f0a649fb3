"""The IDML model: backbone -> (avg + max) pooled feature -> semantic head and uncertainty head."""

from __future__ import annotations

import math

import torch
from torch import nn

from .backbones import create_backbone
from .uncertainty_losses import UNCERTAINTY_LOSSES


UNCERTAINTY_NORMS = ("batch", "unit", "none", "log_variance")
# How the uncertainty head learns (idml.uncertainty_losses): "metric" through IDML's
# introspective metric inside the base loss; "pfe" and "failure" beside it, from a
# stop-gradient copy of the features, so the embedding (and retrieval) never feels them.
UNCERTAINTY_METHODS = ("metric", *UNCERTAINTY_LOSSES)
# The stop-gradient heads' width: a linear map of frozen features was too weak to tell which
# images get confused (it can only re-weight what the embedding already separates).
HEAD_HIDDEN = 512


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
    - ``log_variance``: the head predicts a log-variance per dimension, sigma = exp(raw / 2),
      so ||sigma||^2 is the total variance (PFE) or the predicted odds of a wrong top-1
      neighbour (the failure predictor); always positive, and log ||sigma||^2 is a smooth
      logsumexp of the head's output.
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
        if self.mode == "log_variance":
            return torch.exp(0.5 * raw)
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
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), uncertainty_norm: str = "batch",
                 uncertainty: str = "metric"):
        super().__init__()
        if uncertainty not in UNCERTAINTY_METHODS:
            raise ValueError(f"uncertainty {uncertainty!r} is not one of {', '.join(UNCERTAINTY_METHODS)}")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.embedding_dim = embedding_dim
        self.semantic_head = nn.Linear(feature_dim, embedding_dim)
        # A stop-gradient head learns from the features without moving them (see UNCERTAINTY_METHODS).
        self.detach_uncertainty = uncertainty != "metric"
        if self.detach_uncertainty:
            uncertainty_norm = "log_variance"
            last = nn.Linear(HEAD_HIDDEN, embedding_dim)
            self.uncertainty_head = nn.Sequential(nn.Linear(feature_dim, HEAD_HIDDEN), nn.ReLU(), last)
            # Start at a total variance (odds of failure) of about e^-1, whatever the width.
            nn.init.zeros_(last.weight)
            nn.init.constant_(last.bias, -1.0 - math.log(embedding_dim))
        else:
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
        feats = self.pooled_features(images).float()
        # The heads and the uncertainty budget stay in fp32 when the backbone runs under bf16
        # autocast (idml.precision): they cost nothing, and mu feeds every distance.
        with torch.autocast(feats.device.type, enabled=False):
            mu = nn.functional.normalize(self.semantic_head(feats), dim=1)
            sigma = self.uncertainty_norm(self.uncertainty_head(feats.detach() if self.detach_uncertainty else feats))
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
                weights_path: str | None = None, uncertainty_norm: str = "batch", uncertainty: str = "metric") -> IDMLModel:
    bb = create_backbone(backbone, pretrained=pretrained, weights_path=weights_path)
    return IDMLModel(bb.module, bb.feature_dim, embedding_dim=embedding_dim, mean=bb.mean, std=bb.std,
                     uncertainty_norm=uncertainty_norm, uncertainty=uncertainty)


def model_from_config(model_cfg, *, pretrained: bool | None = None) -> IDMLModel:
    """The model a ``ModelConfig`` describes (``pretrained`` overrides the config's: a checkpoint
    holds every weight, so loading one skips fetching them)."""
    return build_model(model_cfg.backbone, embedding_dim=model_cfg.embedding_dim,
                       pretrained=model_cfg.pretrained if pretrained is None else pretrained,
                       weights_path=model_cfg.weights_path, uncertainty_norm=model_cfg.uncertainty_norm,
                       uncertainty=model_cfg.uncertainty)
