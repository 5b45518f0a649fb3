"""Distributed training on Ray: ``idml train --ray`` (or ``python -m pipelines.train``).

Ray Data streams the sharded Parquet training split through class-balanced packing, decoding
and augmentation (``pipelines._data``) into a Ray Train V2 ``TorchTrainer`` whose workers run
the library's loop (``idml.engine.train_one_epoch``) under DDP (gloo on CPU, nccl on GPU).

- Class proxies (ProxyAnchor/ProxyNCA) are parameters of ``IntrospectiveObjective``, the one
  module DDP wraps: DDP broadcasts rank 0's initial values and all-reduces their gradients, so
  every worker holds identical proxies. Pair-based losses gather every worker's embeddings
  (``MetricLoss.gather_across_workers``, PML's distributed wrappers).
- Warm-up epochs freeze the backbone. DDP records which parameters need gradients when it is
  built, so the wrapper is rebuilt whenever that phase changes (not
  ``find_unused_parameters``, which would cost a graph walk every step).
  ``find_unused_parameters`` is only on when ``loss.introspective`` is false (the uncertainty
  head then gets no gradient).
- ``train.batch_size`` is per worker: every worker's step sees a full class-balanced batch.
- Every ``train.eval_every`` epochs rank 0 evaluates the validation split (classes carved from
  the training classes; it alone picks the best checkpoint) and the test split (reported
  only), each streamed by a separate, order-preserving Ray Data pass.
- Every epoch rank 0 reports a checkpoint (``last.pt`` with the optimizer state, plus the
  best-so-far ``best.pt``) through ``ray.train.report``; ``FailureConfig(max_failures)``
  restarts failed workers from it, and a run started again with the same name (same storage)
  resumes from it.
- MLflow: one run per job, named like the Ray run, found again by name on resume (so a resumed
  job appends to it); only rank 0 logs: params (the full config), per-epoch metrics, and at the
  end the final and best checkpoints, the config, the plots and a retrieval grid.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from idml.checkpoint import load_checkpoint, save_checkpoint
from idml.config import Config, config_from_dict, validate_config
from idml.data.source import DatasetSource, open_dataset
from idml.tracking import clean_metrics, clean_params, get_or_create_run, tracking_uri

from ._data import class_chunk_counts, eval_datasets, max_batches, train_dataset
from ._ray import init_ray
from ._worker_data import StreamedSplit, iter_train_batches

log = logging.getLogger(__name__)

SELECTION_METRIC = "recall@1"
DEFAULT_EXPERIMENT = "idml"


@dataclass
class RayOptions:
    """How the job runs on Ray (the model and data live in ``Config``)."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0  # torch threads = train.threads, or this rounded down (>= 1)
    use_gpu: bool = False
    decode_cpus: float = 1.0  # CPUs each Ray Data decode task reserves
    run_name: str | None = None  # default: the name of cfg.output_dir
    storage_path: str | None = None  # default: <output_dir>/ray; shared storage (NFS, s3://) on a multi-node cluster
    max_failures: int = 2
    checkpoints_to_keep: int = 2
    experiment: str = DEFAULT_EXPERIMENT
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    address: str | None = None  # Ray cluster; default: $RAY_ADDRESS or a new local instance

    def validate(self) -> None:
        problems = []
        if self.num_workers < 1:
            problems.append(f"num_workers must be >= 1, got {self.num_workers}")
        if not self.cpus_per_worker > 0:
            problems.append(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if not self.decode_cpus > 0:
            problems.append(f"decode_cpus must be > 0, got {self.decode_cpus}")
        if self.max_failures < -1:
            problems.append(f"max_failures must be >= -1 (-1 retries forever), got {self.max_failures}")
        if self.checkpoints_to_keep < 1:
            problems.append(f"checkpoints_to_keep must be >= 1, got {self.checkpoints_to_keep}")
        if problems:
            raise ValueError("invalid Ray options:\n  " + "\n  ".join(problems))

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_worker))


@dataclass
class Plan:
    """Everything checked and resolved on the driver before any worker starts."""

    cfg: Config
    options: RayOptions
    source: DatasetSource
    num_classes: int
    has_val: bool
    run_name: str
    storage_path: str
    tracking_uri: str


def plan(cfg: Config, options: RayOptions, *, resume: bool = True) -> Plan:
    """Validate the config, options and dataset: every user error surfaces here, before Ray
    starts a worker (unknown keys and wrong types already fail in ``load_config``)."""
    validate_config(cfg)
    options.validate()
    source = open_dataset(cfg.data.dataset)
    t, d = cfg.train, cfg.data
    for split in (d.train_split, d.test_split):
        if not source.has_split(split):
            raise ValueError(f"dataset {cfg.data.dataset} has no images in split {split!r}")
    num_classes = len(source.label_to_target(d.train_split))
    per_batch = t.batch_size // t.images_per_class
    if num_classes < per_batch:
        raise ValueError(f"train.batch_size / train.images_per_class = {per_batch} classes per batch, but the "
                         f"{d.train_split!r} split has only {num_classes} classes; lower train.batch_size")
    possible = max_batches(class_chunk_counts(source, d.train_split, t.images_per_class), per_batch)
    if possible < options.num_workers:
        raise ValueError(f"the {d.train_split!r} split gives at most {possible} class-balanced batches of "
                         f"{per_batch} classes x {t.images_per_class} images per epoch, fewer than the "
                         f"{options.num_workers} workers; lower train.batch_size or num_workers")
    has_val = source.has_split(d.val_split)
    if not has_val:
        log.warning("no %r split: the last epoch's model is kept (convert with --val-fraction > 0 to select on "
                    "held-out training classes)", d.val_split)
    cfg = config_from_dict(cfg.to_dict())  # a copy: the output folder becomes absolute
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    run_name = options.run_name or Path(cfg.output_dir).name
    if not resume:
        run_name = f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = options.storage_path or str(Path(cfg.output_dir) / "ray")
    return Plan(cfg, options, source, num_classes, has_val, run_name, storage,
                options.tracking_uri or tracking_uri(Path.cwd()))


def train_ray(cfg: Config, options: RayOptions | None = None, *, resume: bool = True) -> dict[str, Any]:
    """Train ``cfg`` on Ray; returns the summary rank 0 wrote to ``<output_dir>/metrics.json``
    (test metrics of the checkpoint selected on validation, history, MLflow run id)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    p = plan(cfg, options or RayOptions(), resume=resume)
    init_ray(p.options.address, dashboard=True)
    _check_cpus(p.options)
    run_id = _mlflow_run(p.tracking_uri, p.options.experiment, p.run_name)

    # Worker output reaches the driver line by line, where Ray Data's progress bars turn into
    # screens of noise; rank 0 logs progress lines instead.
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Val and test are decoded once per job and kept in the object store (spilled to disk when
    # large): every evaluation pass is then a read of ready tensors, not a new decoding job.
    names = {"test": p.cfg.data.test_split, **({"val": p.cfg.data.val_split} if p.has_val else {})}
    log.info("decoding %s once for the whole job", " and ".join(names.values()))
    datasets = dict(zip(names, eval_datasets(p.source, list(names.values()), p.cfg, decode_cpus=p.options.decode_cpus)))
    datasets["train"] = train_dataset(p.source, p.cfg, decode_cpus=p.options.decode_cpus)
    ordered = ray.train.DataConfig.default_ingest_options()
    ordered.preserve_order = True  # evaluation passes must yield rows in the same order every time
    resources = {"CPU": p.options.cpus_per_worker, **({"GPU": 1} if p.options.use_gpu else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "config": p.cfg.to_dict(), "source": p.source, "num_classes": p.num_classes, "has_val": p.has_val,
            "threads": p.cfg.train.threads or p.options.threads, "tracking_uri": p.tracking_uri, "run_id": run_id,
            "params": {**p.cfg.flat(), **{f"ray.{k}": v for k, v in dataclasses.asdict(p.options).items()},
                       "ray.run_name": p.run_name, "ray.storage_path": p.storage_path},
        },
        scaling_config=ray.train.ScalingConfig(num_workers=p.options.num_workers, use_gpu=p.options.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=p.run_name, storage_path=p.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=p.options.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=p.options.checkpoints_to_keep),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"],
                                            execution_options={"val": ordered, "test": ordered}),
    )
    log.info("training run %r (storage %s, MLflow run %s at %s)", p.run_name, p.storage_path, run_id, p.tracking_uri)
    started = time.time()
    try:
        result = trainer.fit()
    except BaseException:
        _set_run_status(p.tracking_uri, run_id, "FAILED")
        raise
    summary = _read_summary(Path(p.cfg.output_dir) / "metrics.json", started, p.tracking_uri, run_id)
    summary.update(run_name=p.run_name, mlflow_run_id=run_id, storage_path=p.storage_path,
                   checkpoint_path=result.checkpoint.path if result.checkpoint else None)
    return summary


def _read_summary(path: Path, since: float, uri: str, run_id: str) -> dict[str, Any]:
    """Rank 0's metrics.json: from the output folder when rank 0 ran on this machine (a file
    written during this job), else from the MLflow run's artifacts."""
    import json

    if not path.exists() or path.stat().st_mtime < since:
        from mlflow.tracking import MlflowClient

        path = Path(MlflowClient(uri).download_artifacts(run_id, "metrics.json", tempfile.mkdtemp()))
    return json.loads(path.read_text())


def _check_cpus(options: RayOptions) -> None:
    """Training workers that reserve every CPU leave Ray Data none, and the first batch never
    comes. Fail fast when the cluster could hold the workers but leaves no decode CPU (a
    smaller cluster is probably autoscaling: then Ray waits for nodes)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    reserved = options.num_workers * options.cpus_per_worker
    if reserved <= total < reserved + options.decode_cpus:
        raise ValueError(
            f"{options.num_workers} workers x {options.cpus_per_worker} CPUs reserve {reserved:g} of the cluster's "
            f"{total:g} CPUs, leaving less than the {options.decode_cpus:g} CPU a Ray Data decode task needs, so "
            "the data pipeline would stall; lower --cpus-per-worker or --num-workers (fractions such as 0.5 are fine)")


# ----------------------------------------------------------------------------- MLflow


def _mlflow_run(uri: str, experiment: str, run_name: str) -> str:
    """The job's MLflow run, created on first use and found by name afterwards (a resumed job
    appends to it). With the default SQLite store, artifacts go next to the database."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
        client.create_experiment(experiment, artifact_location=location)
    run_id = get_or_create_run(client, experiment, run_name, tags={"idml.entrypoint": "pipelines.train"})
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    return run_id


def _set_run_status(uri: str, run_id: str, status: str) -> None:
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).set_terminated(run_id, status)
    except Exception:  # reporting the training error matters more than the run status
        log.exception("could not mark MLflow run %s as %s", run_id, status)


class _Tracker:
    """Rank 0's MLflow logging into the run the driver created."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        params = clean_params(params)
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:  # MLflow params are immutable; a resume with another config keeps the first values
            log.warning("resumed with changed params %s; MLflow keeps the original values", changed)
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(new), 100):  # MLflow's per-call limit
            self.client.log_batch(self.run_id, params=new[start:start + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in clean_metrics(metrics).items()]
        for start in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 500])

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


# ----------------------------------------------------------------------------- workers


def _train_worker(config: dict[str, Any]) -> None:
    """The training function of every Ray Train worker."""
    import ray.train
    import ray.train.torch

    for noisy in ("faiss.loader", "ray.train"):  # CPU-feature probing (before faiss loads); every report's metrics
        logging.getLogger(noisy).setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if rank == 0:  # progress lines in the job's output (worker logs reach the driver)
        logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        log.setLevel(logging.INFO)

    from idml.engine import build_training, configure_threads, seed_everything, train_one_epoch
    from idml.evaluation.protocol import evaluate_model, summary_metrics
    from idml.train import checkpoint_state, evaluate_and_summarize

    cfg = config_from_dict(config["config"])
    source: DatasetSource = config["source"]
    configure_threads(config["threads"])  # Ray sets OMP_NUM_THREADS=1; use the reserved CPUs
    device = ray.train.torch.get_device()
    seed_everything(cfg.train.seed)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    state = build_training(cfg, config["num_classes"], device=device)
    gather = world > 1 and state.objective.criterion.gather_across_workers()
    seed_everything(cfg.train.seed + 7919 * rank)  # but different mixup draws per worker

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out / "last.pt", out / "best.pt"
    start_epoch, history, best = 0, [], None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            ckpt = load_checkpoint(Path(folder) / "last.pt")
            state.load_state_dict(ckpt)
            start_epoch, history, best = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"]
            if rank == 0:
                shutil.copyfile(Path(folder) / "last.pt", last_path)
                if (Path(folder) / "best.pt").exists():
                    shutil.copyfile(Path(folder) / "best.pt", best_path)
        log.info("rank %d resumed from %s at epoch %d", rank, restored.path, start_epoch)

    tracker = _Tracker(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    if tracker is not None:
        tracker.log_params(config["params"])
        if restored is not None:
            # An epoch is logged after its checkpoint is reported: a failure in between leaves
            # it in the checkpoint's history but not in MLflow, so log it now (exactly once).
            logged = tracker.logged_steps("train/loss")
            for record in history:
                if record["epoch"] not in logged:
                    tracker.log_metrics(record, step=record["epoch"])
            tracker.log_metrics({"resumed_from_epoch": start_epoch}, step=start_epoch)

    eval_cfg = config_from_dict(cfg.to_dict())
    eval_cfg.data.workers = 0  # the split is a stream; Ray Data already decodes in parallel
    shard = ray.train.get_dataset_shard("train")
    test = StreamedSplit(ray.train.get_dataset_shard("test"), source, cfg.data.test_split, cfg.eval.batch_size)
    val = (StreamedSplit(ray.train.get_dataset_shard("val"), source, cfg.data.val_split, cfg.eval.batch_size)
           if config["has_val"] else None)

    objective, backbone_trainable = state.objective, None
    for epoch in range(start_epoch, cfg.train.epochs):
        trainable = epoch >= cfg.train.warmup_epochs
        if trainable != backbone_trainable:
            state.model.set_backbone_trainable(trainable)
            objective = _wrap_ddp(state.objective, device, world, find_unused=not cfg.loss.introspective)
            backbone_trainable = trainable
        skipped: list[str] = []
        batches = iter_train_batches(shard, cfg.data.image_size, skipped)
        if rank == 0:
            batches = _progress_lines(batches, epoch, cfg.train.epochs)
        stats = train_one_epoch(objective, state.optimizer, batches, epoch=epoch, train_cfg=cfg.train, device=device,
                                progress=False)
        state.scheduler.step()
        stats = _reduce_stats(stats, len(skipped), world=world, gathered=gather, device=device)
        if skipped:
            log.warning("epoch %d: rank %d skipped %d undecodable images: %s", epoch, rank, len(skipped), skipped[:10])
        record: dict[str, Any] = {"epoch": epoch, **{f"train/{k}": v for k, v in stats.items()}}
        if rank == 0:
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch == cfg.train.epochs - 1:
                if val is not None:
                    metrics = summary_metrics(evaluate_model(state.model, val, eval_cfg, device=device,
                                                             uncertainty=False, progress=False))
                    record.update({f"val/{k}": v for k, v in metrics.items()})
                    score = metrics[SELECTION_METRIC]
                    if best is None or score > best["score"]:
                        best = {"epoch": epoch, "metric": SELECTION_METRIC, "score": score}
                        # No optimizer state: best.pt is for evaluation and indexing.
                        best_state = checkpoint_state(state, cfg, epoch, history + [record], best)
                        save_checkpoint(best_path, {k: v for k, v in best_state.items() if k not in ("optimizer", "scheduler")})
                # Reported only: the test split never chooses a checkpoint.
                metrics = summary_metrics(evaluate_model(state.model, test, eval_cfg, device=device,
                                                         uncertainty=False, progress=False))
                record.update({f"test/{k}": v for k, v in metrics.items()})
            history.append(record)
            save_checkpoint(last_path, checkpoint_state(state, cfg, epoch, history, best))
            log.info("epoch %d/%d: %s", epoch + 1, cfg.train.epochs, ", ".join(
                f"{k}={record[k]:.4g}" for k in ("train/loss", "train/images_per_s", "train/data_wait_s",
                                                 "val/recall@1", "test/recall@1") if k in record))
        _report(record, epoch, rank, last_path, best_path if best is not None else None)
        if tracker is not None:
            tracker.log_metrics(record, step=epoch)

    if rank == 0:
        chosen = best_path if best is not None else last_path
        summary, result = evaluate_and_summarize(eval_cfg, chosen, test, history, progress=False, device=device)
        grid = save_retrieval_grid(result, test, out / "retrieval_grid.png", seed=cfg.train.seed)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        tracker.log_metrics({f"final_test/{k}": v for k, v in summary["test"].items()}
                            | {"selected_epoch": summary["selected_epoch"],
                               "corrupt_images_skipped_test": len(test.skipped)}, step=cfg.train.epochs)
        for path, folder in ((best_path if best is not None else None, "checkpoints"), (last_path, "checkpoints"),
                             (out / "config.yaml", None),
                             (out / "metrics.json", None), (out / "recall_curves.png", "plots"),
                             (out / "uncertainty.png", "plots"), (grid, "plots")):
            if path is not None:
                tracker.log_artifact(path, folder)
        tracker.finish()


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
            log.info("epoch %d/%d: step %d, %d images, %.1f images/s", epoch + 1, epochs, step, images,
                     images / (now - start))
            last = now


def _wrap_ddp(objective, device, world: int, *, find_unused: bool):
    if world == 1:
        return objective
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        objective, device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,  # BN statistics are frozen: nothing to broadcast each step
        find_unused_parameters=find_unused,
    )


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
    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(last_path, Path(folder) / "last.pt")
        if best_path is not None:
            shutil.copyfile(best_path, Path(folder) / "best.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")


def save_retrieval_grid(result: dict[str, Any], dataset: StreamedSplit, path: Path, *, num_queries: int = 8,
                        k: int = 5, seed: int = 0) -> Path | None:
    """Random queries of the evaluated split with their top-``k`` neighbours (wrong ones outlined)."""
    from idml.evaluation import knn, plot_retrieval_grid

    mu, labels = result["mu"], np.asarray(dataset.labels)
    k = min(k, len(mu) - 1)
    if k < 1:
        return None
    # One random query from each of up to ``num_queries`` random classes.
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))[:num_queries]
    queries = np.array([rng.choice(np.flatnonzero(labels == c)) for c in classes])
    sims, idx = knn(mu[queries], mu, k + 1)
    rows, scores = [], []
    for q, s_row, i_row in zip(queries, sims, idx):
        keep = [(s, j) for s, j in zip(s_row.tolist(), i_row.tolist()) if j != q][:k]
        rows.append([j for _, j in keep])
        scores.append([s for s, _ in keep])
    pictures = dataset.images(sorted({int(q) for q in queries} | {j for row in rows for j in row}))
    thumb = lambda i: np.asarray(pictures[i].resize((96, 96)))  # noqa: E731
    plot_retrieval_grid([thumb(q) for q in queries], [[thumb(j) for j in row] for row in rows],
                        [[labels[j] == labels[q] for j in row] for q, row in zip(queries, rows)], path,
                        query_titles=[f"query (label {labels[q]})" for q in queries], result_scores=scores)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.train [idml train options]``, e.g. as the entrypoint of
    ``ray job submit``: the same as ``idml train --ray``."""
    from idml.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    verbose = [a for a in args if a in ("-v", "--verbose")]  # a top-level option of the idml CLI
    return cli_main([*verbose, "train", "--ray", *[a for a in args if a not in verbose]])


if __name__ == "__main__":
    sys.exit(main())
