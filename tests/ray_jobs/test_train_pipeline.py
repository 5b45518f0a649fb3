"""End to end on the session's shared Ray cluster (2 CPUs): distributed training with 2 DDP workers, MLflow
tracking, resuming by run name, recovery from a SIGKILLed worker, and bad input rejected before
any worker starts."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from ray_jobs.ray_helpers import TINY, artifact_paths, cluster_processes, mlflow_runs, sqlite_uri
from support import make_class_dataset

from idml.checkpoint import load_checkpoint, model_from_checkpoint
from idml.training.loop import SELECTION_METRIC
from idml.config import ConfigError, load_config
from pipelines.cli import main
from pipelines.train import RayOptions, train_ray

EXPECTED_ARTIFACTS = {"checkpoints/best.pt", "config.yaml", "metrics.json",
                      "plots/recall_curves.png", "plots/uncertainty.png", "plots/retrieval_grid.png",
                      "plots/uncertainty_extremes.png"}


@pytest.fixture(scope="module")
def cluster(ray_connected):
    """The session's shared cluster (tests/conftest.py), this process connected to it."""
    return ray_connected


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # One undecodable training image and one test image: counted skips, not failures.
    return make_class_dataset(tmp_path_factory.mktemp("data") / "tiny", corrupt=("3/5", "12/1"))


def config(dataset, out, *extra):
    return load_config(overrides=TINY + [f"data.dataset={dataset}", f"output_dir={out}", *extra])


def options(tmp_path, **kwargs):
    # 2 workers x 0.5 CPU: the cluster keeps CPUs free for Ray Data.
    return RayOptions(num_workers=2, cpus_per_worker=0.5, tracking_uri=sqlite_uri(tmp_path), **kwargs)


def epoch_logged(tmp_path, epoch: int) -> bool:
    client, runs = mlflow_runs(sqlite_uri(tmp_path))
    return bool(runs) and epoch in metric_steps(client, runs[0].info.run_id, "train/loss")


def metric_steps(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_two_workers_train_track_and_resume_by_name(cluster, dataset, tmp_path, monkeypatch, capsys):
    cfg = config(dataset, tmp_path / "run")
    summary = train_ray(cfg, options(tmp_path))

    history = summary["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[1]["train/loss"] < history[0]["train/loss"]  # it learns
    # 8 batches of 2 classes x 4 images per epoch, 4 per worker; the corrupt image's batch
    # lost its class chunk
    assert all(h["train/steps"] == 4 and h["train/images"] == 60 for h in history)
    assert all(h["train/corrupt_images_skipped"] == 1 for h in history)
    # the checkpoint is selected on the validation split (training classes), never on test
    assert summary["selected_epoch"] == max(history, key=lambda h: h[f"val/{SELECTION_METRIC}"])["epoch"]
    assert not any("test/recall@1" in h for h in history)  # test: once, on the selected checkpoint
    assert 0 <= summary["test"]["recall@1"] <= 1 and "uncertainty_auroc_mixed" in summary["test"]
    for name in ("best.pt", "metrics.json", "retrieval_grid.png", "uncertainty.png", "config.yaml"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    # The optimizer state is kept once: in Ray's checkpoint, not also in the output folder.
    assert not (tmp_path / "run" / "last.pt").exists()
    assert not list((tmp_path / "run").glob(".report-*"))
    model, trained = model_from_checkpoint(tmp_path / "run" / "best.pt")
    assert trained.model.embedding_dim == 32
    # Ray keeps the latest checkpoint only: it holds the one copy of the optimizer state.
    kept = sorted(p.name for p in (Path(summary["storage_path"]) / "run").glob("checkpoint_epoch_*"))
    assert kept == ["checkpoint_epoch_0001"] and (Path(summary["storage_path"]) / "run" / kept[0] / "last.pt").exists()
    assert "optimizer" not in load_checkpoint(tmp_path / "run" / "best.pt")

    client, runs = mlflow_runs(sqlite_uri(tmp_path))
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "run" and run.info.status == "FINISHED" and run.info.run_id == summary["mlflow_run_id"]
    params = run.data.params
    assert params["train.lr"] == "0.001" and params["model.backbone"] == "resnet18"
    assert params["loss.name"] == "proxy_anchor" and params["ray.num_workers"] == "2"
    assert metric_steps(client, run.info.run_id, "train/loss") == [0, 1]
    assert metric_steps(client, run.info.run_id, "val/recall_at_1") == [0, 1]
    assert metric_steps(client, run.info.run_id, "test/recall_at_1") == []
    assert "final_test/recall_at_1" in run.data.metrics and "final_test/uncertainty_auroc_mixed" in run.data.metrics
    assert run.data.metrics["corrupt_images_skipped_test"] == 1
    assert EXPECTED_ARTIFACTS <= artifact_paths(client, run.info.run_id)
    # Rank 0 logged the selected checkpoint as the run's MLflow model, with the source tags.
    assert run.data.tags["idml.model_uri"] == f"runs:/{run.info.run_id}/model"
    assert run.data.tags["mlflow.source.name"] == "pipelines.train"
    from idml.registry import resolve_checkpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(tmp_path))
    assert resolve_checkpoint(f"runs:/{run.info.run_id}/model", cache_dir=tmp_path / "dl").read_bytes() == \
        (tmp_path / "run" / "best.pt").read_bytes()

    # The same run name again (the CLI's default: the output folder's name), one more epoch:
    # resumes from the latest checkpoint and appends to the same MLflow run.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(tmp_path))
    assert main(["train", "--ray", "--set", *TINY, f"data.dataset={dataset}", "train.epochs=3", "--output-dir", str(tmp_path / "run"),
                 "--num-workers", "2", "--cpus-per-worker", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "recall@1" in printed and "Ray run 'run'" in printed
    assert [h["epoch"] for h in json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]] == [0, 1, 2]
    storage = Path(summary["storage_path"]) / "run"
    assert [p.name for p in storage.glob("checkpoint_epoch_*")] == ["checkpoint_epoch_0002"]
    assert load_checkpoint(storage / "checkpoint_epoch_0002" / "last.pt")["epoch"] == 2
    client, runs = mlflow_runs(sqlite_uri(tmp_path))
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert metric_steps(client, runs[0].info.run_id, "train/loss") == [0, 1, 2]
    assert runs[0].data.metrics["resumed_from_epoch"] == 2

    # The same run name with another loss: refused on the driver against the run's latest Ray
    # checkpoint (was: three epochs' metrics printed as the new loss's, or "Unexpected key(s) loss.proxies").
    storage = Path(summary["storage_path"]) / "run"
    before = {p: p.stat().st_mtime_ns for p in [*storage.rglob("*.pt"), *(tmp_path / "run").glob("*.pt")]}
    assert main(["train", "--ray", "--set", *TINY, f"data.dataset={dataset}", "train.epochs=3", "loss.name=triplet",
                 "--output-dir", str(tmp_path / "run"), "--num-workers", "2", "--cpus-per-worker", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with another config" in err and "loss.name: 'proxy_anchor' -> 'triplet'" in err
    assert "--no-resume" in err
    assert {p: p.stat().st_mtime_ns for p in before} == before and len(mlflow_runs(sqlite_uri(tmp_path))[1]) == 1


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(cluster, tmp_path):
    import ray

    # 2 epochs, the kill lands in the second. Epoch 0 is a warm-up (frozen backbone), so the
    # workers rebuild their DDP wrapper for epoch 1 before the kill, and build it for the
    # trainable phase straight away after the restart. 24 images per class make 12 steps per
    # worker and epoch: seconds, so the kill lands inside the epoch.
    data = make_class_dataset(tmp_path / "data", per_class=24)
    cfg = config(data, tmp_path / "ft", "train.warmup_epochs=1")
    result: dict = {}

    def run():
        try:
            result["summary"] = train_ray(cfg, options(tmp_path, max_failures=2))
        except BaseException as e:  # reported by the assertion below
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    # Epoch 0 is over once its metrics are in MLflow (logged after its checkpoint is reported)
    # and Ray Train's controller has registered that checkpoint (it polls the workers' reports:
    # on a loaded machine that can come seconds later, and a kill before it restarts from scratch).
    snapshot = tmp_path / "ft" / "ray" / "ft" / "checkpoint_manager_snapshot.json"

    def epoch_0_done() -> bool:
        return (epoch_logged(tmp_path, 0) and snapshot.exists()
                and "checkpoint_epoch_0000" in snapshot.read_text(errors="replace"))

    while not epoch_0_done() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert epoch_0_done(), result.get("error")
    # Kill early in epoch 1: on a quiet machine its 12 steps and evaluation can finish within a
    # second, and a kill after epoch 1 logged its metrics reruns it (train/loss at [0, 1, 1]).
    time.sleep(0.2)
    workers = cluster_processes(cluster, "ray::RayTrainWorker")
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")

    summary = result["summary"]
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    client, runs = mlflow_runs(sqlite_uri(tmp_path))
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert metric_steps(client, run_id, "train/loss") == [0, 1]  # epoch 1 logged once, after its rerun
    assert [m.value for m in client.get_metric_history(run_id, "resumed_from_epoch")] == [1]
    assert ray.is_initialized()


@pytest.mark.slow
def test_ctrl_c_says_where_the_ray_run_stopped(cluster, dataset, tmp_path):
    # Ray Train's own SIGINT handler aborted the run and ended the driver with exit 1 and no message.
    import subprocess

    out, uri = tmp_path / "stopped", sqlite_uri(tmp_path)
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--ray", "--set", *TINY, f"data.dataset={dataset}", "train.epochs=200",
           "train.max_steps_per_epoch=1", "train.eval_every=200", "--output-dir", str(out), "--address", cluster.address,
           "--num-workers", "1", "--cpus-per-worker", "0.5"]
    proc = subprocess.Popen(cmd, env={**cluster.env, "MLFLOW_TRACKING_URI": uri}, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snapshot = out / "ray" / "stopped" / "checkpoint_manager_snapshot.json"
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not (
                snapshot.exists() and "checkpoint_epoch_" in snapshot.read_text(errors="replace")):
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"idml train --ray stopped {time.monotonic() - sent:.1f} s after Ctrl-C")
    assert proc.returncode == 130, err[-3000:]
    line = next(line for line in err.splitlines() if line.startswith("idml: stopped (Ctrl-C)"))
    assert f"the last checkpoint of Ray run 'stopped' is {out / 'ray' / 'stopped' / 'checkpoint_epoch_'}" in line
    assert "of 200 done); `--run-name stopped` (without --no-resume) resumes from it" in line
    _, runs = mlflow_runs(uri)
    assert [(r.info.run_name, r.info.status) for r in runs] == [("stopped", "KILLED")]


@pytest.mark.parametrize("overrides, error, match", [
    (["data.dataset={missing}"], ValueError, "neither a dataset folder nor a built-in"),
    (["data.dataset=file://{missing}"], FileNotFoundError, "does not exist"),
    (["train.batch_szie=8"], ConfigError, "unknown config key.*train.batch_szie"),
    (["train.epochs=two"], ConfigError, "train.epochs must be int"),
    (["train.batch_size=64"], ValueError, "classes per batch"),
])
def test_bad_input_fails_before_workers_start(dataset, tmp_path, overrides, error, match):
    # No Ray here: each error comes from the driver's checks, before Ray is even needed.
    overrides = [o.format(missing=tmp_path / "nope") for o in overrides]
    with pytest.raises(error, match=match):
        train_ray(config(dataset, tmp_path / "bad", *overrides), options(tmp_path))
    assert not (tmp_path / "bad").exists()


def test_workers_that_leave_ray_data_no_cpu_are_refused(cluster, dataset, tmp_path):
    import ray

    every_cpu = ray.cluster_resources()["CPU"]  # the two workers reserve all of them
    with pytest.raises(ValueError, match="Ray Data"):
        train_ray(config(dataset, tmp_path / "cpu"), RayOptions(num_workers=2, cpus_per_worker=every_cpu / 2,
                                                                tracking_uri=sqlite_uri(tmp_path)))
