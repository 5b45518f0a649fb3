"""The version an update starts from: its rows, corrupt images and files are what the update
reuses, and what it compares the corpus with."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .store import IndexStore


@dataclass
class ParentVersion:
    store: IndexStore
    version: str
    manifest: dict[str, Any]

    @property
    def dir(self) -> Path:
        return self.store.version_dir(self.version)

    @property
    def corrupt(self) -> list[dict[str, str]]:
        return self.manifest.get("corrupt", [])

    def corrupt_keys(self) -> pa.Table:
        """(id, content_hash) of the images it knows to be corrupt."""
        return pa.table({"id": pa.array([c["id"] for c in self.corrupt], pa.string()),
                         "content_hash": pa.array([c["content_hash"] for c in self.corrupt], pa.string())})

    @functools.cached_property
    def rows(self) -> pa.Table:
        """id, content_hash, shard and row of every vector it holds."""
        tables = []
        for entry in self.manifest["shards"]:
            t = pq.read_table(self.dir / entry["embeddings"], columns=["id", "content_hash"])
            tables.append(t.append_column("shard", pa.array(np.full(t.num_rows, entry["shard"], np.int64)))
                           .append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64))))
        return pa.concat_tables(tables or [empty_rows("shard")]).combine_chunks()


def empty_rows(extra: str) -> pa.Table:
    return pa.table({"id": pa.array([], pa.string()), "content_hash": pa.array([], pa.string()),
                     extra: pa.array([], pa.int64()), "row": pa.array([], pa.int64())})
