"""The evaluation workflow behind ``idml eval``: a checkpoint (or a model URI, or the frozen
pretrained backbone) on one split of a dataset, with the full protocol (``evaluate_model``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint, model_from_checkpoint
from ..config import Config, check_output_dir, validate_config
from ..data import ImageShardDataset, open_dataset, resolve_dataset
from ..evaluation.confidence import Confidence
from ..evaluation.protocol import evaluate_model, summary_metrics, uncertainty_report
from ..model import model_from_config
from ..transforms import eval_transform
from .setup import configure_threads


@dataclass
class EvaluateRequest:
    """What to evaluate. ``checkpoint``: a file written by ``idml train``, a path on shared storage,
    or an MLflow model URI; None evaluates the config's pretrained backbone (``frozen_backbone``).
    The checkpoint decides the model and preprocessing; ``cfg`` gives data and evaluation options."""

    cfg: Config
    checkpoint: str | None = None
    split: str | None = None  # default: cfg.data.test_split
    plots: bool = True  # uncertainty_<split>.png and selective_retrieval.png in cfg.output_dir
    progress: bool = True


@dataclass
class EvaluateResult:
    name: str  # what was evaluated, for tables
    split: str
    metrics: dict[str, float]  # flat scalars (summary_metrics)
    result: dict[str, Any]  # evaluate_model's full result, embeddings included

    def report(self) -> dict[str, Any]:
        """The JSON-ready part: metrics, cross-domain retrieval, uncertainty analyses."""
        return {"metrics": self.metrics, "cross_domain": self.result["cross_domain"], **uncertainty_report(self.result)}


def evaluate_checkpoint(request: EvaluateRequest) -> EvaluateResult:
    cfg = request.cfg
    if request.plots:
        check_output_dir(cfg.output_dir)  # a file in the way is named before any work
    frozen = request.checkpoint is None
    confidence = None
    if frozen:
        validate_config(cfg)
        model = model_from_config(cfg.model).eval()
        name = f"frozen {cfg.model.backbone}"
    else:
        from ..registry import is_model_uri, resolve_checkpoint

        path = resolve_checkpoint(request.checkpoint)
        state = load_checkpoint(path)
        model, trained = model_from_checkpoint(state, path=path)
        cfg.model, cfg.data.image_size = trained.model, trained.data.image_size
        # The confidence fitted on validation when the model was trained, if it was.
        confidence = Confidence.from_dict(state["confidence"]) if state.get("confidence") else None
        name = request.checkpoint if is_model_uri(request.checkpoint) else Path(request.checkpoint).name
    configure_threads(cfg.train.threads)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    source = open_dataset(resolve_dataset(cfg.data.dataset))
    source.check_local()
    split = request.split or cfg.data.test_split
    dataset = ImageShardDataset(source.root, split, transform=eval_transform(cfg.data.image_size))
    plot_path = None
    if request.plots and not frozen:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_path = out / f"uncertainty_{split}.png"
    result = evaluate_model(model, dataset, cfg, pooled_features=frozen, confidence=confidence, plot_path=plot_path,
                            progress=request.progress)
    return EvaluateResult(name, split, summary_metrics(result), result)
