"""The local runner: one process, a torch DataLoader of class-balanced batches, and ``fit``."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import DataLoader

from ..checkpoint import resume_checkpoint
from ..config import Config, validate_config
from ..data import ImageShardDataset, open_dataset, resolve_dataset
from ..errors import InputError
from ..transforms import eval_transform, train_transform
from .setup import build_training, configure_threads, seed_everything
from .loop import Progress, evaluate_and_summarize, fit, log_figures

log = logging.getLogger(__name__)


def class_balanced_loader(dataset: ImageShardDataset, cfg: Config) -> DataLoader:
    """Batches of ``batch_size / images_per_class`` classes with ``images_per_class`` images each."""
    t = cfg.train
    classes_per_batch = t.batch_size // t.images_per_class
    if dataset.num_classes < classes_per_batch:
        raise ValueError(f"train.batch_size {t.batch_size} needs {classes_per_batch} classes of {t.images_per_class} images, "
                         f"but the training split has only {dataset.num_classes} classes; lower train.batch_size")
    # The sampler would fill a smaller class by drawing its images again (with replacement), silently.
    per_class = Counter(int(target) for target in dataset.targets)
    full = sum(count >= t.images_per_class for count in per_class.values())
    if full < classes_per_batch:
        raise ValueError(f"train.images_per_class {t.images_per_class} is more than most classes hold: a batch needs "
                         f"{classes_per_batch} classes of {t.images_per_class} images, and only {full} of the "
                         f"{len(per_class)} training classes have that many (the largest has {max(per_class.values())}); "
                         "lower train.images_per_class (and train.batch_size with it)")
    sampler = MPerClassSampler(dataset.targets, m=t.images_per_class, batch_size=t.batch_size,
                               length_before_new_iter=len(dataset))
    return DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, drop_last=True,
                      num_workers=cfg.data.workers, persistent_workers=cfg.data.workers > 0)


def train_local(cfg: Config, *, progress: bool = True, resume: bool = True) -> dict[str, Any]:
    """Train with ``cfg`` and evaluate the best checkpoint (chosen on the validation split,
    which holds classes unseen in training) on the test split. Writes ``last.pt``, ``best.pt``,
    ``metrics.json`` and plots to ``cfg.output_dir``. Resumes from ``last.pt`` if present and
    trained with the same config (else refuses: see ``idml.checkpoint.resume_checkpoint``);
    ``resume=False`` starts over, replacing the folder's checkpoints."""
    validate_config(cfg)
    out = Path(cfg.output_dir)
    last, best = out / "last.pt", out / "best.pt"
    start_over = (f"to train this config, pass another --output-dir, or --no-resume to start over in {out} "
                  "(replaces its last.pt and best.pt)")
    checkpoint = None
    if resume and last.exists():
        checkpoint = resume_checkpoint(last, cfg, start_over=start_over)
    elif resume and best.exists():
        raise InputError(f"{out} holds a best.pt but no last.pt to resume from; nothing was changed; {start_over}")
    seed_everything(cfg.train.seed)
    configure_threads(cfg.train.threads)
    source = open_dataset(resolve_dataset(cfg.data.dataset))  # a built-in name is fetched here, once
    source.check_local()
    # Every split, the test split too: a damaged one is found before training, not after.
    source.check_shards([s for s in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split) if source.has_split(s)])
    size = cfg.data.image_size
    train_ds = ImageShardDataset(source.root, cfg.data.train_split, transform=train_transform(size))
    val_ds = None
    if source.has_split(cfg.data.val_split):
        val_ds = ImageShardDataset(source.root, cfg.data.val_split, transform=eval_transform(size))
    else:
        log.warning("no %r split: the last epoch's model is kept (convert with val_fraction > 0 to select on held-out classes)",
                    cfg.data.val_split)

    state = build_training(cfg, train_ds.num_classes)
    start = Progress()
    if checkpoint is not None:
        start = Progress.resume(state, checkpoint)
        log.info("resumed from %s at epoch %d", last, start.start_epoch)
    loader = class_balanced_loader(train_ds, cfg)
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is None and best.exists():
        # Starting over (--no-resume): the earlier run's best.pt would pass for this run's until
        # validation replaces it, or for good without a validation split.
        best.unlink()
        log.info("starting over in %s: removed the earlier run's best.pt", out)
    test_ds = ImageShardDataset(source.root, cfg.data.test_split, transform=eval_transform(size))
    done = fit(state, cfg, lambda epoch: loader, out_dir=out, val=val_ds, reported={"test": test_ds}, progress=start,
               show_progress=progress, steps_per_epoch=len(loader))
    # The training split, seen through the evaluation transform: distractors for the confidence's fit.
    distractors = ImageShardDataset(source.root, cfg.data.train_split, transform=eval_transform(size)) if val_ds else None
    return evaluate_and_summarize(cfg, done.selected(out), test_ds, done.history, progress=progress, val_ds=val_ds,
                                  distractors=distractors)[0]


def track_local_run(cfg: Config, summary: dict[str, Any], *, experiment: str = "idml", register_model: str | None = None,
                    uri: str | None = None) -> dict[str, Any]:
    """Record a finished local run in MLflow as ``--ray`` does: the run named after the output
    folder (found again on resume), params, per-epoch and final test metrics, plots, and the
    selected checkpoint as an MLflow model (registered as ``register_model`` when given).
    Returns ``{"run_id", "model_uri"[, "registered_model", "version"]}``."""
    from ..registry import log_run_model
    from ..tracking import MlflowRun, source_tags, tracking_uri

    out = Path(cfg.output_dir)
    run = MlflowRun.open(uri or tracking_uri(), experiment, out.resolve().name,
                         tags={"idml.entrypoint": "idml train", **source_tags("idml train", job=False)})
    try:
        run.log_params(cfg.flat())
        logged = run.logged_steps("train/loss")
        for record in summary["history"]:
            if record["epoch"] not in logged:  # a resumed run logs only its new epochs
                run.log_metrics(record, step=record["epoch"])
        run.log_metrics({f"final_test/{k}": v for k, v in summary["test"].items()} | {"selected_epoch": summary["selected_epoch"]},
                        step=cfg.train.epochs)
        selected = out / ("best.pt" if (out / "best.pt").exists() else "last.pt")
        run.log_artifact(out / "metrics.json")
        log_figures(run, out)
        source = open_dataset(resolve_dataset(cfg.data.dataset))  # fetched already, by the training
        model = log_run_model(run, cfg, selected, source, registered_name=register_model)
    except BaseException:
        run.fail()
        raise
    run.finish()
    return {"run_id": run.run_id, **model}
