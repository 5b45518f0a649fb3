"""Shared fixtures: a tiny learnable image dataset in the project's format, and a config that
trains on it in seconds on a CPU."""

from __future__ import annotations

import os

import pytest
from support import make_class_dataset


@pytest.fixture(scope="session", autouse=True)
def _mlflow_in_a_temp_folder(tmp_path_factory):
    """Local `idml train` runs log to MLflow: into one throwaway database, never the checkout's."""
    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    # Classes 0-3 train, 4-5 val (carved from the training classes), 6-11 test; domains a and b.
    return make_class_dataset(tmp_path_factory.mktemp("data") / "tiny", train_classes=4, val_classes=2,
                              test_classes=6, per_class=4)


TINY_OVERRIDES = [
    "model.backbone=resnet18", "model.pretrained=false", "model.embedding_dim=32",
    "data.image_size=32", "train.batch_size=8", "train.images_per_class=2", "train.epochs=2",
    "train.warmup_epochs=1", "train.lr=1e-3", "eval.batch_size=16", "eval.recall_ks=[1,2]",
]


@pytest.fixture
def tiny_overrides(tiny_dataset, tmp_path):
    """``section.key=value`` overrides for a seconds-long run on ``tiny_dataset``."""
    return TINY_OVERRIDES + [f"data.dataset={tiny_dataset}", f"output_dir={tmp_path / 'run'}"]


@pytest.fixture
def tiny_config(tiny_overrides):
    from idml.config import load_config

    return load_config(overrides=tiny_overrides)


@pytest.fixture(scope="session")
def shared_ray(tmp_path_factory):
    """One Ray cluster for the whole session (``ray_jobs.ray_helpers.shared_cluster``): the Ray
    tests that need no cluster of their own connect to it (``ray_connected``) or hand its
    address to the commands they run, instead of each starting Ray."""
    from ray_jobs.ray_helpers import shared_cluster

    yield from shared_cluster(tmp_path_factory)


@pytest.fixture(scope="module")
def ray_connected(shared_ray):
    """This process connected to the shared cluster for one test module, disconnected after it."""
    from ray_jobs.ray_helpers import connected

    yield from connected(shared_ray)
