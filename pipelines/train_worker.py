"""The training function of every Ray Train worker: the Ray context around the library's one
epoch loop (``idml.training.loop.fit``).

- Class proxies (ProxyAnchor/ProxyNCA) are parameters of ``IntrospectiveObjective``, the one
  module DDP wraps: DDP broadcasts rank 0's initial values and all-reduces their gradients, so
  every worker holds identical proxies. Pair-based losses gather every worker's embeddings
  (``MetricLoss.gather_across_workers``, PML's distributed wrappers).
- ``fit`` calls the ``wrap`` hook whenever the warm-up phase changes: DDP records which
  parameters need gradients when it is built, so the wrapper is rebuilt then (not
  ``find_unused_parameters``, which would cost a graph walk every step; that is only on when
  the loss does not use sigma (plain loss, or lambda = 0), as the uncertainty head then gets
  no gradient).
- Rank 0 evaluates (val picks ``best.pt``; test is reported only), writes the checkpoints and
  reports them through ``ray.train.report`` every epoch (``FailureConfig`` restarts from them;
  Ray keeps the latest, the one copy of the optimizer state besides the output folder's
  ``last.pt``); it alone logs to the MLflow run the driver opened (the selected checkpoint).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from idml.config import config_from_dict
from idml.tracking import MlflowRun, clean_metrics

from ._worker_data import StreamedSplit, iter_train_batches

log = logging.getLogger(__name__)


def train_worker(config: dict[str, Any]) -> None:
    """Train on this worker's shard of the ``train`` dataset (see ``pipelines.train.build_trainer``)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _configure_logging(rank, verbose=config.get("verbose", False))

    from idml.training.setup import build_training, configure_threads, seed_everything, unwrap
    from idml.training.loop import Hooks, fit

    cfg = config_from_dict(config["config"])
    configure_threads(config["threads"])  # Ray sets OMP_NUM_THREADS=1; use the reserved CPUs
    device = ray.train.torch.get_device()
    seed_everything(cfg.train.seed)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    state = build_training(cfg, config["num_classes"], device=device)
    gather = world > 1 and state.objective.criterion.gather_across_workers()
    seed_everything(cfg.train.seed + 7919 * rank)  # but different mixup draws per worker

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress, restored = _restore(state, out, rank)
    run = MlflowRun(config["tracking_uri"], config["run_id"]) if rank == 0 and config["run_id"] else None
    if run is not None:
        run.log_params(config["params"])
        if restored:
            _backfill(run, progress)

    eval_cfg = config_from_dict(cfg.to_dict())
    eval_cfg.data.workers = 0  # the split is a stream; Ray Data already decodes in parallel
    source = config["source"]
    test = (StreamedSplit(ray.train.get_dataset_shard("test"), source, cfg.data.test_split, cfg.eval.batch_size)
            if config.get("has_test", True) else None)  # a search trial never reads test
    val = (StreamedSplit(ray.train.get_dataset_shard("val"), source, cfg.data.val_split, cfg.eval.batch_size)
           if config["has_val"] else None)
    shard = ray.train.get_dataset_shard("train")
    skipped: list[str] = []

    def batches(epoch: int) -> Iterable:
        skipped.clear()
        stream = iter_train_batches(shard, cfg.data.image_size, skipped)
        return _progress_lines(stream, epoch, cfg.train.epochs) if rank == 0 else stream

    def epoch_stats(stats: dict[str, float]) -> dict[str, float]:
        if skipped:
            log.warning("rank %d skipped %d undecodable images: %s", rank, len(skipped), skipped[:10])
        return _reduce_stats(stats, len(skipped), world=world, gathered=gather, device=device)

    def epoch_end(epoch: int, record: dict[str, Any]) -> None:
        _report(record, epoch, rank, out / "last.pt", out / "best.pt" if progress.best is not None else None)
        if run is not None:
            run.log_metrics(record, step=epoch)

    hooks = Hooks(wrap=lambda objective: _wrap_ddp(objective, device, world, find_unused=not unwrap(objective).trains_uncertainty),
                  epoch_stats=epoch_stats, epoch_end=epoch_end)
    fit(state, cfg, batches, out_dir=out, val=val, reported={"test": test} if test else {}, progress=progress,
        hooks=hooks, main_process=rank == 0, eval_cfg=eval_cfg, device=device, show_progress=False)
    if rank == 0 and test is not None:
        distractors = (StreamedSplit(ray.train.get_dataset_shard("distractors"), source, cfg.data.train_split,
                                     cfg.eval.batch_size) if val is not None else None)
        _finish(run, eval_cfg, progress, test, device, config, val=val, distractors=distractors)
    elif rank == 0:
        _finish_without_test(run, eval_cfg, progress)


def _configure_logging(rank: int, *, verbose: bool) -> None:
    """Rank 0's progress lines and epoch summaries reach the job's output (worker logs go to the
    driver); the rest only with ``-v``."""
    level = logging.DEBUG if verbose else logging.WARNING
    for noisy in ("faiss.loader", "ray.train"):  # CPU-feature probing (before faiss loads); every report's metrics
        logging.getLogger(noisy).setLevel(level)
    try:  # Ray Train logs each report's metrics through a logger named after its file, not "ray.train"
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(level)
    except ImportError:
        pass
    if rank == 0:
        logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        for name in (__name__, "idml.training.loop"):
            logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def _restore(state, out: Path, rank: int):
    """The progress in Ray's latest checkpoint (after a worker failure or for a resumed run),
    loaded into ``state``; rank 0 copies its files into the output folder."""
    import ray.train

    from idml.checkpoint import load_checkpoint
    from idml.training.loop import Progress

    restored = ray.train.get_checkpoint()
    if restored is None:
        if rank == 0 and (out / "best.pt").exists():
            # A new run (--no-resume) in a used folder: the earlier run's best.pt would pass for this one's.
            (out / "best.pt").unlink()
        return Progress(), False
    with restored.as_directory() as folder:
        # The driver checked that this checkpoint's config matches (pipelines.train.check_resume).
        progress = Progress.resume(state, load_checkpoint(Path(folder) / "last.pt"))
        if rank == 0:  # what _report leaves in the output folder
            name = "best.pt" if (Path(folder) / "best.pt").exists() else "last.pt"
            shutil.copyfile(Path(folder) / name, out / name)
    log.info("rank %d resumed from %s at epoch %d", rank, restored.path, progress.start_epoch)
    return progress, True


def _backfill(run: MlflowRun, progress) -> None:
    """An epoch is logged after its checkpoint is reported: a failure in between leaves it in
    the checkpoint's history but not in MLflow, so log it now (exactly once)."""
    logged = run.logged_steps("train/loss")
    for record in progress.history:
        if record["epoch"] not in logged:
            run.log_metrics(record, step=record["epoch"])
    run.log_metrics({"resumed_from_epoch": progress.start_epoch}, step=progress.start_epoch)


def _finish(run: MlflowRun | None, cfg, progress, test: StreamedSplit, device, job: dict[str, Any], *,
            val: StreamedSplit | None = None, distractors: StreamedSplit | None = None) -> None:
    """Rank 0, after the last epoch: the confidence fitted on val, the selected checkpoint on
    test, plots, MLflow artifacts."""
    from idml.training.loop import evaluate_and_summarize, log_figures

    out = Path(cfg.output_dir)
    summary, _ = evaluate_and_summarize(cfg, progress.selected(out), test, progress.history, progress=False,
                                        device=device, val_ds=val, distractors=distractors)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if run is None:
        return
    run.log_metrics({f"final_test/{k}": v for k, v in summary["test"].items()}
                    | {"selected_epoch": summary["selected_epoch"], "corrupt_images_skipped_test": len(test.skipped)},
                    step=cfg.train.epochs)
    # The selected checkpoint only: the resume point (last.pt with the optimizer state) stays in Ray's storage.
    for path, folder in ((progress.selected(out), "checkpoints"), (out / "config.yaml", None), (out / "metrics.json", None)):
        run.log_artifact(path, folder)
    log_figures(run, out)
    if job["log_model"]:
        from idml.registry import log_run_model

        log_run_model(run, cfg, progress.selected(out), job["source"], registered_name=job["register_model"])
    run.finish()


def _finish_without_test(run: MlflowRun | None, cfg, progress) -> None:
    """Rank 0 of a search trial: the config and the epoch validation selected, no test pass."""
    out = Path(cfg.output_dir)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if run is None:
        return
    if progress.best is not None:
        run.log_metrics({"selected_epoch": progress.best["epoch"]}, step=cfg.train.epochs)
    run.log_artifact(out / "config.yaml")
    run.finish()


def _progress_lines(batches, epoch: int, epochs: int, every_s: float = 30.0):
    """Pass ``batches`` through, logging a progress line every ``every_s`` seconds: worker
    output reaches the driver line by line, so a terminal progress bar would not render."""
    start = last = time.perf_counter()
    images = 0
    for step, batch in enumerate(batches, 1):
        yield batch
        images += len(batch[1])
        now = time.perf_counter()
        if now - last >= every_s:
            log.info("epoch %d/%d: step %d, %d images, %.1f images/s", epoch, epochs - 1, step, images,
                     images / (now - start))
            last = now


def _wrap_ddp(objective, device, world: int, *, find_unused: bool):
    if world == 1:
        return objective
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # BN statistics are frozen: nothing to sync each step (newer torch calls the option
    # forward_sync_buffers and deprecates broadcast_buffers; either way rank 0's are copied once).
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
    return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused, **{no_sync: False})


def _reduce_stats(stats: dict[str, float], skipped: int, *, world: int, gathered: bool, device) -> dict[str, float]:
    """Epoch statistics over all workers: mean loss, total images and images/s."""
    import torch

    keys = [k for k in stats if k not in ("steps", "images", "seconds", "images_per_s")]
    values = [stats[k] for k in keys] + [stats["images"], stats["seconds"], skipped, stats["steps"]]
    if world > 1:
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        values = tensor.tolist()
        values[:len(keys)] = [v / world for v in values[:len(keys)]]
        values[len(keys) + 1] /= world  # mean seconds
    out = dict(zip(keys, values[:len(keys)]))
    if gathered:
        out["loss"] /= world  # a gathering loss is world_size x the loss of the whole batch
    images, seconds, skipped_total, steps = values[len(keys):]
    out.update(images=images, seconds=seconds, images_per_s=images / seconds if seconds else 0.0,
               steps=stats["steps"], corrupt_images_skipped=skipped_total)
    return out


def _report(record: dict[str, Any], epoch: int, rank: int, last_path: Path, best_path: Path | None) -> None:
    """Rank 0 reports the checkpoint (others report metrics only: ``report`` is a barrier)."""
    import ray.train

    metrics = clean_metrics(record)
    if rank != 0:
        ray.train.report(metrics)
        return
    # Beside the output folder's files, so that moving last.pt is a rename.
    with tempfile.TemporaryDirectory(dir=last_path.parent, prefix=".report-") as folder:
        if best_path is not None:
            # The resume point (with the optimizer state, ~3x the weights) is kept once: in Ray's
            # storage. The output folder keeps best.pt, the model that gets evaluated.
            os.replace(last_path, Path(folder) / "last.pt")
            shutil.copyfile(best_path, Path(folder) / "best.pt")
        else:  # no validation: the last epoch is the model that gets evaluated
            shutil.copyfile(last_path, Path(folder) / "last.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")
