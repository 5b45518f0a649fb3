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

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from ..files import write_json_atomic
from .corpus import Corpus
from .factory import check_factory
from .parent import ParentVersion
from .partitions import KEY_SCHEMA, PartitionSink, done_partitions, known_rows
from .reads import CORPUS_RECORD, ReadPlan, complete_listing, plan_reads
from .recall_tuning import RECALL_K, measure_recall
from .request import DEFAULT_SHARD_ROWS, BuildRequest
from .shard_build import RECALL_SAMPLE_NAME, TRAINED_NAME, BuiltShards, draw_samples, trained_index, write_shards
from .shard_plan import Sources, count_images, find_sources, plan_shards
from .spec import FLAT_MAX_VECTORS, IndexSpec, resolve_spec
from .store import FORMAT_VERSION, INDEX_FORMAT, MANIFEST_NAME, IndexStore, checksum
from .tuning import Tuning

log = logging.getLogger(__name__)


@dataclass
class StagedBuild:
    """One build/update of ``store``; use as a context manager (it holds the index lock)."""

    store: IndexStore
    request: BuildRequest
    progress: Callable[[str], None] = field(default=lambda msg: log.info("%s", msg))
    wait_s: float = 0.0  # how long to wait for another writer of the index folder

    def __enter__(self) -> "StagedBuild":
        self._lock = self.store.lock(wait_s=self.wait_s, holder=f"idml index {self.request.kind}")
        self.read_plan: ReadPlan | None = None
        self._lock.__enter__()
        try:
            self.t_start = time.time()
            self.parent_version = self.store.current_version()
            self.parent = self.store.read_manifest(self.parent_version) if self.parent_version else None
            # The version an update starts from (a build starts from nothing).
            self.update_parent = (ParentVersion(self.store, self.parent_version, self.parent)
                                  if self.request.kind == "update" and self.parent else None)
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
        if self.update_parent is not None:
            tables.append(self.update_parent.rows.select(["id", "content_hash"]))
            tables.append(self.update_parent.corrupt_keys())
        return pa.concat_tables([t.cast(KEY_SCHEMA) for t in tables]).combine_chunks()

    def plan_reads(self, corpus: Corpus) -> ReadPlan:
        """The files of ``corpus`` to read (``reads.plan_reads``): all of them for a build, the new
        and changed ones for an update. ``finish`` adds the skipped files' images to the listing and
        records this corpus's stats for the next update."""
        self.read_plan = plan_reads(corpus, self.update_parent)
        return self.read_plan

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
        parent = self.update_parent
        listing = complete_listing(listing, self.read_plan)
        src = find_sources(listing, done_partitions(self.partitions_dir), parent)
        plan = plan_shards(src, parent)
        n_vectors = sum(p.count for p in plan)
        counts = count_images(listing, src, self.resumed, parent, n_vectors, len(plan))
        if self.read_plan is not None:
            counts["files_read"], counts["files_unchanged"] = len(self.read_plan.files), self.read_plan.unchanged
        if parent is not None and counts["added"] == counts["changed"] == counts["removed"] == 0:
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
        samples = draw_samples(spec, plan, self.request.recall_sample, parent)
        timings["sample_seconds"] = time.time() - t
        t = time.time()
        trained = trained_index(spec, samples.train, version_dir, parent=parent, work_dir=self.dir / "work",
                                progress=self.progress)
        timings["train_seconds"] = time.time() - t
        samples.train = None
        shards = write_shards(plan, spec, trained, version_dir, samples.queries, timings, parent)
        t = time.time()
        tuning = measure_recall(shards, spec, trained, samples, src.from_parent, n_vectors, version_dir,
                                parent=parent, progress=self.progress)
        timings["recall_seconds"] = time.time() - t
        if self.read_plan is not None:
            pq.write_table(self.read_plan.corpus_record(listing), version_dir / CORPUS_RECORD, compression="zstd")
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
        self.progress(f"published {manifest['version']}: {n_vectors} vectors, recall@{RECALL_K} {tuning.recall:.3f}{tuned}")
        return manifest

    # -- finishing steps ---------------------------------------------------------------------
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

    def _checksums(self, shards: BuiltShards, version_dir: Path) -> dict[str, dict[str, Any]]:
        """Size and sha256 of every file of the version (reused shards keep the parent's)."""
        files = dict(shards.files)
        for entry in shards.entries:
            for rel in filter(None, (entry["embeddings"], entry["index"], entry.get("vectors"))):
                if rel not in files:
                    files[rel] = checksum(version_dir / rel)
        for rel in (TRAINED_NAME, RECALL_SAMPLE_NAME, CORPUS_RECORD):
            if (version_dir / rel).is_file():
                files[rel] = checksum(version_dir / rel)
        return dict(sorted(files.items()))

    def _manifest(self, spec: IndexSpec, counts: dict[str, int], src: Sources, shards: BuiltShards,
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
