"""What a training run is made of (``build_training``: model, objective, optimizer, scheduler),
and the process settings every runner applies first (seed, threads). The epoch loop itself is
``idml.training.loop``; the embedding pass evaluation uses is ``idml.evaluation.embedding``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..config import Config
from ..losses import build_loss
from ..model import IDMLModel, model_from_config
from ..precision import autocast_dtype
from ..uncertainty_losses import build_uncertainty_loss
from .objective import IntrospectiveObjective

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
