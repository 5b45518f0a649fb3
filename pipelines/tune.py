"""Hyperparameter search on Ray Tune, the driver: ``idml tune`` (``python -m pipelines.tune``).

- The space file (``tune_spaces/``, ``pipelines._tune_space``) is read and every trial's config
  built and checked on the driver, with the dataset and the cluster's CPUs, before any trial.
- Each trial is one distributed training run: a Tune *function* trainable builds the Ray Train
  V2 ``TorchTrainer`` of ``pipelines.train`` (``plan`` + ``build_datasets(test=False)`` +
  ``build_trainer``) and ``TuneReportCallback`` forwards rank 0's per-epoch reports, on which
  ASHA decides (``epoch``). Trials never read the test split.
- MLflow: a parent run per search (created, with the database, before any trial) and a child
  run per trial (tag ``mlflow.parentRunId``), all found again by name, so a resumed search
  (same name: ``Tuner.restore``; unfinished trials continue from their Ray Train checkpoints)
  makes no duplicates.
- Known limit: Tune does not persist which trials its ``max_concurrent_trials`` counts, so a
  restored search can start one more trial beside a resumed one; on a cluster whose CPUs fit
  only ``concurrency`` trials the two can stall each other (their workers leave Ray Data no CPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idml.config import config_from_dict
from idml.tracking import MlflowRun, metric_name, source_tags, tracking_uri

from ._capacity import refuse_unless_it_fits
from ._ray import init_ray
from ._tune_report import finish_search, retrain
from ._tune_space import Space, SpaceError, with_params
from .train import DEFAULT_EXPERIMENT, RayOptions, build_datasets, build_trainer, plan, worker_request

log = logging.getLogger(__name__)

TRIAL_DRIVER_CPUS = 0.01


@dataclass
class TuneOptions:
    name: str | None = None  # default: the space file's name; the same name resumes
    output_dir: str | None = None  # default: runs/tune/<name>
    storage_path: str | None = None  # default: <output_dir>/ray; shared storage (NFS, s3://) on a cluster
    experiment: str = DEFAULT_EXPERIMENT
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    address: str | None = None
    retrain_seeds: int = 0  # retrain the best and the lambda = 0 config on this many seeds, evaluated on test
    verbose: bool = False


@dataclass
class Search:
    """A search resolved on the driver: where everything goes."""

    name: str
    space: Space
    out: Path
    storage: str
    uri: str
    options: TuneOptions

    def trial_config(self, index: int):
        cfg = self.space.trial_config(self.space.trials[index])
        cfg.output_dir = str(self.out / "trials" / f"trial-{index:03d}")
        return cfg

    def ray_options(self, run_name: str, storage: str | None = None) -> RayOptions:
        return trial_options(self.space.resources, run_name=run_name, storage_path=storage or f"{self.storage}/{self.name}-trials",
                             tracking_uri=self.uri, experiment=self.options.experiment, verbose=self.options.verbose)


def trial_options(resources: dict[str, Any], **options) -> RayOptions:
    """A trial's Ray options: trials share nodes, so each worker runs one torch thread per CPU it
    reserves rather than a whole node's worth (``pipelines.train.worker_threads``)."""
    return RayOptions(**resources, threads=max(1, int(resources["cpus_per_worker"])), **options)


def prepare(space: Space, options: TuneOptions) -> Search:
    """Resolve paths and check the dataset against every trial's config (no Ray needed)."""
    if options.retrain_seeds < 0:
        raise ValueError(f"--retrain-seeds must be >= 0, got {options.retrain_seeds}")
    name = options.name or space.path.stem
    out = Path(options.output_dir or Path("runs") / "tune" / name).expanduser().resolve()
    data = Path(space.base.data.dataset).expanduser()
    if data.exists():  # Tune runs each trial in its own working directory
        space.base.data.dataset = str(data.resolve())
    uri = options.tracking_uri or tracking_uri(Path.cwd())
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_absolute():
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    search = Search(name, space, out, options.storage_path or str(out / "ray"), uri, options)
    checked = set()
    for index in range(len(space.trials)):
        cfg = search.trial_config(index)
        key = (cfg.data.dataset, cfg.train.batch_size, cfg.train.images_per_class)
        if key not in checked:
            checked.add(key)
            if not plan(cfg, search.ray_options("check")).has_val and space.objective.startswith("val/"):
                raise SpaceError(f"no trial reports {space.objective!r}: dataset {cfg.data.dataset} has no "
                                 f"{cfg.data.val_split!r} split (convert with --val-fraction > 0)")
    _check_same_search(search)
    return search


def tune_search(space: Space, options: TuneOptions | None = None) -> dict[str, Any]:
    """Run (or resume) the search; returns the summary written to ``<output_dir>/search.json``."""
    search = prepare(space, options or TuneOptions())
    init_ray(search.options.address, dashboard=True, verbose=search.options.verbose)
    check_resources(space)
    parent = MlflowRun.open(search.uri, search.options.experiment, search.name,
                            tags={"idml.entrypoint": "pipelines.tune", "idml.search": search.name, **source_tags("pipelines.tune")})
    parent.log_params({"space_file": str(space.path), "objective": space.objective, "mode": space.mode,
                       "trials": len(space.trials), "concurrency": space.concurrency,
                       "scheduler": json.dumps(space.scheduler), "space": json.dumps(space.params),
                       **{f"base.{k}": v for k, v in space.base.flat().items()}})
    log.info("search %r: %d trials (the first with lambda = 0), storage %s, MLflow parent run %s at %s",
             search.name, len(space.trials), search.storage, parent.run_id, search.uri)
    try:
        grid = _fit_until_ctrl_c(_tuner(search, parent.run_id))
        summary = finish_search(search, grid, parent)
        if search.options.retrain_seeds:
            summary["retrain"] = retrain(search, summary, parent)
    except KeyboardInterrupt:
        parent.finish("KILLED")
        raise
    except BaseException:
        parent.fail()
        raise
    (search.out / "search.json").write_text(json.dumps(summary, indent=2, default=str))
    parent.log_artifact(search.out / "search.json")
    parent.finish()
    return summary


def _fit_until_ctrl_c(tuner):
    """``tuner.fit()``, with Ctrl-C as ``KeyboardInterrupt``. On Ctrl-C Tune stops its trials,
    marks them terminated and returns as if the search were done (the table, the best config and
    the retraining would then describe half a search); its handler puts back the one it found
    before returning, so finding ours back means it ran."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()  # no signal handlers off the main thread (nor Tune's)

    def before_tune(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, before_tune)
    try:
        grid = tuner.fit()
        interrupted = signal.getsignal(signal.SIGINT) is before_tune
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    return grid


def check_resources(space: Space) -> None:
    """Concurrent trials that the cluster cannot hold with their Ray Data decoding would wait
    forever (or starve the data pipeline): refuse them before any trial starts."""
    r = space.resources
    # Ray Data's one-CPU steps (re-blocking the packed batches) and decode tasks must find a CPU
    # beside every trial's workers, else the trial's first batch never comes.
    data = max(r["decode_cpus"], 1.0)
    request = worker_request(trial_options(r), count=space.concurrency * r["num_workers"],
                             spare_cpus=space.concurrency * (data + TRIAL_DRIVER_CPUS))
    refuse_unless_it_fits(dataclasses.replace(
        request, what="trial worker", spare_why=f"CPU(s) Ray Data needs beside the workers ({data:g} per trial)",
        fix=f"lower concurrency or resources in {space.path} (now {space.concurrency} trial(s) at once, each "
            f"{r['num_workers']} worker(s) x {r['cpus_per_worker']:g} CPU{' + 1 GPU' if r['use_gpu'] else ''})"))


def _check_same_search(search: Search) -> None:
    """A name resumes its search: with another trial list that would mix two searches."""
    record = search.out / "trials.json"
    trials = json.loads(json.dumps(search.space.trials))
    if record.exists() and json.loads(record.read_text()) != trials:
        raise SpaceError(f"search {search.name!r} already exists in {search.out} with other trials; "
                         "pass another --name (or --output-dir) for a new search")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(trials, indent=1))


def _tuner(search: Search, parent_id: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    space = search.space
    job = {"base": space.base.to_dict(), "out": str(search.out), "name": search.name, "parent_id": parent_id,
           "resources": space.resources, "storage": f"{search.storage}/{search.name}-trials", "uri": search.uri,
           "experiment": search.options.experiment, "verbose": search.options.verbose}
    # The trial function only starts the TorchTrainer: its workers and Ray Data hold the CPUs
    # (Tune refuses an empty request, hence a token share).
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"CPU": TRIAL_DRIVER_CPUS})
    path = f"{search.storage.rstrip('/')}/{search.name}"
    if tune.Tuner.can_restore(path):
        log.info("resuming search %r from %s", search.name, path)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    s = space.scheduler
    max_t = max(search.trial_config(i).train.epochs for i in range(len(space.trials)))
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=s["grace_period"],
                               reduction_factor=s["reduction_factor"]) if s["name"] == "asha" else FIFOScheduler())
    trials = [{"index": i, "params": p} for i, p in enumerate(space.trials)]
    return tune.Tuner(
        trainable, param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(metric=metric_name(space.objective), mode=space.mode, scheduler=scheduler,
                                    max_concurrent_trials=space.concurrency),
        run_config=tune.RunConfig(name=search.name, storage_path=search.storage, verbose=1 if search.options.verbose else 0),
    )


def run_trial(config: dict[str, Any], job: dict[str, Any]) -> None:
    """One trial (a Tune function trainable): its own ``TorchTrainer``, named after the trial,
    so a restored trial resumes that run from its last checkpoint."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    index, params = config["trial"]["index"], config["trial"]["params"]
    cfg = with_params(config_from_dict(job["base"]), params)
    cfg.output_dir = f"{job['out']}/trials/trial-{index:03d}"
    name = f"trial-{index:03d}"
    p = plan(cfg, trial_options(job["resources"], run_name=name, storage_path=job["storage"],
                                tracking_uri=job["uri"], experiment=job["experiment"], verbose=job["verbose"]))
    run = MlflowRun.open(job["uri"], job["experiment"], f"{job['name']}-{name}", tags={
        "mlflow.parentRunId": job["parent_id"], "idml.search": job["name"], "idml.trial": str(index),
        "idml.tune_trial_id": ray.tune.get_context().get_trial_id()})
    run.log_params({f"search.{k}": v for k, v in params.items()})
    trainer = build_trainer(p, build_datasets(p, test=False), [TuneReportCallback()], run_id=run.run_id)
    try:
        trainer.fit()
    except BaseException:
        run.fail()
        raise

