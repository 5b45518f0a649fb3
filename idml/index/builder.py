"""Staged, resumable builds and updates of an index version (no Ray here).

A run is identified by its *build key* (hash of checkpoint, corpus fingerprint, options and
parent version) and works in ``staging/<key>/``:

1. embedding: ``plan_reads`` picks the corpus files to read (an update skips files whose size,
   mtime and dataset checksum match the parent version's record of them, ``corpus.parquet``);
   embedder output is routed into partitions (``PartitionSink``); finished partitions survive a
   crash, and a rerun with the same key skips their images (``known()``);
2. ``finish()``: decides where every corpus image's vectors come from (an unchanged row of the
   parent version, or a partition), plans the shards (reuse parent shards untouched, rewrite
   parent shards that lost rows, one new shard per partition), builds the faiss shards, measures
   recall against exact search, writes the manifest with checksums, renames the folder into
   ``versions/`` and publishes it by replacing ``CURRENT``.

A crash at any point leaves ``CURRENT`` at the previous version; a crash after the rename but
before publishing is finished by the rerun (``finished_version``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..faiss_import import faiss
from .combined import CombinedIndex, combine
from .factory import check_factory
from .faiss_io import read_index, write_index_atomic
from .kinds import INDEX_SHORTHANDS
from .labels import labels_for, split_labels
from .recall import ExactTopK
from .shards import build_shard, train_index, write_shard
from .spec import DEFAULT_REFINE, FLAT_MAX_VECTORS, IndexSpec, resolve_spec
from .tuning import Tuning, query_latency_ms, search_values, set_search_param, tune_search
from .corpus import FILE_STATS_SCHEMA, UNKNOWN_MTIME, Corpus
from .embed import STATUS_KNOWN
from .exact_vectors import ShardVectors, open_vectors, vectors_name, write_vectors
from .partitions import (
    KEY_SCHEMA,
    LISTING_SCHEMA,
    Partition,
    PartitionSink,
    done_partitions,
    known_rows,
    read_vectors,
    write_embeddings,
)
from .recall import GT_DEPTH, RecallSample
from .store import FORMAT_VERSION, INDEX_FORMAT, MANIFEST_NAME, IndexStore, checksum, link_or_copy, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_SHARD_ROWS = 250_000
RECALL_K = 10
# Every corpus image with its file's size, mtime and checksum when this version was built.
CORPUS_RECORD = "corpus.parquet"
CORPUS_RECORD_SCHEMA = pa.schema([("id", pa.string()), ("content_hash", pa.string()), *FILE_STATS_SCHEMA])


@dataclass
class BuildRequest:
    kind: str  # "build" (embed everything) or "update" (embed only new and changed images)
    dim: int
    checkpoint: dict[str, Any]  # path, sha256, backbone, image_size, uncertainty_weight
    corpus: dict[str, Any]  # uri, kind, splits, fingerprint, num_rows
    index_type: str = "auto"  # auto, a name of kinds.NAMED_INDEXES, or a faiss factory string (IVF4096,PQ64, HNSW32, ...)
    nlist: int | None = None
    nprobe: int | None = None
    train_size: int | None = None
    shards: int | None = None  # build only; default: one per DEFAULT_SHARD_ROWS images
    recall_sample: int = 256
    target_recall: float = 0.95
    max_index_bytes: int | None = None  # build only: choose (auto) or check the index against this memory
    max_query_ms: float | None = None  # latency budget of the nprobe/efSearch tuning
    # build only: re-scoring depth of lossy codes (None: DEFAULT_REFINE; 0 or 1: off, no vector
    # files); an update keeps its parent's, whose vector files it reuses
    refine: int | None = None

    def __post_init__(self):
        if self.kind not in ("build", "update"):
            raise ValueError(f"kind must be build or update, got {self.kind!r}")
        if self.index_type not in INDEX_SHORTHANDS:
            check_factory(self.index_type, self.dim)  # a bad string is refused before any embedding
        if self.max_index_bytes is not None and self.max_index_bytes <= 0:
            raise ValueError(f"--max-index-memory must be positive, got {self.max_index_bytes} bytes")
        if self.max_query_ms is not None and self.max_query_ms <= 0:
            raise ValueError(f"--max-query-ms must be positive, got {self.max_query_ms}")
        if self.kind == "update" and self.refine is not None:
            raise ValueError("--refine is chosen at build: an update keeps the re-scoring depth of the version it "
                             "updates (query --refine and serve --refine change it per search)")
        if self.kind == "build" and (self.max_index_bytes or self.refine is not None) and self.corpus.get("num_rows"):
            # A budget nothing fits, or a refine an exact index has no use for, is refused before
            # the embedding, not after it (corrupt images only shrink the index).
            rows = int(self.corpus["num_rows"])
            resolve_spec(self.index_type, rows, self.dim, nlist=self.nlist, max_index_bytes=self.max_index_bytes,
                            shards=self.shards or max(1, math.ceil(rows / DEFAULT_SHARD_ROWS)), refine=self.refine)
        if self.shards is not None and self.shards < 1:
            raise ValueError(f"--shards must be >= 1, got {self.shards}")
        if self.recall_sample < 1:
            raise ValueError(f"--recall-sample must be >= 1, got {self.recall_sample}")

    @staticmethod
    def inputs(kind: str, store: IndexStore, *, checkpoint: str | None, corpus: str | None,
               splits: list[str] | None, follow_links: bool | None = None) -> tuple[str, str, list[str] | None, bool]:
        """``(checkpoint, corpus, splits, follow_links)`` to embed: as given; an update fills what
        is not given from the published version (its splits and links choice only when the corpus
        is the same)."""
        if kind == "update":
            published = store.read_manifest()
            checkpoint = checkpoint or published["checkpoint"]["path"]
            corpus = corpus or published["corpus"]["uri"]
            same_corpus = corpus == published["corpus"]["uri"]
            if splits is None and published["corpus"].get("splits") and same_corpus:
                splits = published["corpus"]["splits"]
            if follow_links is None and same_corpus:
                follow_links = published["corpus"].get("follow_links", False)
        if not checkpoint or not corpus:
            raise ValueError("a build needs --checkpoint and --corpus")
        return checkpoint, corpus, splits, bool(follow_links)

    def key(self, parent: str | None) -> str:
        data = {**asdict(self), "parent": parent, "format_version": FORMAT_VERSION}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class ReadPlan:
    """Which corpus files a run reads. The images of the files it skips keep the identity
    (id, content hash) the parent version recorded for them."""

    files: list[str]  # paths inside the corpus filesystem: new files, and files whose stats differ
    unchanged: int  # files skipped: size, mtime (and a dataset shard's checksum) as recorded
    carried: pa.Table  # LISTING_SCHEMA rows of the skipped files' images
    note: str = ""  # why every file is read, when that is not obvious

    @property
    def total(self) -> int:
        return len(self.files) + self.unchanged


@dataclass
class _ShardPlan:
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


@dataclass
class _Sources:
    partitions: list[Partition]
    parent_rows: pa.Table  # id, content_hash, shard, row of the parent version (update)
    from_parent: pa.Table  # listed images unchanged since the parent
    from_staging: pa.Table  # listed images embedded by this run
    corrupt: list[dict[str, str]]


@dataclass
class _Shards:
    exact: Any  # ExactTopK of the recall queries
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)
    ids_by_shard: dict[int, np.ndarray] = field(default_factory=dict)
    indexes: list[Any] = field(default_factory=list)
    vectors: dict[int, np.ndarray] = field(default_factory=dict)  # exact, memory-mapped (lossy codes only)


@dataclass
class StagedBuild:
    """One build/update of ``store``; use as a context manager (it holds the index lock)."""

    store: IndexStore
    request: BuildRequest
    progress: Callable[[str], None] = field(default=lambda msg: log.info("%s", msg))
    wait_s: float = 0.0  # how long to wait for another writer of the index folder

    def __enter__(self) -> "StagedBuild":
        self._lock = self.store.lock(wait_s=self.wait_s, holder=f"idml index {self.request.kind}")
        self._corpus: Corpus | None = None
        self.read_plan: ReadPlan | None = None
        self._lock.__enter__()
        try:
            self.t_start = time.time()
            self.parent_version = self.store.current_version()
            self.parent = self.store.read_manifest(self.parent_version) if self.parent_version else None
            if self.request.kind == "update":
                self._check_update_parent()
            self.key = self.request.key(self.parent_version)
            self.dir = self.store.staging(self.key)
            self.partitions_dir = self.dir / "work" / "partitions"
            self.finished_version = self.store.find_version_by_key(self.key)
            self.resumed = done_partitions(self.partitions_dir)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)

    # -- embedding stage ---------------------------------------------------------------------
    def _check_update_parent(self) -> None:
        if self.parent is None:
            raise FileNotFoundError(f"nothing to update in {self.store.root}: no version is published; run `idml index build` first")
        if self.parent["checkpoint"]["sha256"] != self.request.checkpoint["sha256"]:
            raise ValueError(
                f"checkpoint {self.request.checkpoint['path']} differs from the one version {self.parent_version} was built "
                f"with ({self.parent['checkpoint']['path']}, sha256 {self.parent['checkpoint']['sha256'][:12]}…); "
                "embeddings of two models cannot share an index: run `idml index build` instead"
            )
        spec = self.parent["faiss"]
        same_type = self.request.index_type in ("auto", spec["index_type"], spec["factory"], spec.get("index_factory"))
        if not same_type or (self.request.nlist and self.request.nlist != spec["nlist"]) or self.request.max_index_bytes:
            raise ValueError(
                f"version {self.parent_version} is {spec['factory']}; an update keeps the index spec, "
                "run `idml index build` to change it"
            )
        # The new version hard-links the parent's unchanged files: a damaged one would poison it too.
        self.store.checked_manifest(self.parent_version, purpose="update")

    def known(self) -> pa.Table:
        """(id, content_hash) of images that need no embedding: the parent version's rows (and
        its known-corrupt images) on update, plus the finished partitions of an interrupted run."""
        tables = [known_rows(self.resumed)]
        if self.request.kind == "update":
            tables.append(self._parent_rows().select(["id", "content_hash"]))
            corrupt = self.parent.get("corrupt", [])
            tables.append(pa.table({"id": pa.array([c["id"] for c in corrupt], pa.string()),
                                    "content_hash": pa.array([c["content_hash"] for c in corrupt], pa.string())}))
        return pa.concat_tables([t.cast(KEY_SCHEMA) for t in tables]).combine_chunks()

    def plan_reads(self, corpus: Corpus) -> ReadPlan:
        """The files of ``corpus`` to read: all of them for a build; for an update, those that are
        new or whose size, mtime (or, for a dataset shard, the checksum its manifest records)
        differ from the parent version's record. Stat first, read only on change: a changed file
        is still identified by content hash, so one rewritten with the same bytes is hashed
        again but not embedded again. ``finish`` adds the skipped files' images to the listing
        and records this corpus's stats for the next update."""
        self._corpus = corpus
        self._file_stats = stats = corpus.file_stats if corpus.file_stats is not None else FILE_STATS_SCHEMA.empty_table()
        previous, note = self._parent_record(corpus)
        empty = LISTING_SCHEMA.empty_table()
        if previous is None:
            self.read_plan = ReadPlan(list(corpus.files), 0, empty, note)
            return self.read_plan
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
        self.read_plan = ReadPlan(files, same.num_rows, carried, note)
        return self.read_plan

    def _parent_record(self, corpus: Corpus) -> tuple[pa.Table | None, str]:
        """The parent version's ``corpus.parquet`` when an update may trust it, else why not."""
        if self.request.kind != "update":
            return None, ""
        if self.parent["corpus"]["uri"] != corpus.uri:
            return None, f"another corpus than {self.parent_version}'s: every file is read"
        if CORPUS_RECORD not in self.parent.get("files", {}):
            return None, f"{self.parent_version} records no file sizes and mtimes (an older version): every file is read"
        return pq.read_table(self.store.version_dir(self.parent_version) / CORPUS_RECORD), ""

    def target_rows(self) -> int:
        if self.request.kind == "update":
            return int(self.parent["target_shard_rows"])
        n = max(1, int(self.request.corpus.get("num_rows") or 1))
        shards = self.request.shards or max(1, math.ceil(n / DEFAULT_SHARD_ROWS))
        return max(1, math.ceil(n / shards))

    def sink(self) -> PartitionSink:
        first = max((p.index for p in self.resumed), default=-1) + 1
        return PartitionSink(self.partitions_dir, dim=self.request.dim, target_rows=self.target_rows(), first_index=first)

    # -- finishing -------------------------------------------------------------------------
    def publish_finished(self) -> dict[str, Any]:
        """Publish the version an interrupted run renamed into place but did not publish."""
        version = self.finished_version
        self.store.checked_manifest(version, purpose="publish")
        self.published = True
        if self.store.current_version() != version:
            self.store.publish(version)
            self.progress(f"published {version} (finished by an earlier, interrupted run)")
        self.store.remove_staging()
        return self.store.read_manifest(version)

    def finish(self, listing: pa.Table, *, embed_seconds: float = 0.0, embedded_this_run: int = 0,
               embedding: dict[str, Any] | None = None) -> dict[str, Any]:
        """Assemble, index, measure, write the manifest and publish. ``listing``: (id,
        content_hash[, status, file]) of every image this run's embedding pass read; with
        ``plan_reads``, the images of the files it skipped are added here. ``embedding``: how the
        vectors were computed (actors, nodes), recorded in the manifest."""
        t0 = time.time()
        listing = self._complete_listing(listing)
        src = self._sources(listing)
        plan = self._plan(src.partitions, src.parent_rows, src.from_parent, src.from_staging)
        n_vectors = sum(p.count for p in plan)
        counts = self._counts(listing, src.parent_rows, src.from_parent, src.from_staging, src.corrupt, n_vectors, len(plan))
        if self.read_plan is not None:
            counts["files_read"], counts["files_unchanged"] = len(self.read_plan.files), self.read_plan.unchanged
        if self.request.kind == "update" and counts["added"] == counts["changed"] == counts["removed"] == 0:
            self.store.remove_staging()
            self.published = False
            self.progress(f"{self.parent_version} is up to date with the corpus; nothing to publish")
            return self.parent
        spec = self._spec(n_vectors, len(plan))
        version_dir = self.dir / "version"
        shutil.rmtree(version_dir, ignore_errors=True)  # a crashed finish() is simply redone
        (version_dir / "shards").mkdir(parents=True)
        self.progress(f"indexing {n_vectors} vectors in {len(plan)} shards ({spec.factory})")

        timings: dict[str, float] = {}
        t = time.time()
        queries, query_ids, query_labels, train_sample = self._samples(spec, plan)
        timings["sample_seconds"] = time.time() - t
        t = time.time()
        trained = self._trained(spec, train_sample, version_dir)
        timings["train_seconds"] = time.time() - t
        del train_sample
        shards = self._write_shards(plan, spec, trained, version_dir, queries, timings)
        t = time.time()
        tuning = self._measure_recall(shards, spec, trained, queries, query_ids, query_labels, src.from_parent,
                                      n_vectors, version_dir)
        recall, used = tuning.recall, tuning.queries
        timings["recall_seconds"] = time.time() - t
        if self._corpus is not None:
            pq.write_table(self._corpus_record(listing), version_dir / CORPUS_RECORD, compression="zstd")
        t = hashed_since = time.time()
        files = self._checksums(shards, version_dir)
        timings["checksum_seconds"] = time.time() - t
        manifest = self._manifest(spec, counts, src, shards, files, tuning, n_vectors, timings,
                                  index_seconds=time.time() - t0, embed_seconds=embed_seconds,
                                  embedded_this_run=embedded_this_run)
        if embedding:
            manifest["embedding"] = embedding
        self._publish(version_dir, manifest)
        self.store.remember_built(manifest["version"], manifest, hashed_since=hashed_since,
                                  parent_stamps=self.store.remembered(self.parent_version) if self.parent else {})
        tuned = f", {spec.search_param} {spec.search_value}" if spec.search_param else ""
        self.progress(f"published {manifest['version']}: {n_vectors} vectors, recall@{RECALL_K} {recall:.3f}{tuned}")
        return manifest

    # -- finishing steps ---------------------------------------------------------------------
    def _complete_listing(self, listing: pa.Table) -> pa.Table:
        """The run's listing in LISTING_SCHEMA with corpus-relative file names, plus the images of
        the files ``plan_reads`` skipped."""
        n = listing.num_rows
        columns = {"id": listing.column("id"), "content_hash": listing.column("content_hash"),
                   "status": listing.column("status") if "status" in listing.column_names else pa.nulls(n, pa.string()),
                   "file": listing.column("file") if "file" in listing.column_names else pa.nulls(n, pa.string())}
        if self._corpus is not None and n:
            prefix = self._corpus.root.rstrip("/") + "/"
            columns["file"] = pc.replace_substring_regex(columns["file"].cast(pa.string()), pattern="^" + re.escape(prefix),
                                                         replacement="")
        listing = pa.table(columns).cast(LISTING_SCHEMA)
        if self.read_plan is not None and self.read_plan.carried.num_rows:
            listing = pa.concat_tables([listing, self.read_plan.carried])
        return listing.combine_chunks()

    def _corpus_record(self, listing: pa.Table) -> pa.Table:
        """CORPUS_RECORD rows: each image with its file's stats from this run's listing of the
        corpus (a file the reader did not name gets size -1: the next update reads it again)."""
        keyed = listing.select(["id", "content_hash", "file"])
        joined = keyed.join(self._file_stats, keys="file", join_type="left outer")
        return pa.table({
            "id": joined.column("id"), "content_hash": joined.column("content_hash"),
            "file": pc.fill_null(joined.column("file"), ""), "size": pc.fill_null(joined.column("size"), -1),
            "mtime_ns": pc.fill_null(joined.column("mtime_ns"), UNKNOWN_MTIME),
            "sha256": pc.fill_null(joined.column("sha256"), ""),
        }, schema=CORPUS_RECORD_SCHEMA)

    def _sources(self, listing: pa.Table) -> "_Sources":
        """Where every listed image's vectors come from: an unchanged row of the parent version,
        a finished partition of this run, or nowhere (a corrupt image)."""
        listing = listing.select(["id", "content_hash"]).combine_chunks()
        _check_unique(listing)
        partitions = done_partitions(self.partitions_dir)
        parent_rows = self._parent_rows() if self.request.kind == "update" else _empty_rows("shard")
        staged_rows = _partition_rows(partitions)
        keys = ["id", "content_hash"]
        # One join splits the listing: rows the parent has (its shard and row) and the rest.
        joined = listing.join(parent_rows, keys=keys, join_type="left outer")
        in_parent = pc.is_valid(joined.column("row"))
        from_parent = joined.filter(in_parent)
        rest = joined.filter(pc.invert(in_parent)).select(keys)
        from_staging = rest.join(staged_rows, keys=keys, join_type="inner")
        rest = rest.join(staged_rows.select(keys), keys=keys, join_type="left anti")
        return _Sources(partitions, parent_rows, from_parent, from_staging, self._corrupt_of(rest, partitions))

    def _write_shards(self, plan: list[_ShardPlan], spec: IndexSpec, trained, version_dir: Path, queries,
                      timings: dict[str, float]) -> "_Shards":
        """Each planned shard's embeddings and faiss index in ``version_dir`` (and, for lossy
        codes, its exact vectors); exact neighbours of the recall queries among the new vectors
        are gathered on the way."""
        out = _Shards(exact=ExactTopK(queries, GT_DEPTH + 1))
        timings["exact_seconds"] = 0.0
        t = time.time()
        for p in plan:
            rel_parquet, rel_index = f"shards/{p.name}.parquet", f"shards/{p.name}.faiss"
            # Only a search that re-scores (refine > 1) reads them: with refine 0 (an exact index, a
            # lossy one built with --refine 0, or an update of either) there are none to write.
            rel_vectors = f"shards/{vectors_name(p.name)}" if spec.refine > 1 else None
            out_parquet, out_index = version_dir / rel_parquet, version_dir / rel_index
            if p.source == "reused":
                link_or_copy(p.src_parquet, out_parquet)
                link_or_copy(p.src_index, out_index)
                if rel_vectors:
                    link_or_copy(p.src_vectors, version_dir / rel_vectors)
                for rel in filter(None, (rel_parquet, rel_index, rel_vectors)):
                    out.files[rel] = self.parent["files"][rel]
                table = pq.read_table(out_parquet, columns=["id"])
            else:
                if p.rows is None:
                    link_or_copy(p.src_parquet, out_parquet)
                else:
                    write_embeddings(out_parquet, pq.read_table(p.src_parquet).take(pa.array(p.rows)))
                table = pq.read_table(out_parquet, columns=["id", "mu"])
                mu = _vectors(table)
                write_shard(build_shard(mu, p.shard, spec, trained), out_index)
                if rel_vectors:
                    write_vectors(mu, version_dir / rel_vectors)
                if p.source == "new":
                    t_exact = time.time()
                    out.exact.add(mu, labels_for(p.shard, len(mu)))
                    timings["exact_seconds"] += time.time() - t_exact
                del mu
            # IVF shards are memory-mapped: the build never holds the whole index in RAM.
            out.indexes.append(spec.kind.open_shard(out_index, trained))
            if rel_vectors:
                out.vectors[p.shard] = open_vectors(version_dir / rel_vectors, p.count, spec.dim)
            out.ids_by_shard[p.shard] = table.column("id").to_numpy(zero_copy_only=False).astype(str)
            out.entries.append({"shard": p.shard, "count": p.count, "source": p.source,
                                "embeddings": rel_parquet, "index": rel_index,
                                **({"vectors": rel_vectors} if rel_vectors else {})})
        timings["shards_seconds"] = time.time() - t - timings["exact_seconds"]
        return out

    def _measure_recall(self, shards: "_Shards", spec: IndexSpec, trained, queries, query_ids, query_labels,
                        from_parent: pa.Table, n_vectors: int, version_dir: Path) -> Tuning:
        """recall@10 of the combined index against exact search and its query latency, nprobe or
        efSearch tuned, as the searcher delivers them (lossy candidates re-scored by exact
        cosine); the sample is saved with the version (``verify`` measures it again)."""
        vectors = ShardVectors(shards.vectors, spec.dim) if shards.vectors else None
        combined = combine(shards.indexes, spec, trained, vectors=vectors)
        scores, labels = shards.exact.result()
        if query_ids is None:  # build: the queries are stored vectors, named once all shards are known
            query_ids = _labels_to_ids(query_labels, shards.ids_by_shard)
        sample = self._recall_sample(queries, query_ids, scores, _labels_to_ids(labels, shards.ids_by_shard),
                                     from_parent, n_vectors)
        tuning = self._tune(combined, spec, sample, shards.ids_by_shard)
        sample.save(version_dir / "recall_sample.npz")
        return tuning

    def _checksums(self, shards: "_Shards", version_dir: Path) -> dict[str, dict[str, Any]]:
        """Size and sha256 of every file of the version (reused shards keep the parent's)."""
        files = dict(shards.files)
        for entry in shards.entries:
            for rel in filter(None, (entry["embeddings"], entry["index"], entry.get("vectors"))):
                if rel not in files:
                    files[rel] = checksum(version_dir / rel)
        for rel in ("trained.faiss", "recall_sample.npz", CORPUS_RECORD):
            if (version_dir / rel).is_file():
                files[rel] = checksum(version_dir / rel)
        return dict(sorted(files.items()))

    def _manifest(self, spec: IndexSpec, counts: dict[str, int], src: "_Sources", shards: "_Shards",
                  files: dict[str, Any], tuning: Tuning, n_vectors: int, timings: dict[str, float], *,
                  index_seconds: float, embed_seconds: float, embedded_this_run: int) -> dict[str, Any]:
        req = self.request
        return {
            "format": INDEX_FORMAT,
            "format_version": FORMAT_VERSION,
            "version": self.store.next_version_id(),
            "kind": req.kind,
            "parent": self.parent_version,
            "build_key": self.key,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": req.checkpoint,
            "corpus": req.corpus,
            "faiss": spec.to_dict(),
            "target_shard_rows": self.target_rows(),
            "counts": {**counts, "embedded": sum(p.rows for p in src.partitions)},
            "recall": {"k": RECALL_K, "recall": tuning.recall, "queries": tuning.queries, "refine": spec.refine,
                       "nprobe": spec.nprobe,
                       "ef_search": spec.ef_search, "query_ms": tuning.query_ms, "target_recall": spec.target_recall,
                       "max_query_ms": spec.max_query_ms, "reached": tuning.reached, "tried": tuning.tried},
            "metrics": {
                f"recall_at_{RECALL_K}": tuning.recall,
                **({"query_ms": tuning.query_ms} if tuning.query_ms is not None else {}),
                "estimated_index_bytes": spec.estimated_bytes,
                "images_embedded": embedded_this_run,
                "embed_seconds": embed_seconds,
                "embed_images_per_s": embedded_this_run / embed_seconds if embed_seconds > 0 else 0.0,
                "index_seconds": index_seconds,
                **timings,
                "build_seconds": time.time() - self.t_start,
                "index_bytes": sum(v["bytes"] for k, v in files.items() if k.endswith(".faiss")),
                # on disk only (memory-mapped for re-scoring), not in the index's memory
                "exact_vector_bytes": sum(v["bytes"] for k, v in files.items() if k.endswith(".vectors.npy")),
                "vectors": n_vectors,
                "corrupt_images": counts["corrupt"],
            },
            "shards": shards.entries,
            "files": files,
            "corrupt": src.corrupt,
        }

    def _publish(self, version_dir: Path, manifest: dict[str, Any]) -> None:
        write_json_atomic(version_dir / MANIFEST_NAME, manifest)
        self.store.move_into_versions(version_dir, manifest["version"])
        self.store.publish(manifest["version"])
        self.published = True
        self.store.remove_staging()

    # -- helpers -----------------------------------------------------------------------------
    def _parent_rows(self) -> pa.Table:
        if getattr(self, "_parent_rows_cache", None) is None:
            tables = []
            vdir = self.store.version_dir(self.parent_version)
            for entry in self.parent["shards"]:
                t = pq.read_table(vdir / entry["embeddings"], columns=["id", "content_hash"])
                tables.append(t.append_column("shard", pa.array(np.full(t.num_rows, entry["shard"], np.int64)))
                               .append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64))))
            self._parent_rows_cache = pa.concat_tables(tables or [_empty_rows("shard")]).combine_chunks()
        return self._parent_rows_cache

    def _corrupt_of(self, rest: pa.Table, partitions: list[Partition]) -> list[dict[str, str]]:
        reasons = {(c["id"], c["content_hash"]): c["reason"] for p in partitions for c in p.corrupt}
        if self.parent is not None and self.request.kind == "update":
            for c in self.parent.get("corrupt", []):
                reasons.setdefault((c["id"], c["content_hash"]), c["reason"])
        out = []
        for row in rest.to_pylist():
            key = (row["id"], row["content_hash"])
            if key not in reasons:
                raise RuntimeError(f"image {row['id']!r} was neither embedded nor reported corrupt; rerun the build")
            out.append({"id": row["id"], "content_hash": row["content_hash"], "reason": reasons[key]})
        return sorted(out, key=lambda c: c["id"])

    def _plan(self, partitions, parent_rows, from_parent, from_staging) -> list[_ShardPlan]:
        plan: list[_ShardPlan] = []
        next_shard = 0
        if self.request.kind == "update":
            vdir = self.store.version_dir(self.parent_version)
            kept = _rows_by(from_parent, "shard")
            next_shard = max((e["shard"] for e in self.parent["shards"]), default=-1) + 1
            for entry in self.parent["shards"]:
                rows = kept.get(entry["shard"], np.zeros(0, np.int64))
                src = vdir / entry["embeddings"]
                if len(rows) == entry["count"]:
                    vectors = vdir / entry["vectors"] if entry.get("vectors") else None
                    plan.append(_ShardPlan(entry["shard"], "reused", src, vdir / entry["index"], vectors,
                                           count=entry["count"]))
                elif len(rows):
                    plan.append(_ShardPlan(next_shard, "rewritten", src, rows=np.sort(rows), count=len(rows)))
                    next_shard += 1
        used = _rows_by(from_staging, "part")
        for part in partitions:
            rows = used.get(part.index, np.zeros(0, np.int64))
            if len(rows):
                keep = None if len(rows) == part.rows else np.sort(rows)
                plan.append(_ShardPlan(next_shard, "new", part.path, rows=keep, count=len(rows)))
                next_shard += 1
        return plan

    def _spec(self, n_vectors: int, shards: int) -> IndexSpec:
        req = self.request
        if req.kind == "update":
            # The parent's spec, its refine too: the reused shards have vector files exactly when it is > 1.
            spec = IndexSpec.from_dict(self.parent["faiss"])
            if req.nprobe is not None:
                if spec.search_param != "nprobe":
                    raise ValueError(f"--nprobe applies to IVF indexes; {self.parent_version} is {spec.factory}")
                spec.nprobe, spec.nprobe_auto = req.nprobe, False
            if req.max_query_ms is not None:
                spec.max_query_ms = req.max_query_ms
            if spec.estimated_bytes:  # the same bytes per vector, for the new count
                spec.estimated_bytes = check_factory(spec.factory, spec.dim).estimated_bytes(n_vectors, shards)
            if n_vectors < 1:
                raise ValueError("nothing to index: every image was removed from the corpus or is corrupt")
            if spec.kind.exact and req.index_type == "auto" and n_vectors > FLAT_MAX_VECTORS:
                self.progress(f"note: {n_vectors} vectors in a Flat index; `idml index build` would switch to IVF")
            return spec
        return resolve_spec(req.index_type, n_vectors, req.dim, nlist=req.nlist, nprobe=req.nprobe,
                               train_size=req.train_size, target_recall=req.target_recall,
                               max_index_bytes=req.max_index_bytes, max_query_ms=req.max_query_ms, shards=shards,
                               refine=req.refine)

    def _samples(self, spec: IndexSpec, plan: list[_ShardPlan]):
        """One pass over the new shards: recall queries (build; an update keeps its parent's)
        and the training sample (build), drawn uniformly."""
        build, approximate = self.request.kind == "build", not spec.kind.exact
        n = sum(p.count for p in plan)
        rng = np.random.default_rng(spec.seed)
        # A Flat index is exact: its recall is 1 by construction, so it needs no sample.
        query_rows = (np.sort(rng.choice(n, size=min(n, self.request.recall_sample), replace=False))
                      if build and approximate else np.zeros(0, int))
        train_rows = (np.sort(rng.choice(n, size=min(n, spec.train_size), replace=False))
                      if build and spec.train_size else np.zeros(0, int))
        queries, query_labels, train, start = [], [], [], 0
        for p in plan:
            q = query_rows[(query_rows >= start) & (query_rows < start + p.count)] - start
            tr = train_rows[(train_rows >= start) & (train_rows < start + p.count)] - start
            if len(q) or len(tr):
                mu = read_vectors(p.src_parquet)
                if p.rows is not None:
                    mu = mu[p.rows]
                queries.append(mu[q])
                query_labels.append(labels_for(p.shard, p.count)[q])
                train.append(mu[tr])
            start += p.count
        if not build:
            parent_sample = RecallSample.load(self.store.version_dir(self.parent_version) / "recall_sample.npz")
            return parent_sample.queries, parent_sample.query_ids, None, None
        queries = np.concatenate(queries) if queries else np.zeros((0, spec.dim), np.float32)
        query_labels = np.concatenate(query_labels) if query_labels else np.zeros(0, np.int64)
        return queries, None, query_labels, (np.concatenate(train) if train else None)

    def _trained(self, spec: IndexSpec, sample: np.ndarray | None, version_dir: Path) -> faiss.Index | None:
        if spec.kind.exact:
            return None
        path = version_dir / "trained.faiss"
        if self.request.kind == "update":
            link_or_copy(self.store.version_dir(self.parent_version) / "trained.faiss", path)
            return read_index(path)
        cached = self.dir / "work" / f"trained-{spec.factory}-{spec.train_size}-{spec.niter}-{spec.seed}.faiss"
        if not cached.is_file():
            if spec.train_size:
                self.progress(f"training {spec.factory} on {len(sample)} vectors")
            write_index_atomic(train_index(sample, spec), cached)
        link_or_copy(cached, path)
        return read_index(path)

    def _recall_sample(self, queries, query_ids, scores, ids, from_parent, n_vectors) -> RecallSample:
        """Build: the exact neighbours just computed. Update: the parent's, minus neighbours that
        are gone, plus those among the new vectors."""
        if self.request.kind == "build":
            return RecallSample.from_exact(query_ids, queries, scores, ids, complete=n_vectors <= GT_DEPTH + 1)
        sample = RecallSample.load(self.store.version_dir(self.parent_version) / "recall_sample.npz")
        # Exact neighbours that are not indexed any more (removed, or changed content) go.
        kept = set(from_parent.column("id").to_pylist())
        old_ids = set(np.unique(sample.gt_ids).tolist()) - {""}
        sample = sample.without(old_ids - kept)
        return sample.merged(scores, ids)

    def _tune(self, combined: CombinedIndex, spec: IndexSpec, sample: RecallSample, ids_by_shard) -> Tuning:
        """recall@10 of the index on the sample and its single-query latency; with nprobe_auto,
        the smallest nprobe (IVF) or efSearch (HNSW) reaching target_recall within max_query_ms
        (an update starts from its parent's value)."""
        if spec.kind.exact:
            return Tuning(0, 1.0, 0, None, True, [])  # exact search: nothing to measure

        def apply(value: int) -> None:
            set_search_param(combined.index, spec.search_param, value)

        def measure(value: int) -> tuple[float, int]:
            apply(value)
            _, labels = combined.search(sample.queries, RECALL_K + 1)
            return sample.recall(_labels_to_ids(labels, ids_by_shard), RECALL_K)

        def latency(value: int) -> float:
            apply(value)
            return query_latency_ms(combined, sample.queries, RECALL_K)

        if spec.nprobe_auto:
            start = spec.search_value if self.request.kind == "update" else 0
            values = search_values(spec, start)
        else:
            values = [spec.search_value]
        tuning = tune_search(measure, latency, values, spec.target_recall, spec.max_query_ms)
        spec.kind.set_tuned_value(spec, tuning.value)
        apply(tuning.value)
        if not tuning.reached and not math.isnan(tuning.recall):
            budget = f" within {spec.max_query_ms:g} ms/query" if spec.max_query_ms else ""
            self.progress(f"note: recall@{RECALL_K} {tuning.recall:.3f} is below the target {spec.target_recall:g}{budget} "
                          f"({spec.factory}, {spec.search_param or 'nothing to tune'} {tuning.value or ''}); "
                          "a larger index (more bytes per vector) or a larger --max-query-ms would reach it")
        return tuning

    def _counts(self, listing, parent_rows, from_parent, from_staging, corrupt, n_vectors, n_shards) -> dict[str, int]:
        resumed = pa.array([p.index for p in self.resumed], pa.int64())
        counts = {"vectors": n_vectors, "shards": n_shards, "corpus_images": listing.num_rows, "corrupt": len(corrupt),
                  # reused: vectors of the parent version; resumed: of partitions an interrupted run finished
                  "reused": from_parent.num_rows,
                  "resumed": int(pc.sum(pc.is_in(from_staging.column("part"), value_set=resumed)).as_py() or 0),
                  "from_partitions": from_staging.num_rows}
        if self.request.kind == "update":
            corrupt = self.parent.get("corrupt", [])
            parent = pa.table({column: pa.concat_arrays([parent_rows.column(key).combine_chunks(),
                                                         pa.array([c[key] for c in corrupt], pa.string())])
                               for column, key in (("id", "id"), ("old_hash", "content_hash"))})
            joined = listing.join(parent, keys="id", join_type="inner")
            counts["changed"] = int(pc.sum(pc.not_equal(joined.column("content_hash"), joined.column("old_hash"))).as_py() or 0)
            counts["added"] = listing.num_rows - joined.num_rows
            counts["removed"] = parent.num_rows - joined.num_rows
        return counts


def _empty_rows(extra: str) -> pa.Table:
    return pa.table({"id": pa.array([], pa.string()), "content_hash": pa.array([], pa.string()),
                     extra: pa.array([], pa.int64()), "row": pa.array([], pa.int64())})


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
    return pa.concat_tables(tables or [_empty_rows("part")]).combine_chunks()


def _rows_by(table: pa.Table, key: str) -> dict[int, np.ndarray]:
    if not table.num_rows:
        return {}
    keys = table.column(key).to_numpy()
    rows = table.column("row").to_numpy()
    order = np.argsort(keys, kind="stable")
    keys, rows = keys[order], rows[order]
    bounds = np.flatnonzero(np.diff(keys)) + 1
    return {int(k[0]): r for k, r in zip(np.split(keys, bounds), np.split(rows, bounds))}


def _vectors(table: pa.Table) -> np.ndarray:
    from .partitions import vectors

    return vectors(table, "mu")


def _labels_to_ids(labels: np.ndarray, ids_by_shard: dict[int, np.ndarray]) -> np.ndarray:
    labels = np.asarray(labels, np.int64)
    out = np.full(labels.shape, "", dtype=object)
    shards, rows = split_labels(labels)
    valid = labels >= 0
    for shard in np.unique(shards[valid]):
        mask = valid & (shards == shard)
        out[mask] = ids_by_shard[int(shard)][rows[mask]]
    return out.astype(str)
