"""The Ray Data side of distributed training: class-balanced batches while streaming, corrupt
images as counted skips, datasets behind URIs, and errors before any worker starts."""

from __future__ import annotations

import collections
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ray_jobs.ray_helpers import TINY
from support import make_class_dataset

from idml.config import load_config
from idml.data import open_dataset
from pipelines._data import ClassBalancedPacker, eval_datasets, max_batches, train_dataset
from pipelines._worker_data import StreamedSplit, iter_train_batches


@pytest.fixture(scope="module")
def cluster(ray_connected):
    """The session's shared cluster (tests/conftest.py), this process connected to it."""
    return ray_connected


def rows(labels, start=0):
    return pa.table({"id": [f"r{start + i}" for i in range(len(labels))], "image": [b"x"] * len(labels),
                     "label": pa.array(labels, pa.int32())})


def assert_balanced(targets, classes_per_batch, m):
    counts = collections.Counter(targets)
    assert len(counts) == classes_per_batch and set(counts.values()) == {m}, counts
    # chunks are contiguous, as in MPerClassSampler batches
    assert [t for t in targets[::m] for _ in range(m)] == list(targets)


@pytest.mark.parametrize("layout", ["class-contiguous", "random"])
def test_packer_emits_only_balanced_batches_and_flushes_the_epoch(layout):
    rng = np.random.default_rng(0)
    sizes = rng.integers(3, 30, size=40)  # uneven classes, some smaller than one chunk
    labels = np.repeat(np.arange(40) + 100, sizes)  # dataset labels, not targets
    if layout == "random":
        labels = rng.permutation(labels)
    packer = ClassBalancedPacker(expected_rows=len(labels), batch_size=16, images_per_class=4,
                                 label_to_target={100 + c: c for c in range(40)}, seed=1)
    batches = []
    for epoch in range(2):  # the packer resets after each epoch's last row
        out = [packer.add(rows(block.tolist(), start)) for start, block in
               zip(range(0, len(labels), 50), np.array_split(labels, range(50, len(labels), 50)))]
        batches.append(pa.concat_tables(out).to_pylist())
    for epoch_batches in batches:
        ids = [i for b in epoch_batches for i in b["ids"]]
        assert len(ids) == len(set(ids))  # no image twice in an epoch
        for b in epoch_batches:
            assert_balanced(b["targets"], 4, 4)
        # the dropped tail is small: at most a few chunks short of the best possible
        assert len(epoch_batches) >= max_batches([s // 4 for s in sizes], 4) - 2
    assert batches[0] != batches[1]  # a new draw every epoch


def test_max_batches():
    assert max_batches([1] * 8, 2) == 4
    assert max_batches([10, 1, 1], 2) == 2  # one big class cannot pair with itself
    assert max_batches([3, 3, 3], 3) == 3
    assert max_batches([5], 2) == 0


def test_streamed_batches_are_class_balanced_for_each_worker(cluster, tmp_path):
    # 12 classes x 10 images in several shards: chunks of 4 leave a tail of 2 per class.
    root = make_class_dataset(tmp_path / "data", train_classes=12, per_class=10, shard_bytes=8000)
    cfg = load_config(overrides=TINY + [f"data.dataset={root}", "train.batch_size=12", "train.images_per_class=4"])
    source = open_dataset(root)
    assert len(source.paths("train")) > 1
    consumers = train_dataset(source, cfg).streaming_split(2, equal=True)

    def consume(iterator, out):
        for _ in range(2):  # two epochs
            epoch = []
            for images, targets in iter_train_batches(iterator, 32, []):
                assert images.shape == (12, 3, 32, 32) and str(images.dtype) == "torch.uint8"
                epoch.append(targets.tolist())
            out.append(epoch)

    results = [[], []]
    threads = [threading.Thread(target=consume, args=(it, out)) for it, out in zip(consumers, results)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(len(r) == 2 for r in results)
    for epoch in range(2):
        per_worker = [r[epoch] for r in results]
        assert len(per_worker[0]) == len(per_worker[1]) > 0  # equal steps for DDP
        for targets in per_worker[0] + per_worker[1]:
            assert_balanced(targets, 3, 4)
        # 24 full chunks -> 8 batches of 3 classes, none lost to packing here
        assert len(per_worker[0]) + len(per_worker[1]) == 8


def test_corrupt_images_are_counted_skips(cluster, tmp_path):
    root = make_class_dataset(tmp_path / "data", corrupt=("3/5", "12/1"))  # a train and a test image
    cfg = load_config(overrides=TINY + [f"data.dataset={root}"])
    source = open_dataset(root)
    skipped, batches = [], []
    for images, targets in iter_train_batches(train_dataset(source, cfg).iterator(), 32, skipped):
        batches.append(targets.tolist())
    assert skipped == ["3/5"]
    # its batch lost class 3's chunk; every class left still has 4 images
    assert sum(len(b) for b in batches) == 64 - 4
    assert sorted(len(b) for b in batches) == [4] + [8] * 7
    for b in batches:
        assert set(collections.Counter(b).values()) == {4}

    val, test = eval_datasets(source, ["val", "test"], cfg)
    assert val.count() == 16 and test.count() == 32
    split = StreamedSplit(test.iterator(), source, "test", 8)
    assert len(list(split)) == 31
    assert split.skipped == ["12/1"] and len(split.labels) == 31 and len(split.domains) == 31
    picture = split.image(3)
    assert picture.size == (32, 32) and split.ids[3] == "10/3"


def test_dataset_behind_a_uri(cluster, tmp_path):
    root = make_class_dataset(tmp_path / "data")
    source = open_dataset(Path(root).as_uri())  # file:///...: the pyarrow filesystem path
    assert source.num_images("train") == 64 and source.label_to_target("train") == {i: i for i in range(8)}
    cfg = load_config(overrides=TINY + [f"data.dataset={Path(root).as_uri()}"])
    assert sum(len(t) for _, t in iter_train_batches(train_dataset(source, cfg).iterator(), 32, [])) == 64
