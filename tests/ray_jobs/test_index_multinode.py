"""A cluster of two nodes on one machine (`ray start --head` with no CPU for work, and a second
node that does all of it), indexing with storage in a shared temp folder. The checkpoint is an
MLflow model (`models:/NAME@alias`) whose only copy is in a folder of the driver's: the driver
downloads it, loads it, deletes the download, and the actors on the other node get the weights
through Ray's object store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_jobs.ray_helpers import RayCluster, connect
from support import make_checkpoint, make_index_dataset, shape_image

from idml.index import IndexStore
from pipelines.index_cli import main


@pytest.fixture
def registered_model(tmp_path, monkeypatch):
    """``models:/tiny-idml@champion`` in an MLflow store only the driver reads; the checkpoint
    file it was logged from is gone."""
    from idml.registry import log_model, set_alias
    from idml.tracking import MlflowRun

    driver_only = tmp_path / "driver-only"
    uri = f"sqlite:///{driver_only / 'mlflow.db'}"
    monkeypatch.chdir(driver_only.parent)
    driver_only.mkdir()
    checkpoint = Path(make_checkpoint(driver_only / "best.pt"))
    run = MlflowRun.open(uri, "train", "train-1")
    log_model(uri, run.run_id, checkpoint, example_images=[shape_image(1)], registered_name="tiny-idml")
    run.finish()
    set_alias("tiny-idml", "champion", 1, uri=uri)
    checkpoint.unlink()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return run.run_id


@pytest.mark.slow
def test_two_node_build_gets_the_model_through_the_object_store(tmp_path, registered_model):
    shared = tmp_path / "shared"  # the "network storage" both nodes see
    corpus = make_index_dataset(shared / "corpus", 24)
    cluster = RayCluster(tmp_path / "ray", cpus=0)  # the default token file, which connect() reads too
    disconnect = None
    try:
        cluster.add_node(cpus=2)
        disconnect = connect(cluster)
        import ray

        head = ray.get_runtime_context().get_node_id()  # the driver's node: no CPU for tasks or actors
        idx = shared / "index"
        assert main(["build", "--index-dir", str(idx), "--checkpoint", "models:/tiny-idml@champion", "--corpus", corpus,
                     "--shards", "2", "--batch-size", "4", "--threads", "1", "--actors", "1-2", "--no-mlflow"]) == 0
        manifest = IndexStore(idx).read_manifest()
        nodes = manifest["embedding"]["rows_by_node"]
        assert sum(nodes.values()) == 24 and head not in nodes and len(nodes) == 1  # all embedded on the second node
        assert manifest["embedding"]["model_via"] == "ray object store"

        # From a hit back to the training run: the model as given, its registered version and run.
        ckpt = manifest["checkpoint"]
        assert ckpt["path"] == "models:/tiny-idml@champion"
        assert ckpt["model"] == {"model_uri": "models:/tiny-idml@champion", "registered_model": "tiny-idml",
                                 "alias": "champion", "version": "1", "run_id": registered_model}

        # Queries resolve the same URI (no file of the build needed).
        image = tmp_path / "q.png"
        image.write_bytes(shape_image(7))  # the content of img-007
        out = tmp_path / "q.json"
        assert main(["query", "--index-dir", str(idx), "--images", str(image), "--k", "1", "--json", str(out)]) == 0
        assert json.loads(out.read_text())["results"][0]["hits"][0]["id"] == "img-007"
        assert main(["verify", "--index-dir", str(idx)]) == 0
    finally:
        if disconnect is not None:
            disconnect()
        cluster.stop()
