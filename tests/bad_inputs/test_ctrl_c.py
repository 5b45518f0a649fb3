"""Ctrl-C stops a long-running command within seconds: exit 130 and one line, no traceback.
Here ``idml eval`` and ``idml index build`` (Ray); the others have theirs beside their other
tests: a local ``idml train`` in test_train_inputs.py, ``idml train --ray`` in
ray_jobs/test_train_pipeline.py, ``idml tune`` in ray_jobs/test_tune.py, ``idml serve`` in
ray_jobs/test_serve.py (its fixture stops the service with Ctrl-C). Each prints its seconds."""

from __future__ import annotations

import sys

import pytest

from interrupt import ctrl_c_when
from ray_jobs.ray_helpers import REPO, env_without_ray_address
from support import make_checkpoint, make_class_dataset, make_index_dataset

# Seconds from the SIGINT to the exit. A command that started a local Ray instance shuts it down
# on the way out (most of its time on a busy machine); the stop line itself comes within a second.
LOCAL_S = 15
WITH_RAY_S = 45


def _env(tmp_path, **extra) -> dict[str, str]:
    return {**env_without_ray_address(), "PYTHONPATH": str(REPO),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **extra}


def test_ctrl_c_stops_eval(tmp_path):
    dataset = make_class_dataset(tmp_path / "data", train_classes=2, val_classes=0, test_classes=10, per_class=24)
    checkpoint = make_checkpoint(tmp_path / "ck.pt")
    stopped = ctrl_c_when([sys.executable, "-m", "pipelines.cli", "eval", "--checkpoint", checkpoint,
                           "--set", f"data.dataset={dataset}", "eval.batch_size=8"],
                          "embed", log=tmp_path / "eval.log", cwd=tmp_path, env=_env(tmp_path))
    assert stopped.assert_clean(within_s=LOCAL_S) == "idml: stopped (Ctrl-C)"
    print(f"idml eval stopped {stopped.seconds:.1f} s after Ctrl-C")


@pytest.mark.slow
def test_ctrl_c_stops_an_index_build_and_marks_its_run_killed(tmp_path):
    from ray_jobs.ray_helpers import mlflow_runs

    corpus = make_index_dataset(tmp_path / "corpus", 40)
    checkpoint = make_checkpoint(tmp_path / "ck.pt")
    stopped = ctrl_c_when([sys.executable, "-m", "pipelines.cli", "index", "build", "--checkpoint", checkpoint,
                           "--corpus", corpus, "--index-dir", str(tmp_path / "idx")],
                          "embedding 4 file(s)", log=tmp_path / "build.log", cwd=tmp_path,
                          env=_env(tmp_path, IDML_INDEX_EMBED_DELAY_S="2"))
    assert stopped.assert_clean(within_s=WITH_RAY_S) == "idml: stopped (Ctrl-C)"
    # Nothing of Ray's on the way out: no core worker line about a shutdown worker, no actor restarts.
    assert "core_worker" not in stopped.output and "max_restarts" not in stopped.output, stopped.output[-3000:]
    _, runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "idml-index")
    assert [r.info.status for r in runs] == ["KILLED"]
    print(f"idml index build stopped {stopped.seconds:.1f} s after Ctrl-C")
