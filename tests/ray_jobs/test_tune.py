"""`idml tune` end to end on a real Ray cluster (3 logical CPUs): tune_spaces/smoke.yaml (3 sampled trials
+ the lambda = 0 trial, one at a time, ASHA) on generated data, the driver SIGKILLed mid-search
and restarted with the same name (on a cluster of its own); then the table, the MLflow parent and
children, and the best config trained by `idml train`. Bad spaces fail on the driver before any
trial. The other searches run on the session's shared cluster (2 logical CPUs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ray_jobs.ray_helpers import REPO, mlflow_runs, sqlite_uri
from support import make_class_dataset

from idml.config import load_config
from idml.errors import InputError
from pipelines._tune_space import SpaceError, load_space
from pipelines.cli import main
from pipelines.tune import TuneOptions, tune_search

SMOKE = REPO / "tune_spaces" / "smoke.yaml"
# resnet18 from scratch at 32 px on 8 train classes x 8 images: 8 steps of 2 classes x 4 images.
TINY = ["model.backbone=resnet18", "model.pretrained=false", "model.embedding_dim=32", "data.image_size=32",
        "train.batch_size=8", "train.images_per_class=4", "train.warmup_epochs=0", "train.max_steps_per_epoch=0",
        "eval.batch_size=32"]

@pytest.fixture
def own_cluster(tmp_path_factory):
    """A cluster of its own for the search that is killed and resumed (nothing another test left
    running competes with the resumed trials). 3 CPUs: a restored search may run two trials at
    once (Tune does not persist which trials its concurrency limit counts), and two trials'
    workers on 2 CPUs leave Ray Data none."""
    from ray_jobs.ray_helpers import RayCluster, connected

    cluster = RayCluster(tmp_path_factory.mktemp("ray"), cpus=3)
    try:
        yield from connected(cluster)
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster(ray_connected):
    """The session's shared cluster (tests/conftest.py; 2 logical CPUs), this process connected to it."""
    return ray_connected


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 6 validation classes: MAP@R does not saturate, so trials differ and ASHA has something to cut.
    return make_class_dataset(tmp_path_factory.mktemp("data") / "tiny", val_classes=6, test_classes=2)


def _experiment_state_has_finished_trial(storage: Path) -> bool:
    return any("TERMINATED" in p.read_text(errors="replace") for p in storage.glob("smoke-test/experiment_state-*.json"))


def test_search_killed_and_resumed_tracks_every_trial_once(own_cluster, dataset, tmp_path, monkeypatch, capsys):
    cluster = own_cluster
    out, uri = tmp_path / "search", sqlite_uri(tmp_path)
    # The generated classes are so easy that every trial's val MAP@R is 1 (ties: ASHA cuts
    # nothing); the training loss tells the trials apart, so ASHA ranks on it here.
    space = _space(tmp_path, objective="train/loss")
    args = ["--space", str(space), "--set", *TINY, f"data.dataset={dataset}", "--name", "smoke-test",
            "--output-dir", str(out)]
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": uri,
           "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "tune", *args], env=env, cwd=tmp_path,
                              stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 420  # a loaded 2-core machine
    while not _experiment_state_has_finished_trial(out / "ray") and driver.poll() is None:
        assert time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
        time.sleep(0.5)
    assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]  # killed mid-search
    driver.send_signal(signal.SIGKILL)
    driver.wait()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    assert main(["tune", *args, "--retrain-seeds", "1"]) == 0
    printed = capsys.readouterr().out
    assert "search 'smoke-test': 4 trials" in printed and "best_config.yaml" in printed
    # The best and the lambda = 0 config retrained and evaluated once on test.
    assert "retrained on 1 seed(s), test split" in printed
    retrained = yaml.safe_load((out / "search.json").read_text())["retrain"]
    assert set(retrained) == {"best", "lambda0"} and retrained["lambda0"]["trial"] == 0
    assert all(0 <= r["recall@1_mean"] <= 1 and len(r["seeds"]) == 1 for r in retrained.values())

    # The table: 5 trials, sorted by the objective, ASHA stopped at least one early.
    rows = yaml.safe_load((out / "search.json").read_text())["rows"]  # JSON is YAML
    assert all(r["status"] != "error" for r in rows)
    assert sorted(r["trial"] for r in rows) == [0, 1, 2, 3]
    assert [r["lambda"] for r in rows if r["trial"] == 0] == [0.0]
    scores = [r["objective"] for r in rows]
    assert scores == sorted(scores)  # train/loss: lower is better
    assert any(r["status"] == "stopped early" and r["epochs"] < 3 for r in rows)
    assert (out / "objective_vs_params.png").stat().st_size > 0
    assert not any(Path(out / "trials").glob("*/metrics.json"))  # no trial evaluated the test split

    # MLflow: one parent, one child per trial, each epoch logged once despite the kill.
    client, runs = mlflow_runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "idml.trial" in r.data.tags]
    retrained = [r for r in runs if "idml.retrain" in r.data.tags]
    assert len(retrained) in (1, 2) and all(r.info.status == "FINISHED" for r in retrained)
    assert {r.data.tags["mlflow.parentRunId"] for r in retrained} == {parents[0].info.run_id}
    assert len(parents) == 1 and parents[0].info.run_name == "smoke-test" and parents[0].info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags["idml.trial"]) for c in children) == [0, 1, 2, 3]
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert steps == sorted(set(steps)) and child.info.status == "FINISHED"
        assert not any(k.startswith("test/") for k in child.data.metrics)
        assert {"val/recall_at_1", "val/map_at_r"} <= set(child.data.metrics)
    # Trial 0 had finished before the kill: not run again (a rerun would resume its Ray Train
    # run from the last checkpoint and log resumed_from_epoch).
    first = next(c for c in children if c.data.tags["idml.trial"] == "0")
    assert "resumed_from_epoch" not in first.data.metrics
    # Every epoch Tune saw is in MLflow once; a stopped trial's workers may log one more epoch
    # before ASHA's stop reaches them.
    row = {r["trial"]: r for r in rows}
    assert all(len(client.get_metric_history(c.info.run_id, "train/loss")) >= row[int(c.data.tags["idml.trial"])]["epochs"]
               for c in children)

    # The best config goes into `idml train` unchanged.
    best = out / "best_config.yaml"
    cfg = load_config(best)
    assert cfg.loss.uncertainty_weight == rows[0]["lambda"] and cfg.train.epochs == 3
    assert main(["train", "--config", str(best), "--set", "train.epochs=1", "--output-dir", str(tmp_path / "best")]) == 0
    assert (tmp_path / "best" / "best.pt").exists()


def test_ctrl_c_stops_the_search_without_reporting_half_of_it(cluster, dataset, tmp_path):
    """Tune ends fit() on Ctrl-C and returns as if done: the search must not write a table, a
    best config or retrain from half a search."""
    out, uri = tmp_path / "search", sqlite_uri(tmp_path)
    args = ["--space", str(_space(tmp_path, objective="train/loss")), "--set", *TINY, f"data.dataset={dataset}",
            "--name", "smoke-int", "--output-dir", str(out), "--retrain-seeds", "1"]
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": uri,
           "PYTHONPATH": str(REPO)}
    log = tmp_path / "driver.log"
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "tune", *args], env=env, cwd=tmp_path,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal delivers it
    try:
        deadline = time.monotonic() + 420
        # best.pt stays in a trial's output folder (last.pt moves into Ray's checkpoint).
        while not any((out / "trials").glob("*/best.pt")) and driver.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        sent = time.monotonic()
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=180) == 130, log.read_text()[-3000:]
        print(f"idml tune stopped {time.monotonic() - sent:.1f} s after Ctrl-C")
    finally:
        if driver.poll() is None:  # never leave a search running on the module's cluster
            driver.kill()
            driver.wait()
    printed = log.read_text()
    assert "stopped (Ctrl-C)" in printed and "run the same command again to resume" in printed
    assert not (out / "search.json").exists() and not (out / "best_config.yaml").exists()
    assert not (out / "retrain").exists()
    _, runs = mlflow_runs(uri)
    assert [r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags] == ["KILLED"]


def _space(tmp_path, **changes) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        elif isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    raw["base_config"] = str(REPO / "configs" / "smoke.yaml")
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("changes, match", [
    ({"space": {"loss.uncertainty_wieght": {"uniform": [0.0, 1.0]}}}, "space key 'loss.uncertainty_wieght' is not a config key"),
    ({"trails": 3}, "unknown key.*trails"),
    ({"space": {"loss.mixup": {"uniform": [0.0, 1.0]}}}, "loss.mixup must be bool"),
    ({"space": {"train.epochs": {"choice": ["two", "three"]}}}, "train.epochs must be int"),
    ({"space": {"loss.margin": {"uniform": [0.3, 0.1]}}}, "empty range"),
    ({"space": {"train.lr": {"choice": []}}}, "non-empty list"),
    ({"space": {"train.lr": {"normal": [0.1, 1]}}}, "must be one of"),
    ({"objective": "val/recall@16"}, "no trial reports the objective 'val/recall@16'"),
    ({"objective": "val/nmi"}, "no trial reports the objective"),  # eval.nmi is off in the smoke space
])
def test_bad_spaces_fail_on_load(tmp_path, dataset, changes, match):
    with pytest.raises(SpaceError, match=match):
        load_space(_space(tmp_path, **changes), overrides=TINY + [f"data.dataset={dataset}"])


def test_bad_search_fails_on_the_driver_before_any_trial(cluster, dataset, tmp_path, capsys):
    overrides = TINY + [f"data.dataset={dataset}"]
    # More concurrent trials than the 2-CPU cluster holds with their decoding.
    space = load_space(_space(tmp_path, concurrency=2), overrides=overrides)
    with pytest.raises(InputError, match=r"2 trial workers x 0.5 CPUs leave 1 of the cluster's 2 CPUs, less than the "
                                         r"2.02 CPU\(s\) Ray Data needs beside the workers \(1 per trial\); .*\(now 2 trial"):
        tune_search(space, TuneOptions(output_dir=str(tmp_path / "cpu"), tracking_uri=sqlite_uri(tmp_path)))
    assert not (tmp_path / "mlflow.db").exists()  # nothing started: no parent run
    # A dataset without a val split reports no val metric; the CLI prints the error, no traceback.
    no_val = make_class_dataset(tmp_path / "noval", val_classes=0)
    assert main(["tune", "--space", str(SMOKE), "--set", *TINY, f"data.dataset={no_val}",
                 "--output-dir", str(tmp_path / "noval-search")]) == 2
    assert "no trial reports 'val/map@r'" in capsys.readouterr().err


def test_lambda_0_trial_trains_under_ddp(cluster, dataset, tmp_path, monkeypatch):
    # lambda = 0: no gradient reaches the uncertainty head, so DDP must allow unused parameters.
    space = _space(tmp_path, trials=1, objective="train/loss", scheduler={"name": "fifo"},
                   resources={"num_workers": 2, "cpus_per_worker": 0.25})
    monkeypatch.chdir(tmp_path)
    summary = tune_search(load_space(space, overrides=TINY + [f"data.dataset={dataset}", "train.epochs=1"]),
                          TuneOptions(output_dir=str(tmp_path / "ddp"), tracking_uri=sqlite_uri(tmp_path)))
    rows = {r["trial"]: r for r in summary["rows"]}
    assert rows[0]["lambda"] == 0.0 and rows[0]["status"] == "completed" and rows[0]["epochs"] == 1
    assert all(r["status"] == "completed" for r in rows.values())
