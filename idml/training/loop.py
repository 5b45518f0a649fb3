"""The one epoch loop, shared by the local runner (``idml.training.local``) and the Ray Train workers
(``pipelines.train_worker``): warm-up, evaluation cadence, best selection on validation,
``last.pt``/``best.pt`` and the history. What differs between them (how batches arrive, DDP,
reporting and logging) comes in through ``Hooks``.

The loop consumes any iterable of ``(images, targets)`` batches (images NCHW float in [0, 1] or
uint8; targets contiguous class indices), so a torch DataLoader and a Ray Data iterator drive
the same code.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from ..config import Config, TrainConfig
from ..evaluation.embedding import embed, to_device
from ..evaluation.confidence import Confidence, fit_confidence
from ..evaluation.plots import has_recall_curves, plot_recall_curves, save_retrieval_grid, save_uncertainty_extremes
from ..evaluation.protocol import evaluate_model, summary_metrics, uncertainty_report
from ..evaluation.selective import query_signals
from ..evaluation.uncertainty import image_uncertainty
from .setup import TrainingState

log = logging.getLogger(__name__)

# Validation metric that picks best.pt (the test split never chooses a checkpoint). MAP@R, not
# R@1: on a few hundred validation queries R@1 moves in coarse steps and ties, and picked epochs
# 4 and 6 over a last epoch 3.8 and 2.0 test R@1 better in two emoji runs (docs/results.md).
SELECTION_METRIC = "map@r"
SUMMARY_KEYS = ("train/loss", "train/images_per_s", "train/data_wait_s", "val/recall@1", "val/map@r", "test/recall@1")


@dataclass
class Progress:
    """Where a run stands: the next epoch, the per-epoch records and the best so far."""

    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None

    @classmethod
    def resume(cls, state: TrainingState, checkpoint: dict[str, Any]) -> "Progress":
        """Load ``checkpoint`` (a loaded ``last.pt``, see ``idml.checkpoint.resume_checkpoint``)
        into ``state``; the progress recorded in it."""
        state.load_state_dict(checkpoint)
        return cls(checkpoint["epoch"] + 1, checkpoint["history"], checkpoint["best"])

    def selected(self, out_dir: str | Path) -> Path:
        """The checkpoint to evaluate: best.pt when validation chose one, else last.pt."""
        return Path(out_dir) / ("best.pt" if self.best is not None else "last.pt")


def _identity(module: torch.nn.Module) -> torch.nn.Module:
    return module


@dataclass
class Hooks:
    """What a runner adds to ``fit``; every hook is optional.

    - ``wrap(objective)``: the module the training step calls, built again whenever the warm-up
      phase changes (DDP records which parameters need gradients when it is built).
    - ``epoch_stats(stats)``: the epoch's training statistics, e.g. reduced over workers.
    - ``epoch_end(epoch, record)``: after ``last.pt``/``best.pt`` are written (report, log).
    """

    wrap: Callable[[torch.nn.Module], torch.nn.Module] = _identity
    epoch_stats: Callable[[dict[str, float]], dict[str, float]] = lambda stats: stats
    epoch_end: Callable[[int, dict[str, Any]], None] = lambda epoch, record: None


def checkpoint_state(state: TrainingState, cfg: Config, epoch: int, history: list, best: dict | None, *,
                     optimizer: bool = True) -> dict[str, Any]:
    """A checkpoint dict; ``optimizer=False`` leaves out the optimizer and scheduler (best.pt
    is for evaluation and indexing, never for resuming)."""
    saved = state.state_dict()
    if not optimizer:
        saved = {k: v for k, v in saved.items() if k not in ("optimizer", "scheduler")}
    return {**saved, "epoch": epoch, "config": cfg.to_dict(), "history": history, "best": best}


def fit(
    state: TrainingState,
    cfg: Config,
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    *,
    out_dir: str | Path,
    val=None,
    reported: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    hooks: Hooks | None = None,
    main_process: bool = True,
    eval_cfg: Config | None = None,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
    steps_per_epoch: int | None = None,
) -> Progress:
    """Train ``state`` from ``progress.start_epoch`` to ``cfg.train.epochs``.

    ``batches(epoch)`` gives an epoch's batches. Every ``train.eval_every`` epochs (and after
    the last) the main process evaluates ``val`` (it picks ``best.pt`` on ``SELECTION_METRIC``)
    and, every ``train.test_every`` epochs (0: never; the caller evaluates the selected
    checkpoint at the end), the ``reported`` splits (name -> dataset; metrics only); it writes
    ``last.pt`` every epoch. Other processes (DDP ranks > 0) only train. ``eval_cfg`` (default ``cfg``) configures
    evaluation."""
    t, progress, hooks = cfg.train, progress or Progress(), hooks or Hooks()
    eval_cfg = eval_cfg or cfg
    out = Path(out_dir)
    last_path, best_path = out / "last.pt", out / "best.pt"
    objective, backbone_trainable = state.objective, None
    for epoch in range(progress.start_epoch, t.epochs):
        trainable = epoch >= t.warmup_epochs  # warm-up epochs train only heads and proxies
        if trainable != backbone_trainable:
            state.model.set_backbone_trainable(trainable)
            objective, backbone_trainable = hooks.wrap(state.objective), trainable
        stats = train_one_epoch(objective, state.optimizer, batches(epoch), epoch=epoch, train_cfg=t, device=device,
                                progress=show_progress, total=steps_per_epoch)
        state.scheduler.step()
        record: dict[str, Any] = {"epoch": epoch, **_prefixed("train", hooks.epoch_stats(stats))}
        if main_process:
            last_epoch = epoch == t.epochs - 1
            if (epoch + 1) % t.eval_every == 0 or last_epoch:
                # The reported splits (test) only every test_every epochs: the end of the run
                # evaluates the selected checkpoint on them anyway (evaluate_and_summarize).
                curves = t.test_every and ((epoch + 1) % t.test_every == 0 or last_epoch)
                _evaluate(state, eval_cfg, epoch, record, progress, val, (reported or {}) if curves else {}, best_path,
                          device=device, show_progress=show_progress)
            progress.history.append(record)
            save_checkpoint(last_path, checkpoint_state(state, cfg, epoch, progress.history, progress.best))
            log.info("epoch %d/%d: %s", epoch, t.epochs - 1,
                     ", ".join(f"{k}={record[k]:.4g}" for k in SUMMARY_KEYS if k in record))
        hooks.epoch_end(epoch, record)
    return progress


def _best_score(progress: Progress) -> float:
    """The best checkpoint's score on SELECTION_METRIC; a run resumed from a checkpoint that was
    picked on another metric is scored from its history, so the two metrics are never compared."""
    best = progress.best
    if best.get("metric") == SELECTION_METRIC:
        return best["score"]
    record = next((r for r in progress.history if r["epoch"] == best["epoch"]), {})
    return record.get(f"val/{SELECTION_METRIC}", float("-inf"))


def _evaluate(state: TrainingState, cfg: Config, epoch: int, record: dict, progress: Progress, val, reported,
              best_path: Path, *, device, show_progress: bool) -> None:
    started = time.perf_counter()
    _evaluate_splits(state, cfg, epoch, record, progress, val, reported, best_path, device=device,
                     show_progress=show_progress)
    record["eval/seconds"] = time.perf_counter() - started  # what evaluating cost this epoch


def _evaluate_splits(state: TrainingState, cfg: Config, epoch: int, record: dict, progress: Progress, val, reported,
                     best_path: Path, *, device, show_progress: bool) -> None:
    if val is not None:
        metrics = summary_metrics(evaluate_model(state.model, val, cfg, device=device, uncertainty=False,
                                                 progress=show_progress))
        record.update(_prefixed("val", metrics))
        score = metrics[SELECTION_METRIC]
        if progress.best is None or score > _best_score(progress):
            progress.best = {"epoch": epoch, "metric": SELECTION_METRIC, "score": score}
            save_checkpoint(best_path, checkpoint_state(state, cfg, epoch, progress.history + [record], progress.best,
                                                        optimizer=False))
    for name, dataset in reported.items():
        metrics = summary_metrics(evaluate_model(state.model, dataset, cfg, device=device, uncertainty=False,
                                                 progress=show_progress))
        record.update(_prefixed(name, metrics))


def _prefixed(prefix: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


def train_one_epoch(
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    epoch: int,
    train_cfg: TrainConfig,
    device: str | torch.device = "cpu",
    progress: bool = True,
    total: int | None = None,
) -> dict[str, float]:
    """One pass over ``batches`` (which parameters train is ``fit``'s warm-up decision)."""
    objective.train()
    totals: dict[str, float] = {"loss": 0.0}
    steps = images = 0
    data_wait = 0.0  # time spent waiting for the next batch: the input pipeline's share
    start = time.perf_counter()
    bar = tqdm(batches, total=total, desc=f"epoch {epoch}", disable=not progress, leave=False)
    iterator = iter(bar)
    while True:
        asked = time.perf_counter()
        try:
            images_batch, targets = next(iterator)
        except StopIteration:
            break
        data_wait += time.perf_counter() - asked
        images_batch = to_device(images_batch, device, train_cfg.channels_last)
        targets = targets.to(device, non_blocking=True).long()
        loss, stats = objective(images_batch, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch}, step {steps}; lower train.lr or loss.uncertainty_weight")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_value_(objective.parameters(), train_cfg.grad_clip)
        optimizer.step()
        steps += 1
        images += len(targets)
        totals["loss"] += loss.item()
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        bar.set_postfix(loss=f"{totals['loss'] / steps:.3f}")
        if train_cfg.max_steps_per_epoch and steps >= train_cfg.max_steps_per_epoch:
            break
    seconds = time.perf_counter() - start
    if steps == 0:
        raise ValueError(f"epoch {epoch} received no batches: is the training split empty or smaller than one batch?")
    out = {key: value / steps for key, value in totals.items()}
    out.update(steps=steps, images=images, seconds=seconds, images_per_s=images / seconds, data_wait_s=data_wait)
    return out


# The figures evaluate_and_summarize writes next to metrics.json (those that apply to the run).
FIGURES = ("recall_curves.png", "uncertainty.png", "selective_retrieval.png", "retrieval_grid.png",
           "uncertainty_extremes.png")


def log_figures(run, out: Path) -> None:
    """The FIGURES ``evaluate_and_summarize`` wrote to ``out``, logged to ``run`` under plots/."""
    for name in FIGURES:
        if (out / name).exists():
            run.log_artifact(out / name, "plots")


def calibrate_confidence(model, val_ds, cfg: Config, *, device, progress: bool = True, distractors=None) -> Confidence:
    """The confidence of ``model`` fitted on leave-one-out retrieval over the validation split.
    ``distractors`` (the training split, whose classes validation never shares) join the gallery:
    within the few hundred validation images the top-1 is right far more often than in a gallery
    of thousands, and a confidence fitted there was over-confident on test (ECE 0.195, emoji)."""
    result = evaluate_model(model, val_ds, cfg, device=device, uncertainty=False, progress=progress)
    extra = None
    if distractors is not None:
        loader = DataLoader(distractors, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.workers)
        extra, _ = embed(model, loader, device=device, channels_last=cfg.train.channels_last, progress=progress,
                         total=len(loader), desc="embed distractors", precision=cfg.train.precision)
    q = query_signals(result["mu"], np.asarray(val_ds.labels), image_uncertainty(result["sigma"]), distractors=extra)
    return fit_confidence(q["uncertainty"], q["top1_similarity"], q["top1_gap"], q["hits"], fitted_on=cfg.data.val_split)


def evaluate_and_summarize(cfg: Config, checkpoint: Path, test_ds, history: list, *, progress: bool = True,
                           device: str | torch.device = "cpu", val_ds=None,
                           distractors=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate ``checkpoint`` on ``test_ds`` (any dataset ``evaluate_model`` accepts); write
    ``metrics.json`` and the figures (``uncertainty.png``, ``selective_retrieval.png``,
    ``recall_curves.png``, ``retrieval_grid.png``, ``uncertainty_extremes.png``) to ``cfg.output_dir``;
    ``test_ds`` also gives ``labels`` and ``images(indices)`` for the figures. With ``val_ds``
    (the validation split), first fits the confidence there (among ``distractors``, the training
    split, as ``calibrate_confidence`` explains) and stores it in the checkpoint (key
    ``confidence``), so every later user of the checkpoint gets it.
    Returns the summary and the raw evaluation result (embeddings included)."""
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    ckpt = load_checkpoint(checkpoint)
    model, _ = model_from_checkpoint(ckpt)
    model.to(device)
    confidence = None
    if val_ds is not None:
        try:
            confidence = calibrate_confidence(model, val_ds, cfg, device=device, progress=progress,
                                              distractors=distractors)
        except ValueError as err:  # e.g. every validation query right: nothing to learn a probability from
            log.warning("no confidence fitted: %s", err)
        else:
            ckpt["confidence"] = confidence.to_dict()
            save_checkpoint(checkpoint, ckpt)
    elif ckpt.get("confidence"):
        confidence = Confidence.from_dict(ckpt["confidence"])
    result = evaluate_model(model, test_ds, cfg, device=device, plot_path=out / "uncertainty.png",
                            progress=progress, confidence=confidence)
    if has_recall_curves(history):  # none without a validation split: the last epoch is kept, with no curves
        plot_recall_curves(history, out / "recall_curves.png", keys=("recall@1", "map@r"))
    save_retrieval_grid(result["mu"], test_ds.labels, test_ds.images, out / "retrieval_grid.png", seed=cfg.train.seed)
    if result["uncertainty"] is not None:
        save_uncertainty_extremes(image_uncertainty(result["sigma"]), test_ds.images, out / "uncertainty_extremes.png")
    summary = {
        "checkpoint": str(checkpoint),
        "selected_epoch": ckpt["epoch"],
        "test": summary_metrics(result),
        "cross_domain": result["cross_domain"],
        **uncertainty_report(result),
        "confidence": ckpt.get("confidence"),
        "train_images_per_s": _mean([h.get("train/images_per_s") for h in history]),
        "history": history,
        "final_evaluation_s": time.perf_counter() - started,  # calibration, test, analyses, figures
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary, result


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
