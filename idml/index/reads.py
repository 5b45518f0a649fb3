"""Which corpus files a build or update reads (``plan_reads``), and the record of the corpus a
version keeps for the next update to compare with (``CORPUS_RECORD``).

A build reads every file. An update reads the files that are new or whose size, mtime (or, for a
dataset shard, the checksum its manifest records) differ from the parent version's record. Stat
first, read only on change: a changed file is still identified by content hash, so one rewritten
with the same bytes is hashed again but not embedded again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .corpus import FILE_STATS_SCHEMA, UNKNOWN_MTIME, Corpus
from .embed import STATUS_KNOWN
from .parent import ParentVersion
from .partitions import LISTING_SCHEMA

# Every corpus image with its file's size, mtime and checksum when this version was built.
CORPUS_RECORD = "corpus.parquet"
CORPUS_RECORD_SCHEMA = pa.schema([("id", pa.string()), ("content_hash", pa.string()), *FILE_STATS_SCHEMA])


@dataclass
class ReadPlan:
    """Which corpus files a run reads. The images of the files it skips keep the identity
    (id, content hash) the parent version recorded for them."""

    corpus: Corpus
    files: list[str]  # paths inside the corpus filesystem: new files, and files whose stats differ
    unchanged: int  # files skipped: size, mtime (and a dataset shard's checksum) as recorded
    carried: pa.Table  # LISTING_SCHEMA rows of the skipped files' images
    note: str = ""  # why every file is read, when that is not obvious

    @property
    def total(self) -> int:
        return len(self.files) + self.unchanged

    def corpus_record(self, listing: pa.Table) -> pa.Table:
        """CORPUS_RECORD rows: each image with its file's stats from this run's listing of the
        corpus (a file the reader did not name gets size -1: the next update reads it again)."""
        keyed = listing.select(["id", "content_hash", "file"])
        joined = keyed.join(_file_stats(self.corpus), keys="file", join_type="left outer")
        return pa.table({
            "id": joined.column("id"), "content_hash": joined.column("content_hash"),
            "file": pc.fill_null(joined.column("file"), ""), "size": pc.fill_null(joined.column("size"), -1),
            "mtime_ns": pc.fill_null(joined.column("mtime_ns"), UNKNOWN_MTIME),
            "sha256": pc.fill_null(joined.column("sha256"), ""),
        }, schema=CORPUS_RECORD_SCHEMA)


def plan_reads(corpus: Corpus, parent: ParentVersion | None) -> ReadPlan:
    """The files of ``corpus`` to read: all of them for a build (``parent`` None); for an update,
    those whose stats differ from ``parent``'s record."""
    stats = _file_stats(corpus)
    previous, note = _parent_record(corpus, parent)
    if previous is None:
        return ReadPlan(corpus, list(corpus.files), 0, LISTING_SCHEMA.empty_table(), note)
    keys = ["file", "size", "mtime_ns", "sha256"]
    recorded = previous.select(keys).group_by(keys).aggregate([])
    trusted = pc.not_equal(recorded.column("mtime_ns"), UNKNOWN_MTIME)
    same = stats.join(recorded.filter(trusted), keys=keys, join_type="left semi")
    unchanged = pc.is_in(stats.column("file"), value_set=same.column("file")).to_numpy(zero_copy_only=False)
    files = np.asarray(corpus.files, dtype=object)[~unchanged].tolist()
    carried = previous.join(same.select(["file"]), keys="file", join_type="left semi")
    carried = pa.table({"id": carried.column("id"), "content_hash": carried.column("content_hash"),
                        "status": pa.array([STATUS_KNOWN] * carried.num_rows, pa.string()),
                        "file": carried.column("file")}, schema=LISTING_SCHEMA)
    return ReadPlan(corpus, files, same.num_rows, carried, note)


def _file_stats(corpus: Corpus) -> pa.Table:
    return corpus.file_stats if corpus.file_stats is not None else FILE_STATS_SCHEMA.empty_table()


def _parent_record(corpus: Corpus, parent: ParentVersion | None) -> tuple[pa.Table | None, str]:
    """The parent version's ``corpus.parquet`` when an update may trust it, else why not."""
    if parent is None:
        return None, ""
    if parent.manifest["corpus"]["uri"] != corpus.uri:
        return None, f"another corpus than {parent.version}'s: every file is read"
    if CORPUS_RECORD not in parent.manifest.get("files", {}):
        return None, f"{parent.version} records no file sizes and mtimes (an older version): every file is read"
    return pq.read_table(parent.dir / CORPUS_RECORD), ""


def complete_listing(listing: pa.Table, plan: ReadPlan | None) -> pa.Table:
    """A run's listing (id, content_hash[, status, file]) in LISTING_SCHEMA with corpus-relative
    file names, plus the images of the files ``plan`` skipped."""
    n = listing.num_rows
    columns = {"id": listing.column("id"), "content_hash": listing.column("content_hash"),
               "status": listing.column("status") if "status" in listing.column_names else pa.nulls(n, pa.string()),
               "file": listing.column("file") if "file" in listing.column_names else pa.nulls(n, pa.string())}
    if plan is not None and n:
        prefix = plan.corpus.root.rstrip("/") + "/"
        columns["file"] = pc.replace_substring_regex(columns["file"].cast(pa.string()), pattern="^" + re.escape(prefix),
                                                     replacement="")
    listing = pa.table(columns).cast(LISTING_SCHEMA)
    if plan is not None and plan.carried.num_rows:
        listing = pa.concat_tables([listing, plan.carried])
    return listing.combine_chunks()
