"""Where every listed image's vectors come from (``find_sources``: an unchanged row of the parent
version, a finished partition of this run, or nowhere: a corrupt image) and the shards of the new
version (``plan_shards``: parent shards reused untouched, parent shards rewritten without the rows
they lost, one new shard per partition)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .parent import ParentVersion, empty_rows
from .partitions import Partition


@dataclass
class Sources:
    partitions: list[Partition]
    parent_rows: pa.Table  # id, content_hash, shard, row of the parent version (update)
    from_parent: pa.Table  # listed images unchanged since the parent
    from_staging: pa.Table  # listed images embedded by this run
    corrupt: list[dict[str, str]]


@dataclass
class ShardPlan:
    shard: int
    source: str  # "reused" (parent shard, untouched), "rewritten" (parent shard minus rows), "new" (a partition)
    src_parquet: Path
    src_index: Path | None = None  # reused only
    src_vectors: Path | None = None  # reused only, when the index re-scores (lossy codes)
    rows: np.ndarray | None = None  # rows of src_parquet to keep; None = all
    count: int = 0

    @property
    def name(self) -> str:
        return f"shard-{self.shard:06d}"


def find_sources(listing: pa.Table, partitions: list[Partition], parent: ParentVersion | None) -> Sources:
    """Where every listed image's vectors come from (``parent``: the version an update starts from)."""
    listing = listing.select(["id", "content_hash"]).combine_chunks()
    _check_unique(listing)
    parent_rows = parent.rows if parent is not None else empty_rows("shard")
    staged_rows = _partition_rows(partitions)
    keys = ["id", "content_hash"]
    # One join splits the listing: rows the parent has (its shard and row) and the rest.
    joined = listing.join(parent_rows, keys=keys, join_type="left outer")
    in_parent = pc.is_valid(joined.column("row"))
    from_parent = joined.filter(in_parent)
    rest = joined.filter(pc.invert(in_parent)).select(keys)
    from_staging = rest.join(staged_rows, keys=keys, join_type="inner")
    rest = rest.join(staged_rows.select(keys), keys=keys, join_type="left anti")
    return Sources(partitions, parent_rows, from_parent, from_staging, _corrupt_of(rest, partitions, parent))


def _corrupt_of(rest: pa.Table, partitions: list[Partition], parent: ParentVersion | None) -> list[dict[str, str]]:
    reasons = {(c["id"], c["content_hash"]): c["reason"] for p in partitions for c in p.corrupt}
    for c in parent.corrupt if parent is not None else []:
        reasons.setdefault((c["id"], c["content_hash"]), c["reason"])
    out = []
    for row in rest.to_pylist():
        key = (row["id"], row["content_hash"])
        if key not in reasons:
            raise RuntimeError(f"image {row['id']!r} was neither embedded nor reported corrupt; rerun the build")
        out.append({"id": row["id"], "content_hash": row["content_hash"], "reason": reasons[key]})
    return sorted(out, key=lambda c: c["id"])


def plan_shards(src: Sources, parent: ParentVersion | None) -> list[ShardPlan]:
    plan: list[ShardPlan] = []
    next_shard = 0
    if parent is not None:
        kept = _rows_by(src.from_parent, "shard")
        next_shard = max((e["shard"] for e in parent.manifest["shards"]), default=-1) + 1
        for entry in parent.manifest["shards"]:
            rows = kept.get(entry["shard"], np.zeros(0, np.int64))
            source = parent.dir / entry["embeddings"]
            if len(rows) == entry["count"]:
                vectors = parent.dir / entry["vectors"] if entry.get("vectors") else None
                plan.append(ShardPlan(entry["shard"], "reused", source, parent.dir / entry["index"], vectors,
                                      count=entry["count"]))
            elif len(rows):
                plan.append(ShardPlan(next_shard, "rewritten", source, rows=np.sort(rows), count=len(rows)))
                next_shard += 1
    used = _rows_by(src.from_staging, "part")
    for part in src.partitions:
        rows = used.get(part.index, np.zeros(0, np.int64))
        if len(rows):
            keep = None if len(rows) == part.rows else np.sort(rows)
            plan.append(ShardPlan(next_shard, "new", part.path, rows=keep, count=len(rows)))
            next_shard += 1
    return plan


def count_images(listing: pa.Table, src: Sources, resumed: list[Partition], parent: ParentVersion | None,
                 n_vectors: int, n_shards: int) -> dict[str, int]:
    """The manifest's counts: vectors, shards, corpus images, corrupt ones, where the vectors came
    from, and (update) images added, changed and removed since the parent."""
    resumed_parts = pa.array([p.index for p in resumed], pa.int64())
    counts = {"vectors": n_vectors, "shards": n_shards, "corpus_images": listing.num_rows,
              "corrupt": len(src.corrupt),
              # reused: vectors of the parent version; resumed: of partitions an interrupted run finished
              "reused": src.from_parent.num_rows,
              "resumed": int(pc.sum(pc.is_in(src.from_staging.column("part"), value_set=resumed_parts)).as_py() or 0),
              "from_partitions": src.from_staging.num_rows}
    if parent is not None:
        corrupt = parent.corrupt_keys()
        before = pa.table({column: pa.concat_arrays([src.parent_rows.column(key).combine_chunks(),
                                                     corrupt.column(key).combine_chunks()])
                           for column, key in (("id", "id"), ("old_hash", "content_hash"))})
        joined = listing.join(before, keys="id", join_type="inner")
        counts["changed"] = int(pc.sum(pc.not_equal(joined.column("content_hash"), joined.column("old_hash"))).as_py() or 0)
        counts["added"] = listing.num_rows - joined.num_rows
        counts["removed"] = before.num_rows - joined.num_rows
    return counts


def _check_unique(listing: pa.Table) -> None:
    ids = listing.column("id")
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dups = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:5]
        raise ValueError(f"the corpus has duplicate image ids (e.g. {dups}); every id must be unique")


def _partition_rows(partitions: list[Partition]) -> pa.Table:
    tables = []
    for p in partitions:
        if not p.rows:
            continue
        t = pq.read_table(p.path, columns=["id", "content_hash"])
        tables.append(t.append_column("part", pa.array(np.full(t.num_rows, p.index, np.int64)))
                      .append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64))))
    return pa.concat_tables(tables or [empty_rows("part")]).combine_chunks()


def _rows_by(table: pa.Table, key: str) -> dict[int, np.ndarray]:
    if not table.num_rows:
        return {}
    keys = table.column(key).to_numpy()
    rows = table.column("row").to_numpy()
    order = np.argsort(keys, kind="stable")
    keys, rows = keys[order], rows[order]
    bounds = np.flatnonzero(np.diff(keys)) + 1
    return {int(k[0]): r for k, r in zip(np.split(keys, bounds), np.split(rows, bounds))}
