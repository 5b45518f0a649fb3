"""Scheduled re-indexing: `idml index update` runs that overlap (a cron or CronJob firing while
the previous run still works) on the same index folder, as real processes. One publishes; one
started without --wait refuses at once with its own exit code; one with --wait waits, then
finds nothing left to do. Never a broken or a duplicate version."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import build_in_process, make_checkpoint, make_image_folder, shape_image

from idml.index import IndexStore
from pipelines.index import DELAY_ENV
from pipelines.index_cli import INDEX_BUSY, UP_TO_DATE, main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local(ray_connected):
    """The session's shared cluster (tests/conftest.py), this process connected to it."""
    return ray_connected


@pytest.mark.slow
def test_overlapping_updates_publish_one_sound_version(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = make_checkpoint(tmp_path / "ckpt.pt")
    folder = Path(make_image_folder(tmp_path / "imgs", 12))
    idx = tmp_path / "idx"
    # The published version the scheduled runs update: built in-process (the library's build
    # workflow the CLI runs; no Ray Data job to start for the set-up).
    assert build_in_process(idx, str(folder), checkpoint)["version"] == "v000001"

    # The corpus changes; then three scheduled runs overlap.
    (folder / "group0" / "pic-00.png").write_bytes(shape_image(900))
    (folder / "group1" / "new.png").write_bytes(shape_image(901))
    update = [sys.executable, "-m", "pipelines.index_cli", "update", "--index-dir", str(idx), "--threads", "1",
              "--actors", "1", "--batch-size", "1", "--no-mlflow"]
    # Every run joins the test's cluster, as scheduled runs join the cluster they are sent to.
    env = {**os.environ, "RAY_ADDRESS": ray_local.address, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO)}
    log = tmp_path / "first.log"
    # The first run embeds slowly (10 s a batch), so it still holds the index while the others start.
    first = subprocess.Popen(update, cwd=tmp_path, env={**env, DELAY_ENV: "10"}, stdout=open(log, "w"),
                             stderr=subprocess.STDOUT)
    third = None
    try:
        deadline = time.time() + 180
        while f"idml index update (pid {first.pid}" not in ((idx / ".lock").read_text() if (idx / ".lock").exists() else ""):
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the first update never took the index lock"
            time.sleep(0.2)

        second = subprocess.run(update, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first update finished before the second one started: the overlap was not tested"
        assert second.returncode == INDEX_BUSY, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "another writer holds" in lines[0] and f"(pid {first.pid}" in lines[0]

        third = subprocess.Popen(update + ["--wait", "600"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        assert first.wait(timeout=600) == 0, log.read_text()[-3000:]
        out, _ = third.communicate(timeout=600)
        # It waited for the first, then found the corpus already indexed: nothing published.
        assert third.returncode == UP_TO_DATE, out[-3000:]
        assert "unchanged (up to date)" in out
    finally:
        for proc in (first, third):
            if proc is not None and proc.poll() is None:
                proc.kill()

    store = IndexStore(idx)
    assert store.versions() == ["v000001", "v000002"] and store.current_version() == "v000002"
    counts = store.read_manifest()["counts"]
    assert (counts["changed"], counts["added"], counts["vectors"]) == (1, 1, 13)
    assert not (idx / "staging").exists()
    assert main(["verify", "--index-dir", str(idx), "--corpus"]) == 0


@pytest.mark.slow
def test_the_documented_job_submit_recipe_treats_nothing_changed_as_success(shared_ray, tmp_path):
    """docs/indexing.md's cron entrypoint through a real job server (the session's shared
    cluster's): `ray job submit` fails any job that exits non-zero, so the recipe maps 3 (nothing
    changed) and 4 (busy) to success."""
    checkpoint = make_checkpoint(tmp_path / "ckpt.pt")
    folder = make_image_folder(tmp_path / "imgs", 6)
    idx = tmp_path / "idx"
    cluster = shared_ray

    def submit(entrypoint: list[str]) -> subprocess.CompletedProcess:
        cmd = [str(REPO / ".venv/bin/ray"), "job", "submit", "--address", cluster.dashboard_url, "--", *entrypoint]
        deadline = time.time() + 120
        while True:
            job = subprocess.run(cmd, env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
            # A fresh head's job agent takes a moment to register; the job server says so.
            if "No available agent" not in job.stderr or time.time() > deadline:
                return job
            time.sleep(2)

    index_cli = f"{sys.executable} -m pipelines.index_cli"
    build = submit([*index_cli.split(), "build", "--index-dir", str(idx), "--checkpoint", checkpoint,
                    "--corpus", folder, "--threads", "1", "--no-mlflow"])
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-2000:]
    recipe = (f"{index_cli} update --index-dir {idx} --threads 1 --no-mlflow; rc=$?; "
              "case $rc in 3|4) exit 0;; esac; exit $rc")
    update = submit(["bash", "-c", recipe])
    assert update.returncode == 0, update.stdout[-3000:] + update.stderr[-2000:]
    assert "exit 3: nothing published" in update.stdout and "succeeded" in update.stdout
    assert IndexStore(idx).versions() == ["v000001"]
