"""Embedding partitions: the resumable unit of a build, and the Parquet files shards are built from.

A partition is ``part-NNNNN.parquet`` (``embedding_schema``) plus ``part-NNNNN.json``, a marker
written after the Parquet file is complete (row count, checksum, the corrupt images met while
filling it). A partition counts as done only when its marker exists, so a killed run leaves at
most a ``.tmp`` file behind, which the next run deletes before continuing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from idml.files import file_sha256, write_json_atomic
from idml.metric import image_uncertainty

from .embed import STATUS_CORRUPT, STATUS_EMBEDDED
from .store import read_json

log = logging.getLogger(__name__)


# (id, content_hash): what identifies an image's content across runs and versions.
KEY_SCHEMA = pa.schema([("id", pa.string()), ("content_hash", pa.string())])
# What the embedding pass saw of each corpus image (``file``: where it was read, null if unknown).
LISTING_SCHEMA = pa.schema([("id", pa.string()), ("content_hash", pa.string()), ("status", pa.string()),
                            ("file", pa.string())])


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("mu", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("sigma", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("uncertainty", pa.float32(), nullable=False),
    ])


def _writer(path: Path, dim: int) -> pq.ParquetWriter:
    # Float vectors do not compress; ids and hashes do.
    return pq.ParquetWriter(path, embedding_schema(dim),
                            compression={"id": "ZSTD", "content_hash": "ZSTD", "mu": "NONE", "sigma": "NONE",
                                         "uncertainty": "NONE"})


def embedding_table(ids, hashes, mu: np.ndarray, sigma: np.ndarray) -> pa.Table:
    """Rows of ``embedding_schema``; the image uncertainty is ||sigma||^2 (idml.metric)."""
    mu = np.ascontiguousarray(mu, np.float32)
    sigma = np.ascontiguousarray(sigma, np.float32)
    dim = mu.shape[1]
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "content_hash": pa.array(hashes, pa.string()),
        "mu": pa.FixedSizeListArray.from_arrays(pa.array(mu.ravel()), dim),
        "sigma": pa.FixedSizeListArray.from_arrays(pa.array(sigma.ravel()), dim),
        "uncertainty": pa.array(image_uncertainty(sigma).astype(np.float32)),
    }, schema=embedding_schema(dim))


def vectors(table: pa.Table, column: str = "mu") -> np.ndarray:
    """A fixed-size-list column as an (n, dim) float32 array (one copy, chunk by chunk)."""
    col = table.column(column)
    out = np.empty((len(col), col.type.list_size), np.float32)
    start = 0
    for chunk in col.chunks:
        out[start:start + len(chunk)] = chunk.flatten().to_numpy(zero_copy_only=False).reshape(len(chunk), -1)
        start += len(chunk)
    return out


def read_vectors(path: str | os.PathLike, column: str = "mu") -> np.ndarray:
    return vectors(pq.read_table(path, columns=[column]), column)


def write_embeddings(path: Path, table: pa.Table) -> None:
    """Write an embedding table atomically (tmp file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    writer = _writer(tmp, table.schema.field("mu").type.list_size)
    writer.write_table(table, row_group_size=8192)
    writer.close()
    os.replace(tmp, path)


@dataclass
class Partition:
    index: int
    path: Path  # the Parquet file
    rows: int
    sha256: str
    bytes: int
    corrupt: list[dict[str, str]] = field(default_factory=list)

    def marker(self) -> dict[str, Any]:
        return {"rows": self.rows, "sha256": self.sha256, "bytes": self.bytes, "corrupt": self.corrupt}


def partition_paths(folder: Path, index: int) -> tuple[Path, Path]:
    return folder / f"part-{index:05d}.parquet", folder / f"part-{index:05d}.json"


def done_partitions(folder: Path) -> list[Partition]:
    """Finished partitions in ``folder``; leftovers of an interrupted run are deleted."""
    if not folder.is_dir():
        return []
    done = []
    for marker in sorted(folder.glob("part-*.json")):
        index = int(marker.stem.split("-")[1])
        path, _ = partition_paths(folder, index)
        info = read_json(marker)
        if not path.is_file():
            raise FileNotFoundError(f"{marker} marks a finished partition but {path} is missing; delete {folder} and rerun")
        done.append(Partition(index, path, info["rows"], info["sha256"], info["bytes"], info.get("corrupt", [])))
    finished = {p.path.name for p in done}
    for path in folder.iterdir():
        if path.suffix == ".tmp" or (path.suffix == ".parquet" and path.name not in finished):
            log.info("removing %s left by an interrupted run", path.name)
            path.unlink()
    return done


def known_rows(partitions: list[Partition]) -> pa.Table:
    """(id, content_hash) of every row the partitions hold, corrupt ones included."""
    tables = [pq.read_table(p.path, columns=["id", "content_hash"]) for p in partitions if p.rows]
    corrupt = [c for p in partitions for c in p.corrupt]
    tables.append(pa.table({"id": pa.array([c["id"] for c in corrupt], pa.string()),
                            "content_hash": pa.array([c["content_hash"] for c in corrupt], pa.string())}))
    return pa.concat_tables([t.select(["id", "content_hash"]).cast(KEY_SCHEMA) for t in tables]).combine_chunks()


class PartitionSink:
    """Routes embedder output (``idml.index.embed.OUTPUT_SCHEMA`` batches, in any order) into
    partitions of ``target_rows`` embedded images, finishing each as soon as it is full.

    It also lists every row it sees (id, content hash, status) for the version's bookkeeping.
    """

    def __init__(self, folder: Path, *, dim: int, target_rows: int, first_index: int = 0):
        if target_rows < 1:
            raise ValueError(f"target_rows must be >= 1, got {target_rows}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.target_rows = target_rows
        self.next_index = first_index
        self.finished: list[Partition] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0
        self._corrupt: list[dict[str, str]] = []
        self._listing: list[pa.Table] = []
        self.counts = {"embedded": 0, "corrupt": 0, "known": 0}

    def add(self, batch: pa.Table) -> None:
        if not isinstance(batch, pa.Table):
            batch = pa.Table.from_pydict(batch)
        listed = batch.select(["id", "content_hash", "status"])
        files = batch.column("file") if "file" in batch.column_names else pa.nulls(batch.num_rows, pa.string())
        self._listing.append(listed.append_column("file", files))
        status = batch.column("status")
        for row in batch.filter(pc.equal(status, STATUS_CORRUPT)).select(["id", "content_hash", "error"]).to_pylist():
            self._corrupt.append({"id": row["id"], "content_hash": row["content_hash"], "reason": row["error"] or ""})
        embedded = batch.filter(pc.equal(status, STATUS_EMBEDDED))
        n_corrupt = int(pc.sum(pc.equal(status, STATUS_CORRUPT)).as_py() or 0)
        self.counts["corrupt"] += n_corrupt
        self.counts["embedded"] += embedded.num_rows
        self.counts["known"] += batch.num_rows - embedded.num_rows - n_corrupt
        if embedded.num_rows:
            mu = _list_vectors(embedded.column("mu"), self.dim)
            sigma = _list_vectors(embedded.column("sigma"), self.dim)
            table = embedding_table(embedded.column("id"), embedded.column("content_hash"), mu, sigma)
            start = 0
            while start < table.num_rows:
                if self._writer is None:
                    self._open()
                take = min(self.target_rows - self._rows, table.num_rows - start)
                self._writer.write_table(table.slice(start, take))
                self._rows += take
                start += take
                if self._rows >= self.target_rows:
                    self._finish()

    def close(self) -> list[Partition]:
        """Finish the last, partly filled partition (or one holding only corrupt images)."""
        if self._writer is not None or self._corrupt:
            if self._writer is None:
                self._open()
            self._finish()
        return self.finished

    def listing(self) -> pa.Table:
        """(id, content_hash, status, file) of every row seen."""
        schema = LISTING_SCHEMA
        return pa.concat_tables([t.cast(schema) for t in self._listing] or [schema.empty_table()]).combine_chunks()

    def _open(self) -> None:
        path, _ = partition_paths(self.folder, self.next_index)
        self._writer = _writer(path.with_name(path.name + ".tmp"), self.dim)
        self._rows = 0

    def _finish(self) -> None:
        path, marker = partition_paths(self.folder, self.next_index)
        tmp = path.with_name(path.name + ".tmp")
        self._writer.close()
        self._writer = None
        os.replace(tmp, path)
        part = Partition(self.next_index, path, self._rows, file_sha256(path), path.stat().st_size, self._corrupt)
        # The marker is written last: its presence means the partition is complete.
        write_json_atomic(marker, part.marker())
        log.info("partition %d done: %d images (%d corrupt)", part.index, part.rows, len(part.corrupt))
        self.finished.append(part)
        self.next_index += 1
        self._rows = 0
        self._corrupt = []


def _list_vectors(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, np.float32).reshape(-1, dim)
