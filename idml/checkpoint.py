"""Checkpoints are plain dicts (model, criterion, optimizer, scheduler, epoch, config, metrics)
of tensors and builtins, so ``torch.load(weights_only=True)`` reads them without unpickling code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .config import Config, config_from_dict
from .model import IDMLModel, build_model


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"model", "config", "epoch"} - set(state)
    if missing:
        raise ValueError(f"{path} is not an idml checkpoint (missing {', '.join(sorted(missing))})")
    return state


def checkpoint_config(state: dict[str, Any]) -> Config:
    data = state["config"]
    if "uncertainty_norm" not in data.get("model", {}):
        # Written before model.uncertainty_norm existed: those models used the raw head output.
        data = {**data, "model": {**data["model"], "uncertainty_norm": "none"}}
    return config_from_dict(data)


def model_from_checkpoint(path_or_state: str | Path | dict[str, Any]) -> tuple[IDMLModel, Config]:
    """Rebuild the model a checkpoint was trained with and load its weights (eval mode)."""
    state = path_or_state if isinstance(path_or_state, dict) else load_checkpoint(path_or_state)
    cfg = checkpoint_config(state)
    # The checkpoint holds every weight, so skip fetching pretrained ones.
    model = build_model(cfg.model.backbone, embedding_dim=cfg.model.embedding_dim, pretrained=False,
                        uncertainty_norm=cfg.model.uncertainty_norm)
    # strict=False only for the one buffer older checkpoints lack; anything else must match.
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if unexpected or set(missing) - {"uncertainty_norm.running_uncertainty"}:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    return model.eval(), cfg

