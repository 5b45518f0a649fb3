"""What a search service holds and does, without Ray or HTTP: one published index version and the
model that embeds queries for it, loaded together and replaced together (``pipelines.serve``
puts this behind Ray Serve)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from .. import metric  # noqa: F401 - the re-rank imports it on first use; seconds a request should not wait
from ..data.images import decode_image
from ..inference import Embedder
from ..integrity import stat_signature
from ..metric import image_uncertainty
from .query import checkpoint_for_index
from .search import IndexSearcher, QueryResult
from .store import IndexStore

T = TypeVar("T")


class UnknownIdError(LookupError):
    """A queried id is not in the served index version."""


class IndexChangedError(RuntimeError):
    """Files the served index reads changed on disk since they were checked: its answers are
    withheld (a service answers 503) until it is opened, and so checked, again."""


@dataclass(frozen=True)
class ServedIndex:
    """An index version with its query embedder. Immutable: a service swaps the whole object
    when a new version is published, so a request that took one answers entirely from it."""

    searcher: IndexSearcher
    embedder: Embedder
    checkpoint: str
    checkpoint_sha256: str
    loaded_at: float = field(default_factory=time.time)

    @classmethod
    def load(cls, index_dir: str | os.PathLike, version: str | None = None, *, checkpoint: str | None = None,
             previous: ServedIndex | None = None, threads: int = 0, refine: int | None = None) -> ServedIndex:
        """``version`` (default: the published one) of ``index_dir``. The model is loaded only
        when ``previous`` does not already hold the one this version was built with. ``refine``:
        the re-scoring depth of lossy codes (``IndexSearcher``; default: the version's)."""
        searcher = IndexSearcher(index_dir, version, refine=refine)
        # The id table is built on first use; built here, concurrent requests never see it half-filled.
        searcher.lookup([])
        sha = searcher.manifest["checkpoint"]["sha256"]
        if previous is not None and previous.checkpoint_sha256 == sha:
            return cls(searcher, previous.embedder, previous.checkpoint, sha)
        path = checkpoint_for_index(searcher.manifest, checkpoint)
        return cls(searcher, Embedder(path, threads=threads), path, sha)

    @property
    def version(self) -> str:
        return self.searcher.version

    def prepare(self, blob: bytes) -> torch.Tensor:
        """Encoded image -> the uint8 CHW tensor the model takes; InvalidImageError if unusable."""
        return self.embedder.transform(decode_image(blob))

    def embed(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Prepared images (N, C, H, W) -> ``(mu, uncertainty)``, uncertainty = ||sigma||^2."""
        mu, sigma = self.embedder.embed_tensors(images)
        return mu, image_uncertainty(sigma)

    def lookup(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Stored ``(mu, uncertainty)`` of indexed images; UnknownIdError names the missing ones."""
        try:
            return self._unless_changed(lambda: self.searcher.lookup(ids))
        except ValueError as e:  # lookup's only ValueError: ids not in this version
            raise UnknownIdError(str(e)) from None

    def search(self, mu: np.ndarray, uncertainty: np.ndarray, k: int, *, rerank: bool = False,
               exclude: Sequence[str | None] | None = None, names: Sequence[str] | None = None,
               min_confidence: float | None = None) -> list[QueryResult]:
        return self._unless_changed(lambda: self.searcher.search(
            mu, uncertainty, k, rerank=rerank, exclude=exclude, names=names, min_confidence=min_confidence))

    def changed_files(self) -> list[str]:
        """Files this index reads (memory-mapped lists and vectors, embeddings read per lookup)
        that changed on disk since they were checked."""
        return self.searcher.changed_files()

    def _unless_changed(self, answer: Callable[[], T]) -> T:
        """``answer()``, or IndexChangedError when a file it may have read changed on disk since
        it was checked: asked after the read, so a write during it counts too (a damaged file may
        also make the read fail, with any error)."""
        try:
            result = answer()
        except Exception:
            self._refuse_if_changed()
            raise
        self._refuse_if_changed()
        return result

    def _refuse_if_changed(self) -> None:
        changed = self.changed_files()
        if changed:
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise IndexChangedError(f"{changed[0]}{more} of index {self.version} changed on disk since it was "
                                    "checked; answers are withheld until it is checked again")

    def describe(self) -> dict[str, Any]:
        """What a health check reports: the version, its size, and the model answering for it."""
        recorded = self.searcher.manifest["checkpoint"]
        return {"version": self.version, "vectors": len(self.searcher), "index_type": self.searcher.spec.index_type,
                "refine": self.searcher.spec.refine if self.searcher.index.rescores else 0,
                "uncertainty_weight": self.searcher.uncertainty_weight,
                "confidence": self.searcher.confidence is not None,  # whether answers carry one (min_confidence works)
                "model": {"checkpoint": self.checkpoint, "sha256": self.checkpoint_sha256,
                          **{k: recorded.get(k) for k in ("backbone", "embedding_dim", "image_size", "epoch")}},
                "loaded_at": self.loaded_at}


def results_as_dicts(results: list[QueryResult]) -> list[dict[str, Any]]:
    """JSON-ready results: per query its uncertainty and hits (id, similarity, cosine, uncertainty)."""
    return [asdict(r) for r in results]


class IndexFollower:
    """The index a service answers from, kept current by ``poll()``: a newly published version is
    loaded, and the served one is opened again when files it reads changed on disk (the open checks
    them: a damaged merged cache is merged again from the version's shards, damaged shards are
    refused). Until then the old one answers, or withholds its answers (``IndexChangedError``) when
    its own files changed. A load that failed is retried only once something changes: another
    version is published, or the changed files change again. ``load(version, previous)`` loads
    one (``previous``: the served one, whose model it may keep)."""

    def __init__(self, index_dir: str | os.PathLike, load: Callable[[str | None, ServedIndex | None], ServedIndex],
                 log: logging.Logger | None = None):
        self.store = IndexStore(index_dir)
        self.load = load
        self.log = log or logging.getLogger(__name__)
        self.served = load(None, None)
        self.reload_error: str | None = None
        self._failed: tuple | None = None  # what the last failed load tried: (version, files' stat)

    def poll(self) -> None:
        """One check (blocking: a service runs it off its event loop); never raises."""
        version, attempt = None, None
        try:
            version = self.store.current_version()
            served = self.served
            changed = served.changed_files() if version == served.version else []
            if version is None or (version == served.version and not changed):
                return
            attempt = (version, tuple(_stat_now(changed)))
            if attempt == self._failed:
                return
            started = time.monotonic()
            self.served = self.load(version, served)
            self._failed, self.reload_error = None, None
            if changed:
                self.log.warning("%s of index %s changed on disk: checked again and reloaded in %.1fs", changed[0],
                                 version, time.monotonic() - started)
            else:
                self.log.info("now serving index %s (loaded in %.1fs)", version, time.monotonic() - started)
        except Exception as e:  # noqa: BLE001 - keep serving the old version (or withholding), say why in /health
            error = f"index {version or '(CURRENT unreadable)'} not loaded: {type(e).__name__}: {e}"
            if error != self.reload_error:
                self.log.warning("%s; still serving %s", error, self.served.version)
            self._failed, self.reload_error = attempt or (version, ()), error

    def health(self) -> dict[str, Any]:
        """What /health reports: the served version, files of it changed on disk (answers
        withheld meanwhile), and why the last load failed."""
        changed = self.served.changed_files()
        return {"status": "withholding answers" if changed else "ok", **self.served.describe(),
                "changed_files": changed, "reload_error": self.reload_error}


def _stat_now(paths: list[str]) -> list[tuple | None]:
    signatures = []
    for path in paths:
        try:
            signatures.append(stat_signature(os.stat(path), ctime=True))
        except OSError:
            signatures.append(None)
    return signatures
