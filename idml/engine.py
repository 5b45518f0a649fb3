"""What a training run is made of (``build_training``: model, loss, optimizer, scheduler) and
the embedding pass evaluation uses. The epoch loop itself is ``idml.fit``.

Batches are any iterable of image tensors, or tuples whose first item is one (NCHW float in
[0, 1] or uint8), so a torch DataLoader and a Ray Data iterator drive the same code.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import Config
from .losses import build_loss
from .mixup import IntrospectiveObjective
from .model import IDMLModel, model_from_config
from .precision import autocast, autocast_dtype
from .uncertainty_losses import build_uncertainty_loss

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(module, "module", module)


@dataclass
class TrainingState:
    objective: IntrospectiveObjective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    @property
    def model(self) -> IDMLModel:
        return self.objective.model

    def state_dict(self) -> dict:
        return {
            "model": self.objective.model.state_dict(),
            "criterion": self.objective.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.objective.model.load_state_dict(state["model"])
        self.objective.criterion.load_state_dict(state["criterion"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_training(cfg: Config, num_classes: int, *, device: str | torch.device = "cpu") -> TrainingState:
    """Model, loss, optimizer and scheduler for ``cfg`` (AdamW with per-group learning rates:
    semantic head at ``lr``, uncertainty head at ``lr * uncertainty_lr_multiplier``, backbone at
    ``lr * backbone_lr_multiplier``, class proxies at ``lr * proxy_lr_multiplier``)."""
    model = model_from_config(cfg.model)
    criterion = build_loss(cfg.loss.name, num_classes=num_classes, embedding_dim=cfg.model.embedding_dim,
                           introspective=cfg.loss.introspective, uncertainty_weight=cfg.loss.uncertainty_weight,
                           margin=cfg.loss.margin, scale=cfg.loss.scale)
    objective = IntrospectiveObjective(model, criterion, mixup=cfg.loss.mixup, mixup_alpha=cfg.loss.mixup_alpha,
                                       autocast_dtype=autocast_dtype(device, cfg.train.precision),
                                       uncertainty_loss=build_uncertainty_loss(cfg.model)).to(device)
    if cfg.train.channels_last:
        objective.model.to(memory_format=torch.channels_last)
    t = cfg.train
    groups = [
        {"name": "backbone", "params": list(model.backbone.parameters()), "lr": t.lr * t.backbone_lr_multiplier},
        {"name": "semantic_head", "params": list(model.semantic_head.parameters()), "lr": t.lr},
        {"name": "uncertainty_head", "params": list(model.uncertainty_head.parameters()),
         "lr": t.lr * t.uncertainty_lr_multiplier},
    ]
    loss_params = list(criterion.parameters())
    if loss_params:
        groups.append({"name": "loss", "params": loss_params, "lr": t.lr * t.proxy_lr_multiplier})
    optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.lr_step, gamma=t.lr_gamma)
    return TrainingState(objective, optimizer, scheduler)


def _to_device(images: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@torch.no_grad()
def embed(
    model: IDMLModel,
    batches: Iterable[torch.Tensor | tuple],
    *,
    device: str | torch.device = "cpu",
    channels_last: bool = True,
    pooled_features: bool = False,
    progress: bool = True,
    total: int | None = None,
    desc: str = "embed",
    precision: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``(mu, sigma)`` of every image in ``batches`` (batches may be image tensors
    or tuples whose first item is the image tensor). ``pooled_features=True`` returns the
    normalised backbone feature instead of mu (the frozen-backbone baseline) and empty sigma.
    ``precision``: the backbone's (``idml.precision``); the outputs are fp32."""
    model.eval()
    dtype = autocast_dtype(device, precision)
    mus, sigmas = [], []
    for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        images = _to_device(images, device, channels_last)
        if pooled_features:
            with autocast(device, dtype):
                feats = model.pooled_features(images)
            feats = torch.nn.functional.normalize(feats.float(), dim=1)
            mus.append(feats.cpu())
            sigmas.append(feats.new_zeros(len(feats), 0).cpu())
        else:
            with autocast(device, dtype):
                mu, sigma = model(images)
            mus.append(mu.float().cpu())
            sigmas.append(sigma.float().cpu())
    if not mus:
        raise ValueError("nothing to embed: the batch iterable was empty")
    return torch.cat(mus).numpy(), torch.cat(sigmas).numpy()

