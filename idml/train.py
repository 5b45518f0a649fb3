"""A plain single-process training run: the same loop the Ray Train workers use, driven by a
torch DataLoader with class-balanced batches."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import DataLoader

from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import Config, validate_config
from .data import ImageShardDataset, read_manifest, resolve_dataset
from .engine import build_training, configure_threads, seed_everything, train_one_epoch
from .evaluation.plots import plot_recall_curves
from .evaluation.protocol import evaluate_model, summary_metrics
from .transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

SELECTION_METRIC = "recall@1"


def class_balanced_loader(dataset: ImageShardDataset, cfg: Config) -> DataLoader:
    """Batches of ``batch_size / images_per_class`` classes with ``images_per_class`` images each."""
    t = cfg.train
    classes_per_batch = t.batch_size // t.images_per_class
    if dataset.num_classes < classes_per_batch:
        raise ValueError(f"train.batch_size {t.batch_size} needs {classes_per_batch} classes of {t.images_per_class} images, "
                         f"but the training split has only {dataset.num_classes} classes; lower train.batch_size")
    sampler = MPerClassSampler(dataset.targets, m=t.images_per_class, batch_size=t.batch_size,
                               length_before_new_iter=len(dataset))
    return DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, drop_last=True,
                      num_workers=cfg.data.workers, persistent_workers=cfg.data.workers > 0)


def checkpoint_state(state, cfg: Config, epoch: int, history: list, best: dict | None) -> dict[str, Any]:
    return {**state.state_dict(), "epoch": epoch, "config": cfg.to_dict(), "history": history, "best": best}


def train_local(cfg: Config, *, progress: bool = True, resume: bool = True) -> dict[str, Any]:
    """Train with ``cfg`` and evaluate the best checkpoint (chosen on the validation split,
    which holds classes unseen in training) on the test split. Writes ``last.pt``, ``best.pt``,
    ``metrics.json`` and plots to ``cfg.output_dir``; resumes from ``last.pt`` if present."""
    validate_config(cfg)
    seed_everything(cfg.train.seed)
    configure_threads(cfg.train.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = resolve_dataset(cfg.data.dataset)
    splits = read_manifest(root)["splits"]
    size = cfg.data.image_size
    train_ds = ImageShardDataset(root, cfg.data.train_split, transform=train_transform(size))
    has_val = cfg.data.val_split in splits and splits[cfg.data.val_split]["num_images"] > 0
    val_ds = ImageShardDataset(root, cfg.data.val_split, transform=eval_transform(size)) if has_val else None
    if not has_val:
        log.warning("no %r split: the last epoch's model is kept (convert with val_fraction > 0 to select on held-out classes)",
                    cfg.data.val_split)

    state = build_training(cfg, train_ds.num_classes)
    start_epoch, history, best = 0, [], None
    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        state.load_state_dict(ckpt)
        start_epoch, history, best = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"]
        log.info("resumed from %s at epoch %d", last_path, start_epoch)

    loader = class_balanced_loader(train_ds, cfg)
    for epoch in range(start_epoch, cfg.train.epochs):
        stats = train_one_epoch(state.objective, state.optimizer, loader, epoch=epoch, train_cfg=cfg.train,
                                progress=progress, total=len(loader))
        state.scheduler.step()
        record: dict[str, Any] = {"epoch": epoch, **{f"train/{k}": v for k, v in stats.items()}}
        last_epoch = epoch == cfg.train.epochs - 1
        if val_ds is not None and ((epoch + 1) % cfg.train.eval_every == 0 or last_epoch):
            val = evaluate_model(state.model, val_ds, cfg, uncertainty=False, progress=progress)
            record.update({f"val/{k}": v for k, v in summary_metrics(val).items()})
            score = val["metrics"][SELECTION_METRIC]
            if best is None or score > best["score"]:
                best = {"epoch": epoch, "metric": SELECTION_METRIC, "score": score}
                save_checkpoint(best_path, checkpoint_state(state, cfg, epoch, history + [record], best))
        history.append(record)
        log.info("epoch %d: %s", epoch, _short(record))
        save_checkpoint(last_path, checkpoint_state(state, cfg, epoch, history, best))

    return finish(cfg, root, best_path if best is not None else last_path, history, progress=progress)


def finish(cfg: Config, root: str, checkpoint: Path, history: list, *, progress: bool = True) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on the test split; write metrics.json and the plots."""
    test_ds = ImageShardDataset(root, cfg.data.test_split, transform=eval_transform(cfg.data.image_size))
    return evaluate_and_summarize(cfg, checkpoint, test_ds, history, progress=progress)[0]


def evaluate_and_summarize(cfg: Config, checkpoint: Path, test_ds, history: list, *, progress: bool = True,
                           device: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """``finish`` on any test dataset ``evaluate_model`` accepts (the Ray pipeline streams its
    own); returns the summary and the raw evaluation result (embeddings included)."""
    out = Path(cfg.output_dir)
    ckpt = load_checkpoint(checkpoint)
    model, _ = model_from_checkpoint(ckpt)
    result = evaluate_model(model.to(device), test_ds, cfg, device=device, plot_path=out / "uncertainty.png",
                            progress=progress)
    if history:
        plot_recall_curves(history, out / "recall_curves.png", keys=("recall@1", "map@r"))
    summary = {
        "checkpoint": str(checkpoint),
        "selected_epoch": ckpt["epoch"],
        "test": summary_metrics(result),
        "cross_domain": result["cross_domain"],
        "uncertainty_bins": result["uncertainty_bins"],
        "train_images_per_s": _mean([h.get("train/images_per_s") for h in history]),
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary, result


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _short(record: dict) -> str:
    keys = ("train/loss", "train/images_per_s", "val/recall@1", "val/map@r")
    return ", ".join(f"{k}={record[k]:.4g}" for k in keys if k in record)
