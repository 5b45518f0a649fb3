"""What one staged build or update is asked to do (``BuildRequest``), checked before any embedding;
its options, parent version and format name the run (its build key)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from .factory import check_factory
from .kinds import INDEX_SHORTHANDS
from .spec import resolve_spec
from .store import FORMAT_VERSION, IndexStore

DEFAULT_SHARD_ROWS = 250_000


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
