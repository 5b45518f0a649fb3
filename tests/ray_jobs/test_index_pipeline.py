"""End to end: `idml index build|update|query|verify` on the session's shared Ray cluster, real faiss
and MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from support import make_checkpoint, make_image_folder, make_index_dataset, shape_image

from idml.index import IndexStore
from pipelines.index import DELAY_ENV, actor_pool, parse_actors
from pipelines.index_cli import UP_TO_DATE, main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts under the working folder


@pytest.fixture(scope="module")
def ray_local(ray_connected):
    """The session's shared cluster (tests/conftest.py), this process connected to it."""
    return ray_connected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("index-pipeline")
    return {
        "root": root,
        "checkpoint": make_checkpoint(root / "ckpt.pt"),
        "dataset": make_index_dataset(root / "ds", 40, corrupt=(3,)),
        "uri": f"sqlite:///{root / 'mlflow.db'}",
    }


@pytest.fixture(scope="module")
def built(ray_local, tiny, tmp_path_factory):
    """The dataset indexed once (v000001), shared by the tests that read it."""
    index_dir = tiny["root"] / "index"
    cwd = os.getcwd()
    os.chdir(tiny["root"])  # MLflow puts artifacts under the working folder
    try:
        rc = main(["build", "--index-dir", str(index_dir), "--checkpoint", tiny["checkpoint"], "--corpus", tiny["dataset"],
                   "--shards", "3", "--batch-size", "8", "--threads", "1", "--tracking-uri", tiny["uri"], "--experiment", "index-test"])
    finally:
        os.chdir(cwd)
    assert rc == 0
    return index_dir


def _runs(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_build_writes_a_published_version_and_logs_mlflow(built, tiny, capsys):
    store = IndexStore(built)
    manifest = store.read_manifest()
    assert store.current_version() == manifest["version"] == "v000001"
    assert manifest["counts"]["vectors"] == 39 and manifest["counts"]["shards"] == 3
    assert [c["id"] for c in manifest["corrupt"]] == ["img-003"]  # counted and skipped
    assert manifest["checkpoint"]["sha256"] and manifest["faiss"]["factory"] == "IDMap,Flat"
    rows = sum(pq.read_metadata(store.version_dir("v000001") / s["embeddings"]).num_rows for s in manifest["shards"])
    assert rows == 39
    assert set(pq.read_schema(store.version_dir("v000001") / manifest["shards"][0]["embeddings"]).names) >= {
        "id", "content_hash", "mu", "sigma", "uncertainty"}

    client, runs = _runs(tiny["uri"], "index-test")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["checkpoint"] == tiny["checkpoint"] and run.data.params["corpus"] == tiny["dataset"]
    assert run.data.params["index.index_type"] == "auto"
    m = run.data.metrics
    assert m["images_embedded"] == 39 and m["corrupt_images"] == 1 and m["recall_at_10"] == 1.0
    assert m["embed_images_per_s"] > 0 and m["build_seconds"] > 0 and m["index_bytes"] > 0
    assert [a.path for a in client.list_artifacts(run.info.run_id, "index")] == ["index/manifest.json"]

    assert main(["verify", "--index-dir", str(built)]) == 0
    assert "OK" in capsys.readouterr().out


def test_query_by_id_and_by_image_with_rerank(built, tiny, tmp_path, capsys):
    out = tmp_path / "q.json"
    assert main(["query", "--index-dir", str(built), "--ids", "img-000", "--k", "5", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "img-000" in table and "uncertainty" in table
    res = json.loads(out.read_text())["results"][0]
    assert len(res["hits"]) == 5 and all(h["id"] != "img-000" for h in res["hits"])
    cos = [h["cosine"] for h in res["hits"]]
    assert cos == sorted(cos, reverse=True) and res["uncertainty"] > 0
    assert all(h["uncertainty"] > 0 for h in res["hits"])

    image = tmp_path / "query.png"
    image.write_bytes(shape_image(10))  # the content of img-010
    assert main(["query", "--index-dir", str(built), "--images", str(image), "--k", "3", "--rerank",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"][0]
    assert res["hits"][0]["id"] == "img-010" and res["hits"][0]["cosine"] > 0.999
    sims = [h["similarity"] for h in res["hits"]]
    assert sims == sorted(sims, reverse=True)

    assert main(["query", "--index-dir", str(built), "--ids", "no-such-id"]) == 2
    assert "not in index" in capsys.readouterr().err
    # this index's model carries no confidence (made without a validation split): nothing to abstain by
    assert main(["query", "--index-dir", str(built), "--ids", "img-000", "--min-confidence", "0.5"]) == 2
    assert "has no confidence to abstain by" in capsys.readouterr().err


def test_update_embeds_only_new_and_changed_and_drops_removed(built, tiny, tmp_path_factory, capsys):
    # Work on a copy so the other tests keep reading v000001 of the shared index.
    import shutil

    index_dir = tmp_path_factory.mktemp("upd") / "index"
    shutil.copytree(built, index_dir)
    make_index_dataset(Path(tiny["dataset"]), 40, corrupt=(3,), changed={5: 999}, drop=(7, 8), extra=4)
    try:
        assert main(["update", "--index-dir", str(index_dir), "--threads", "1", "--tracking-uri", tiny["uri"], "--experiment", "index-upd"]) == 0
        store = IndexStore(index_dir)
        m = store.read_manifest()
        assert m["version"] == "v000002" and m["parent"] == "v000001"
        c = m["counts"]
        assert (c["added"], c["changed"], c["removed"], c["vectors"], c["corrupt"]) == (4, 1, 2, 41, 1)
        assert m["metrics"]["images_embedded"] == 5  # 4 new + 1 changed, nothing else re-embedded
        assert main(["verify", "--index-dir", str(index_dir), "--corpus"]) == 0
        # Every image's file and its stats are recorded for the next update's comparison.
        record = pq.read_table(store.version_dir("v000002") / "corpus.parquet")
        assert record.num_rows == 42 and min(record.column("size").to_pylist()) > 0
        assert all(f.endswith(".parquet") and not f.startswith("/") for f in record.column("file").to_pylist())

        def embeddings(version):
            vdir = store.version_dir(version)
            tables = [pq.read_table(vdir / s["embeddings"]).to_pandas() for s in store.read_manifest(version)["shards"]]
            import pandas as pd

            return pd.concat(tables).set_index("id")

        old, new = embeddings("v000001"), embeddings("v000002")
        assert not {"img-007", "img-008"} & set(new.index)
        assert np.array_equal(np.stack(old.loc["img-000", "mu"]), np.stack(new.loc["img-000", "mu"]))  # reused as is
        assert old.loc["img-005", "content_hash"] != new.loc["img-005", "content_hash"]

        image = tmp_path_factory.mktemp("q") / "changed.png"
        image.write_bytes(shape_image(999))
        out = image.with_suffix(".json")
        assert main(["query", "--index-dir", str(index_dir), "--images", str(image), "--k", "1", "--json", str(out)]) == 0
        assert json.loads(out.read_text())["results"][0]["hits"][0]["id"] == "img-005"

        _, runs = _runs(tiny["uri"], "index-upd")
        assert len(runs) == 1 and runs[0].data.metrics["images_embedded"] == 5

        # A scheduled rerun with nothing changed: its own exit code, no new version.
        capsys.readouterr()
        assert main(["update", "--index-dir", str(index_dir), "--threads", "1", "--no-mlflow"]) == UP_TO_DATE
        assert "exit 3: nothing published" in capsys.readouterr().out and store.versions() == ["v000001", "v000002"]
    finally:
        make_index_dataset(Path(tiny["dataset"]), 40, corrupt=(3,))


def test_killed_build_publishes_nothing_and_the_rerun_resumes(ray_local, tiny, tmp_path, capsys):
    index_dir = tmp_path / "index"
    args = ["build", "--index-dir", str(index_dir), "--checkpoint", tiny["checkpoint"], "--corpus", tiny["dataset"],
            "--shards", "4", "--batch-size", "2", "--actors", "1", "--threads", "1", "--tracking-uri", tiny["uri"], "--experiment", "index-crash"]
    # The child joins this test's Ray cluster (RAY_ADDRESS, no second start-up) and embeds slowly.
    env = {**os.environ, DELAY_ENV: "0.5", "RAY_ADDRESS": ray_local.address, "RAY_AUTH_MODE": "token",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.index_cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Generous: the child starts a Ray Data job first, which took over 120 s on a loaded 2-core machine.
        deadline = time.time() + 300
        while not list(index_dir.glob("staging/*/work/partitions/part-00000.json")):
            assert proc.poll() is None, "the build ended before its first partition finished"
            assert time.time() < deadline, "no partition finished in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = IndexStore(index_dir)
    assert store.current_version() is None and store.versions() == []  # nothing half-written published
    markers = [json.loads(p.read_text()) for p in index_dir.glob("staging/*/work/partitions/part-*.json")]
    finished_rows = sum(m["rows"] for m in markers)
    assert 0 < finished_rows + sum(len(m["corrupt"]) for m in markers) < 40

    capsys.readouterr()
    assert main(args) == 0
    m = store.read_manifest()
    assert m["version"] == "v000001" and m["counts"]["vectors"] == 39 and m["counts"]["corrupt"] == 1
    # Only what the killed run had not finished was embedded again, and the summary says so.
    assert m["metrics"]["images_embedded"] == 39 - finished_rows and m["counts"]["resumed"] == finished_rows
    assert f"reused {finished_rows} ({finished_rows} from the interrupted run)" in capsys.readouterr().out
    assert main(["verify", "--index-dir", str(index_dir)]) == 0
    _, runs = _runs(tiny["uri"], "index-crash")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the rerun finished the killed run's MLflow run


def test_raw_image_folder_counts_corrupt_files(ray_local, tmp_path, tiny):
    folder = Path(make_image_folder(tmp_path / "imgs", 12, corrupt=(5,)))
    index_dir = tmp_path / "index"
    assert main(["build", "--index-dir", str(index_dir), "--checkpoint", tiny["checkpoint"], "--corpus", f"file://{folder}",
                 "--threads", "1", "--actors", "1-2", "--no-mlflow"]) == 0
    m = IndexStore(index_dir).read_manifest()
    # An autoscaling pool of 1 to 2 actors did the work; the model reached them through the object store.
    assert m["embedding"]["actors"].startswith("1-2 actor(s)") and m["embedding"]["model_via"] == "ray object store"
    assert sum(m["embedding"]["rows_by_node"].values()) == 12
    record = pq.read_table(IndexStore(index_dir).version_dir("v000001") / "corpus.parquet").to_pylist()
    assert sorted(r["file"] for r in record) == sorted(r["id"] for r in record) and min(r["size"] for r in record) > 0
    assert m["counts"]["vectors"] == 11 and m["counts"]["corpus_images"] == 12  # notes.txt is not an image
    assert [c["id"] for c in m["corrupt"]] == ["group1/pic-05.png"]
    assert main(["query", "--index-dir", str(index_dir), "--ids", "group0/pic-00.png", "--k", "2"]) == 0


def test_cli_forwards_to_the_pipeline(tmp_path, capsys):
    from pipelines.cli import main as idml_main

    assert idml_main(["index", "verify", "--index-dir", str(tmp_path / "none")]) == 1
    assert "nothing published" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        idml_main(["index", "--help"])
    assert "build" in capsys.readouterr().out


def test_actor_pool_leaves_room_for_reads_and_autoscales_between_min_and_max():
    pool = actor_pool(2, 0)
    assert (pool.min_actors, pool.max_actors, pool.num_cpus, pool.num_gpus, pool.threads) == (1, 1, 1, 0, 2)
    one_thread = actor_pool(2, 0, threads=1)  # two actors, one CPU between them
    assert one_thread.max_actors == 2 and one_thread.max_actors * one_thread.num_cpus <= 1
    big = actor_pool(16, 0)
    assert big.max_actors == 4 and big.max_actors * big.num_cpus <= 15
    assert actor_pool(16, 2) == actor_pool(16, 0, use_gpu=True, actors=(2, 2))
    gpu = actor_pool(16, 0, use_gpu=True)  # no GPU node yet: one GPU actor, for the autoscaler to place
    assert (gpu.min_actors, gpu.max_actors, gpu.num_gpus) == (1, 1, 1)
    scaling = actor_pool(16, 0, actors=(1, 8), threads=2)
    strategy = scaling.strategy()
    assert (strategy.min_size, strategy.max_size) == (1, 8) and scaling.describe() == "1-8 actor(s), 1.875 CPU, 2 threads each"
    assert parse_actors("3") == (3, 3) and parse_actors("1-8") == (1, 8) and parse_actors("0") == (0, 0)
    for bad in ("8-1", "x", "0-4", "-2"):
        with pytest.raises(ValueError, match="--actors"):
            parse_actors(bad)
