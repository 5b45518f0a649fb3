"""What a search service holds and does, without Ray or HTTP: one published index version and the
model that embeds queries for it, loaded together and replaced together (``pipelines.serve``
puts this behind Ray Serve)."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .. import metric  # noqa: F401 - the re-rank imports it on first use; seconds a request should not wait
from ..data.images import decode_image
from ..inference import Embedder
from ..metric import image_uncertainty
from .query import checkpoint_for_index
from .search import IndexSearcher, QueryResult

class UnknownIdError(LookupError):
    """A queried id is not in the served index version."""


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
            return self.searcher.lookup(ids)
        except ValueError as e:  # lookup's only ValueError: ids not in this version
            raise UnknownIdError(str(e)) from None

    def search(self, mu: np.ndarray, uncertainty: np.ndarray, k: int, *, rerank: bool = False,
               exclude: Sequence[str | None] | None = None, names: Sequence[str] | None = None,
               min_confidence: float | None = None) -> list[QueryResult]:
        return self.searcher.search(mu, uncertainty, k, rerank=rerank, exclude=exclude, names=names,
                                    min_confidence=min_confidence)

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
