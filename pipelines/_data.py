"""Ray Data side of distributed training: the operators that turn a dataset's Parquet shards
(opened by ``idml.data.open_dataset``: a local folder or any pyarrow/fsspec URI such as ``s3://bucket/cub``;
the entry point resolves a built-in name first) into decoded, augmented, class-balanced batches.

Class balance while streaming
-----------------------------
Every training batch holds ``P = batch_size / images_per_class`` distinct classes with exactly
``m = images_per_class`` images each, like the local loop's ``MPerClassSampler``, without a
global shuffle (an all-to-all barrier) per epoch. The train pipeline is::

    read_shards               the manifest's shard files in a new random order each epoch
                              (columns id, image bytes, label)
      -> pack_rows            light tasks handing each block of rows to ONE long-lived packer
                              actor (created once per job, so no actor start-up per epoch):
                              per-class buckets of *encoded* images; once ``mix_classes * P``
                              classes have >= m images waiting it draws P of them at random
                              (weighted by how many images wait, so big buckets drain and memory
                              stays bounded) and m random images of each, and returns that batch
                              as ONE row. It knows the epoch's row count from the manifest, so
                              after the epoch's last row it flushes what is left, largest buckets
                              first.
      -> repartition          one block per batch row (streaming, no shuffle)
      -> decode_train_batch   parallel tasks: decode + augment every image of a batch row,
                              emitting it as one row of raw uint8 NCHW bytes
      -> streaming_split      (Ray Train) whole batch rows to each DDP worker, equal counts

Because a row *is* a batch, splitting among workers can never cut a batch or mix classes, and
``equal=True`` gives every worker the same number of steps (DDP needs that). The tail that
cannot form a full batch (a class's last < m images; classes without P - 1 partners at the
end) is dropped, as ``MPerClassSampler`` batches drop it. The buffer is small when shards are
class-contiguous, as the converters write them (about ``mix_classes * P`` classes in flight);
for data stored in random order it grows towards the whole split's encoded bytes. An epoch cut
short (``train.max_steps_per_epoch``, a worker failure) leaves its buffered rows for the next.

A corrupt image is a counted skip: its batch loses that image's class chunk (so every class
left still has m images) and the id travels with the batch to the worker, which counts it (a
batch whose every chunk had a bad image is dropped, with a warning only).
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from idml.data.images import InvalidImageError, decode_image
from idml.data.source import DatasetSource

log = logging.getLogger(__name__)

READ_ROWS = 1024  # rows per block read from a shard
MIX_CLASSES = 4  # wait for this many times P ready classes before drawing a batch

PACKED_SCHEMA = pa.schema([
    ("ids", pa.list_(pa.string())),
    ("images", pa.list_(pa.binary())),
    ("targets", pa.list_(pa.int64())),
])
BATCH_SCHEMA = pa.schema([
    ("images", pa.binary()),  # uint8 (n, 3, S, S), C order
    ("targets", pa.list_(pa.int64())),
    ("skipped_ids", pa.list_(pa.string())),
])


def class_chunk_counts(source: DatasetSource, split: str, images_per_class: int) -> list[int]:
    """Full m-image chunks each class of ``split`` can give per epoch."""
    per_class = source.split_info(split).get("images_per_class", {})
    return [n // images_per_class for n in per_class.values()]


def max_batches(chunks: list[int], classes_per_batch: int) -> int:
    """How many batches of ``classes_per_batch`` distinct classes the chunk counts allow at
    best (the packer's flush order reaches this bound when it sees everything at once)."""
    counts = sorted((c for c in chunks if c > 0), reverse=True)
    total = sum(counts)
    # b batches are possible iff no class must give more than b chunks: sum(min(c, b)) >= P * b.
    lo, hi = 0, total // max(classes_per_batch, 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in counts) >= classes_per_batch * mid:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ClassBalancedPacker:
    """Turns the stream of an epoch's ``(id, image, label)`` rows into class-balanced batch
    rows (runs as one Ray actor per job; see the module docstring)."""

    def __init__(self, *, expected_rows: int, batch_size: int, images_per_class: int,
                 label_to_target: dict[int, int], mix_classes: int = MIX_CLASSES, seed: int | None = None):
        if images_per_class < 1 or batch_size % images_per_class:
            raise ValueError(f"batch_size {batch_size} must be a multiple of images_per_class {images_per_class}")
        self.m = images_per_class
        self.p = batch_size // images_per_class
        if len(label_to_target) < self.p:
            raise ValueError(f"{len(label_to_target)} classes cannot fill batches of {self.p} distinct classes")
        self.window = min(len(label_to_target), max(self.p, mix_classes * self.p))
        self.expected_rows = expected_rows
        self.label_to_target = {int(k): int(v) for k, v in label_to_target.items()}
        self.rng = np.random.default_rng(seed)
        self._reset()

    def _reset(self) -> None:
        self.buckets: dict[int, list[tuple[str, bytes]]] = defaultdict(list)
        self.ready: set[int] = set()
        self.seen = 0

    def add(self, table: pa.Table) -> pa.Table:
        """Take a block of rows; return the batch rows that became complete (maybe none)."""
        return pa.concat_tables([PACKED_SCHEMA.empty_table(), *self._add(table)])

    def _add(self, table: pa.Table) -> Iterator[pa.Table]:
        ids = table.column("id").to_pylist()
        images = table.column("image").to_pylist()
        labels = table.column("label").to_pylist()
        for id_, image, label in zip(ids, images, labels):
            target = self.label_to_target.get(int(label))
            if target is None:
                raise ValueError(f"image {id_!r} has label {label}, which the manifest does not list for this split; "
                                 "the dataset is inconsistent, re-create it")
            bucket = self.buckets[target]
            bucket.append((id_, image))
            if len(bucket) >= self.m:
                self.ready.add(target)
        self.seen += len(ids)
        yield from self._emit(self.window, flush=False)
        if self.seen >= self.expected_rows:
            yield from self._emit(self.p, flush=True)
            self._reset()

    def _emit(self, min_ready: int, *, flush: bool) -> Iterator[pa.Table]:
        while len(self.ready) >= min_ready:
            ready = np.fromiter(self.ready, dtype=np.int64)
            waiting = np.array([len(self.buckets[t]) // self.m for t in ready], dtype=np.float64)
            if flush:
                # Largest buckets first maximises the batches left (ties broken at random).
                order = np.lexsort((self.rng.random(len(ready)), -waiting))
                classes = ready[order[: self.p]]
            else:
                classes = self.rng.choice(ready, size=self.p, replace=False, p=waiting / waiting.sum())
            batch_ids, batch_images, targets = [], [], []
            for target in classes.tolist():
                bucket = self.buckets[target]
                for i in sorted(self.rng.choice(len(bucket), size=self.m, replace=False).tolist(), reverse=True):
                    bucket[i], bucket[-1] = bucket[-1], bucket[i]  # O(1) removal
                    id_, image = bucket.pop()
                    batch_ids.append(id_)
                    batch_images.append(image)
                targets += [target] * self.m
                if len(bucket) < self.m:
                    self.ready.discard(target)
            yield pa.Table.from_pydict({"ids": [batch_ids], "images": [batch_images], "targets": [targets]},
                                       schema=PACKED_SCHEMA)


@functools.lru_cache(maxsize=4)
def _transform(kind: str, image_size: int):
    from idml.transforms import eval_transform, train_transform

    return (train_transform if kind == "train" else eval_transform)(image_size)


def read_shards(table: pa.Table, *, filesystem: pafs.FileSystem, columns: list[str]) -> Iterator[pa.Table]:
    """Read the Parquet shards named in ``table["path"]`` (a Ray Data task), a few row groups
    at a time, so memory stays bounded whatever the shard size."""
    import pyarrow.parquet as pq

    for path in table.column("path").to_pylist():
        with filesystem.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_ROWS, columns=columns):
                yield pa.Table.from_batches([batch])


def pack_rows(table: pa.Table, *, packer) -> pa.Table:
    """Hand a block to the packer actor (a Ray Data task; the actor keeps the state)."""
    import ray

    return ray.get(packer.add.remote(table))


def decode_train_batch(table: pa.Table, *, image_size: int) -> pa.Table:
    """Decode and augment each packed batch row into raw uint8 NCHW bytes (a Ray Data task)."""
    transform = _transform("train", image_size)
    out: dict[str, list] = {"images": [], "targets": [], "skipped_ids": []}
    for ids, images, targets in zip(table.column("ids").to_pylist(), table.column("images").to_pylist(),
                                    table.column("targets").to_pylist()):
        arrays, bad_classes, skipped = [], set(), []
        for id_, data, target in zip(ids, images, targets):
            try:
                arrays.append(transform(decode_image(data)).numpy())
            except InvalidImageError as e:
                log.warning("skipping undecodable training image %r (%s) and its class chunk in this batch", id_, e)
                arrays.append(None)
                bad_classes.add(target)
                skipped.append(id_)
        keep = [i for i, t in enumerate(targets) if t not in bad_classes]
        if not keep:  # every class chunk had a bad image: nothing left to train on
            log.warning("dropping a batch whose every class had an undecodable image: %s", skipped)
            continue
        out["images"].append(np.stack([arrays[i] for i in keep]).tobytes())
        out["targets"].append([targets[i] for i in keep])
        out["skipped_ids"].append(skipped)
    return pa.Table.from_pydict(out, schema=BATCH_SCHEMA)


def decode_eval_rows(table: pa.Table, *, image_size: int) -> dict[str, np.ndarray]:
    """Decode (no augmentation) a block of val/test rows; undecodable ones get ``valid=False``."""
    transform = _transform("eval", image_size)
    n = table.num_rows
    images = np.zeros((n, 3, image_size, image_size), dtype=np.uint8)
    valid = np.ones(n, dtype=bool)
    ids = table.column("id").to_pylist()
    for i, data in enumerate(table.column("image").to_pylist()):
        try:
            images[i] = transform(decode_image(data)).numpy()
        except InvalidImageError as e:
            log.warning("skipping undecodable evaluation image %r (%s)", ids[i], e)
            valid[i] = False
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    return {
        "image": images,
        "label": labels,
        "domain": np.asarray(table.column("domain").to_pylist(), dtype=object),
        "id": np.asarray(ids, dtype=object),
        "valid": valid,
    }


def train_dataset(source: DatasetSource, cfg, *, decode_cpus: float = 1.0):
    """The lazily executed train pipeline (re-executed, with fresh randomness, each epoch).
    Creates the packer actor: call it from the job's driver."""
    import ray
    import ray.data
    from ray.data import RandomSeedConfig

    split, t = cfg.data.train_split, cfg.train
    # Shard paths come from the manifest, so no listing: ``read_parquet`` lists and inspects the
    # files on every execution, which delays each epoch's first batch (README, "Measured").
    paths = source.paths(split)
    ds = ray.data.from_items([{"path": path} for path in paths], override_num_blocks=len(paths))
    ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=t.seed, reseed_after_execution=True))
    ds = ds.map_batches(read_shards, batch_format="pyarrow", batch_size=1, num_cpus=0.25,
                        fn_kwargs={"filesystem": source.filesystem, "columns": ["id", "image", "label"]})
    packer = ray.remote(ClassBalancedPacker).options(
        num_cpus=0,  # bookkeeping of encoded bytes: no CPU reservation of its own
        max_restarts=-1, max_task_retries=3,  # a lost packer restarts empty; the epoch goes on
    ).remote(expected_rows=source.num_images(split), batch_size=t.batch_size, images_per_class=t.images_per_class,
             label_to_target=source.label_to_target(split), seed=t.seed)
    # One task at a time (the actor packs sequentially anyway), so this light step keeps one
    # process; and its own compute strategy keeps Ray Data from fusing it with decoding, so
    # batches are decoded in parallel whatever the block layout.
    ds = ds.map_batches(pack_rows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                        num_cpus=0.25, compute=ray.data.TaskPoolStrategy(size=1), fn_kwargs={"packer": packer})
    # One block per batch row (a streaming split of blocks, no shuffle): the packer hands back
    # many batches at once, and each must reach its own decode task and then the trainer as soon
    # as it is ready, not once a whole block of them is decoded.
    ds = ds.repartition(target_num_rows_per_block=1)
    return ds.map_batches(decode_train_batch, batch_format="pyarrow", batch_size=1, num_cpus=decode_cpus,
                          fn_kwargs={"image_size": cfg.data.image_size})


def _decoded_for_eval(source: DatasetSource, splits: list[str], cfg, decode_cpus: float):
    import ray.data

    paths = [path for split in splits for path in source.paths(split)]
    ds = ray.data.read_parquet(paths, filesystem=source.filesystem).select_columns(["id", "image", "label", "domain"])
    return ds.map_batches(decode_eval_rows, batch_format="pyarrow", batch_size=cfg.eval.batch_size,
                          num_cpus=decode_cpus, fn_kwargs={"image_size": cfg.data.image_size})


def distractor_dataset(source: DatasetSource, cfg, *, decode_cpus: float = 1.0):
    """The training split through the evaluation transform, executed only when read: the
    confidence's fit at the end of a run searches validation among these (``idml.training.loop``)."""
    return _decoded_for_eval(source, [cfg.data.train_split], cfg, decode_cpus)


def eval_datasets(source: DatasetSource, splits: list[str], cfg, *, decode_cpus: float = 1.0) -> list:
    """The val/test ``splits`` decoded (no augmentation) and materialized in the object store,
    in file order, all in ONE Ray Data job (each job has a fixed start-up cost): evaluation
    passes then only read ready tensors. Undecodable images stay as ``valid=False`` rows, so
    each split keeps its manifest row count."""
    ds = _decoded_for_eval(source, splits, cfg, decode_cpus)
    ds.context.execution_options.preserve_order = True  # the splits must come out in order
    ds = ds.materialize()
    counts = np.cumsum([source.num_images(split) for split in splits])
    if ds.count() != counts[-1]:
        raise ValueError(f"{source.uri}: splits {splits} hold {ds.count()} rows but the manifest says {counts[-1]}; "
                         "the dataset is inconsistent, re-create it (idml data inspect --verify tells more)")
    return ds.split_at_indices(counts[:-1].tolist()) if len(splits) > 1 else [ds]
