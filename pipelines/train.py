"""Distributed training on Ray, the driver: ``idml train --ray`` (``python -m pipelines.train``).

Ray Data streams the sharded Parquet training split through class-balanced packing, decoding
and augmentation (``pipelines._data``) into a Ray Train V2 ``TorchTrainer`` whose workers run
the library's epoch loop under DDP (``pipelines.train_worker``; gloo on CPU, nccl on GPU).

- ``plan`` checks everything on the driver before any worker starts (config, options,
  dataset, whether the split can fill a batch per worker).
- ``build_datasets`` decodes val and test once per job (kept in the object store) and builds
  the lazily executed train pipeline; ``build_trainer`` assembles the ``TorchTrainer`` without
  side effects, so a Ray Tune trial can build one per trial; ``train_ray`` is the whole job.
- ``train.batch_size`` is per worker: every worker's step sees a full class-balanced batch.
- MLflow: one run per job, named like the Ray run, found again by name on resume (so a resumed
  job appends to it); only rank 0 logs: params (the full config), per-epoch metrics, and at the
  end the final and best checkpoints, the config, the plots and a retrieval grid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from idml.checkpoint import resume_checkpoint
from idml.config import Config, config_from_dict, validate_config
from idml.errors import InputError
from idml.data.builtin import resolve_dataset
from idml.data.source import DatasetSource, open_dataset
from idml.tracking import MlflowRun, check_tracking_store, source_tags, tracking_uri

from ._capacity import Request, refuse_unless_it_fits
from ._data import class_chunk_counts, distractor_dataset, eval_datasets, max_batches, train_dataset
from ._ray import init_ray

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "idml"


@dataclass
class RayOptions:
    """How the job runs on Ray (the model and data live in ``Config``)."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0  # what each worker reserves (Ray's scheduling), not its threads
    # torch threads per worker; 0: train.threads if set, else sized to the machine (worker_threads)
    threads: int = 0
    use_gpu: bool = False
    decode_cpus: float = 1.0  # CPUs each Ray Data decode task reserves
    run_name: str | None = None  # default: the name of cfg.output_dir
    storage_path: str | None = None  # default: <output_dir>/ray; shared storage (NFS, s3://) on a multi-node cluster
    max_failures: int = 2
    checkpoints_to_keep: int = 1  # each holds last.pt with the optimizer state; restarts need only the latest
    experiment: str = DEFAULT_EXPERIMENT
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    register_model: str | None = None  # register the logged model (runs:/<run>/model) as a new version of this name
    log_model: bool = True  # log the selected checkpoint as an MLflow model (search trials do not)
    address: str | None = None  # Ray cluster; default: $RAY_ADDRESS or a new local instance
    verbose: bool = False  # Ray Data's execution lines and library debug logs in the job's output

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
        if self.threads < 0:
            problems.append(f"threads must be >= 0 (0: sized to the machine), got {self.threads}")
        if self.checkpoints_to_keep < 1:
            problems.append(f"checkpoints_to_keep must be >= 1, got {self.checkpoints_to_keep}")
        if self.run_name is not None and (not self.run_name.strip() or self.run_name in (".", "..")
                                          or any(c in self.run_name for c in "/\\\0")):
            problems.append(f"run_name {self.run_name!r} must be a folder name (Ray stores the run under it): "
                            "not empty, no / or \\")
        if len(problems) == 1:
            raise InputError(f"invalid Ray option: {problems[0]}")
        if problems:
            raise InputError("invalid Ray options:\n  " + "\n  ".join(problems))

    @property
    def reserved_threads(self) -> int:
        """One torch thread per reserved CPU (at least one)."""
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
    resume: bool = True  # continue the run called run_name from its latest checkpoint, if it has one


def plan(cfg: Config, options: RayOptions, *, resume: bool = True) -> Plan:
    """Validate the config, options and dataset: every user error surfaces here, before Ray
    starts a worker (unknown keys and wrong types already fail in ``load_config``)."""
    validate_config(cfg)
    options.validate()
    uri = options.tracking_uri or tracking_uri(Path.cwd())
    check_tracking_store(uri)  # MLflow itself finds a broken store only after the training
    source = open_dataset(resolve_dataset(cfg.data.dataset))
    t, d = cfg.train, cfg.data
    for split in (d.train_split, d.test_split):
        if not source.has_split(split):
            raise ValueError(f"dataset {cfg.data.dataset} has no images in split {split!r}")
    # A damaged shard fails here, not as a WorkerGroupError after the workers started.
    source.check_shards([s for s in (d.train_split, d.val_split, d.test_split) if source.has_split(s)])
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
    return Plan(cfg, options, source, num_classes, has_val, run_name, storage, uri, resume)


def build_datasets(p: Plan, *, test: bool = True) -> dict[str, Any]:
    """The job's Ray datasets: ``train`` (re-executed with fresh randomness each epoch; creates
    the packer actor) and ``val``/``test``, decoded once for the whole job and kept in the object
    store (spilled to disk when large), so an evaluation pass reads ready tensors. ``test=False``
    (a search trial) leaves the test split out: it is never read."""
    import ray.data

    context = ray.data.DataContext.get_current()
    # Worker output reaches the driver line by line, where Ray Data's progress bars and
    # per-execution lines turn into screens of noise; rank 0 logs progress lines instead.
    context.enable_progress_bars = False
    context.print_on_execution_start = p.options.verbose
    names = {**({"test": p.cfg.data.test_split} if test else {}), **({"val": p.cfg.data.val_split} if p.has_val else {})}
    if names:
        log.info("decoding %s once for the whole job", " and ".join(dict.fromkeys(names.values())))
    splits = list(dict.fromkeys(names.values()))  # a split named twice (test_split = val_split) is decoded once
    decoded = dict(zip(splits, eval_datasets(p.source, splits, p.cfg, decode_cpus=p.options.decode_cpus)))
    datasets = {name: decoded[split] for name, split in names.items()}
    if test and p.has_val:  # read once, at the end, by the confidence's fit
        datasets["distractors"] = distractor_dataset(p.source, p.cfg, decode_cpus=p.options.decode_cpus)
    datasets["train"] = train_dataset(p.source, p.cfg, decode_cpus=p.options.decode_cpus)
    return datasets


def worker_threads(p: Plan) -> tuple[int, str]:
    """Torch threads per training worker, and why. A worker reserves ``cpus_per_worker`` CPUs so
    that Ray Data keeps CPUs to decode on, but decoding needs a fraction of a core at training
    speed: a worker limited to its reservation left half of a 2-core machine idle (one thread,
    16 images/s). By default each worker therefore runs as many threads as its node has CPUs
    per worker placed there, and decoding borrows the cycles a training step leaves idle
    (``benchmarks/train_throughput.py`` measures the split). GPU workers keep their reservation:
    the GPU computes, the threads only feed it."""
    o = p.options
    if p.cfg.train.threads:
        return p.cfg.train.threads, "train.threads"
    if o.threads:
        return o.threads, "--threads"
    if o.use_gpu:
        return o.reserved_threads, "GPU workers: one per reserved CPU"
    import ray

    nodes = [n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
    if not nodes:  # an autoscaling cluster with no CPU node yet
        return o.reserved_threads, "no CPU node up yet: one per reserved CPU"
    per_node = math.ceil(o.num_workers / len(nodes))
    smallest = int(min(nodes))
    threads = max(1, smallest // per_node)
    return threads, f"{smallest} CPUs on the smallest node / {per_node} worker(s) there"


def build_trainer(p: Plan, datasets: dict[str, Any], callbacks: Sequence[Any] = (), *, run_id: str | None = None):
    """The ``TorchTrainer`` of a plan (no side effects: a Ray Tune trial can build its own).
    ``callbacks`` go to ``RunConfig(callbacks=...)``; ``run_id`` is the MLflow run rank 0 logs
    into (None: no MLflow logging). Without a ``test`` dataset (``build_datasets(test=False)``)
    the workers never evaluate on test."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .train_worker import train_worker

    o = p.options
    resources = {"CPU": o.cpus_per_worker, **({"GPU": 1} if o.use_gpu else {})}
    threads, why = worker_threads(p)
    log.info("%d worker(s), each reserving %g CPU%s and running %d torch thread(s) (%s)", o.num_workers,
             o.cpus_per_worker, " + 1 GPU" if o.use_gpu else "", threads, why)
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "config": p.cfg.to_dict(), "source": p.source, "num_classes": p.num_classes, "has_val": p.has_val,
            "threads": threads, "tracking_uri": p.tracking_uri, "run_id": run_id,
            "verbose": o.verbose, "has_test": "test" in datasets, "log_model": o.log_model,
            "register_model": o.register_model,
            "params": {**p.cfg.flat(), **{f"ray.{k}": v for k, v in dataclasses.asdict(o).items()},
                       "ray.run_name": p.run_name, "ray.storage_path": p.storage_path},
        },
        scaling_config=ray.train.ScalingConfig(num_workers=o.num_workers, use_gpu=o.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=p.run_name, storage_path=p.storage_path, callbacks=list(callbacks),
            # Ray Train's INFO lines (worker group start, every report) go to its log files only.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if o.verbose else "WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=o.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=o.checkpoints_to_keep),
        ),
        datasets=datasets,
        # Evaluation passes must yield rows in the same order every time.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options={
            name: _ingest_options(preserve_order=name != "train") for name in datasets}),
    )


def _ingest_options(*, preserve_order: bool):
    """``DataConfig.default_ingest_options()`` without ``exclude_resources`` (deprecated: setting
    it, even to zero, warns in every job)."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=preserve_order,
                            verbose_progress=current.verbose_progress)


def train_ray(cfg: Config, options: RayOptions | None = None, *, resume: bool = True) -> dict[str, Any]:
    """Train ``cfg`` on Ray; returns the summary rank 0 wrote to ``<output_dir>/metrics.json``
    (test metrics of the checkpoint selected on validation, history, MLflow run id)."""
    return train_planned(plan(cfg, options or RayOptions(), resume=resume))


def train_planned(p: Plan) -> dict[str, Any]:
    """``train_ray`` for a plan (the command line keeps the plan to say where a stopped run is)."""
    check_resume(p)
    init_ray(p.options.address, dashboard=True, verbose=p.options.verbose)
    refuse_unless_it_fits(worker_request(p.options))
    run = MlflowRun.open(p.tracking_uri, p.options.experiment, p.run_name, tags={"idml.entrypoint": "pipelines.train", **source_tags("pipelines.train")})
    trainer = build_trainer(p, build_datasets(p), run_id=run.run_id)
    log.info("training run %r (storage %s, MLflow run %s at %s)", p.run_name, p.storage_path, run.run_id, p.tracking_uri)
    started = time.time()
    try:
        result = _fit_until_ctrl_c(trainer)
    except KeyboardInterrupt:
        run.finish("KILLED")
        raise
    except BaseException:
        run.fail()
        raise
    summary = _read_summary(Path(p.cfg.output_dir) / "metrics.json", started, p.tracking_uri, run.run_id)
    summary.update(run_name=p.run_name, mlflow_run_id=run.run_id, storage_path=p.storage_path,
                   checkpoint_path=result.checkpoint.path if result.checkpoint else None)
    return summary


def _fit_until_ctrl_c(trainer):
    """``trainer.fit()``, with Ctrl-C as ``KeyboardInterrupt``. Ray Train's own SIGINT handler
    aborts the run and then calls ``sys.exit`` inside ``ray.get``, which ends the driver with exit
    1 and no message, and stays installed after ``fit``. Ours (in its place: Ray installs it when
    ``fit`` starts the controller) aborts the run the same way and lets the command line say where
    the run stopped; the previous handler comes back afterwards."""
    import ray

    interrupted = False

    def register(controller) -> None:
        def on_sigint(signum, frame) -> None:
            nonlocal interrupted
            if interrupted:
                raise KeyboardInterrupt  # a second Ctrl-C stops waiting for the abort
            interrupted = True
            try:
                ray.get(controller.abort.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - the controller exits while aborting (RayActorError)
                pass

        signal.signal(signal.SIGINT, on_sigint)

    previous = signal.getsignal(signal.SIGINT)
    trainer._register_sigint_handler = register
    try:
        result = trainer.fit()
    except BaseException:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
    if interrupted:  # aborted just as the run ended: its result is not this command's
        raise KeyboardInterrupt
    return result


def latest_checkpoint(p: Plan):
    """Ray's ``Result`` of the run called ``p.run_name`` (its ``checkpoint`` is what the run
    resumes from), or None when the run has reported no checkpoint yet."""
    from ray.train import Result

    try:
        result = Result.from_path(f"{p.storage_path.rstrip('/')}/{p.run_name}")
    except RuntimeError:  # no such run folder, or no checkpoint reported in it
        return None
    return result if result.checkpoint is not None else None


def check_resume(p: Plan) -> None:
    """A run resumed by name must be the same run: compare its latest checkpoint's config (on the
    driver, before any worker starts) and refuse a different one, a damaged checkpoint, or an
    output folder holding another run's ``last.pt``."""
    if not p.resume:
        return
    out = Path(p.cfg.output_dir)
    no_resume = (f"--no-resume for a new run under a new name (this folder's last.pt and best.pt are replaced; "
                 f"Ray's checkpoints of earlier runs stay in {p.storage_path})")
    result = latest_checkpoint(p)
    if result is not None:
        with result.checkpoint.as_directory() as folder:
            resume_checkpoint(Path(folder) / "last.pt", p.cfg,
                              start_over=f"to train this config, pass another --output-dir (and --run-name, if given), or {no_resume}")
    elif (out / "last.pt").exists():
        raise InputError(f"{out / 'last.pt'} belongs to another run (a local run, or another --run-name): Ray run "
                         f"{p.run_name!r} has no checkpoint in {p.storage_path} to resume, and starting it would "
                         f"replace that file. Nothing was changed; pass another --output-dir, or {no_resume}")


def where_stopped(p: Plan) -> str:
    """A line for a user who stopped the run: its latest checkpoint and how to resume it."""
    result = latest_checkpoint(p)
    if result is None:
        return f"Ray run {p.run_name!r} reported no checkpoint yet (nothing to resume)"
    epoch = result.metrics.get("epoch") if result.metrics else None
    done = f" (epoch {int(epoch) + 1} of {p.cfg.train.epochs} done)" if epoch is not None else ""
    return (f"the last checkpoint of Ray run {p.run_name!r} is {result.checkpoint.path}{done}; "
            f"`--run-name {p.run_name}` (without --no-resume) resumes from it")


def _read_summary(path: Path, since: float, uri: str, run_id: str) -> dict[str, Any]:
    """Rank 0's metrics.json: from the output folder when rank 0 ran on this machine (a file
    written during this job), else from the MLflow run's artifacts."""
    if not path.exists() or path.stat().st_mtime < since:
        from mlflow.tracking import MlflowClient

        path = Path(MlflowClient(uri).download_artifacts(run_id, "metrics.json", tempfile.mkdtemp()))
    return json.loads(path.read_text())


def worker_request(options: RayOptions, *, count: int | None = None, spare_cpus: float | None = None) -> Request:
    """The training workers as a request to the cluster (``pipelines._capacity``): Ray Data's
    decode tasks need a CPU beside them, or the first batch never comes."""
    return Request("training worker", {"CPU": options.cpus_per_worker, "GPU": 1.0 if options.use_gpu else 0.0},
                   options.num_workers if count is None else count,
                   spare_cpus=options.decode_cpus if spare_cpus is None else spare_cpus,
                   spare_why="CPU(s) Ray Data's decode tasks need beside the workers",
                   fix="lower --cpus-per-worker or --num-workers (fractions such as 0.5 are fine)"
                       + ("; --gpu needs a GPU on a node" if options.use_gpu else ""))

