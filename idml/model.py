"""The IDML model: backbone -> (avg + max) pooled feature -> semantic head and uncertainty head."""

from __future__ import annotations

import torch
from torch import nn

from .backbones import create_backbone


class IDMLModel(nn.Module):
    """Maps images to ``(mu, sigma)``: ``mu`` L2-normalised semantic embedding, ``sigma`` an
    un-normalised uncertainty embedding whose squared norm is the image's uncertainty.

    Inputs are float images in [0, 1] (or uint8 in [0, 255]), NCHW; the model applies the
    backbone's own mean/std so every caller (local loop, Ray workers, indexer) feeds the same.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, *, embedding_dim: int = 512,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), uncertainty_init_std: float = 1e-4):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.embedding_dim = embedding_dim
        self.semantic_head = nn.Linear(feature_dim, embedding_dim)
        self.uncertainty_head = nn.Linear(feature_dim, embedding_dim)
        # Start near zero uncertainty: a large initial ||sigma||^2 would shrink every
        # introspective distance towards 0 and stall the first epochs.
        nn.init.normal_(self.uncertainty_head.weight, std=uncertainty_init_std)
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
        sigma = self.uncertainty_head(feats)
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
                weights_path: str | None = None) -> IDMLModel:
    bb = create_backbone(backbone, pretrained=pretrained, weights_path=weights_path)
    return IDMLModel(bb.module, bb.feature_dim, embedding_dim=embedding_dim, mean=bb.mean, std=bb.std)
