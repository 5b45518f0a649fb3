"""The query workflow (``idml index query``): top-k neighbours of indexed ids or of query images
(embedded with the index's checkpoint), optionally re-ranked by the introspective distance."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from idml.data.source import filesystem_for
from idml.files import file_sha256
from idml.inference import Embedder, image_uncertainty
from idml.registry import resolve_checkpoint

from .search import IndexSearcher, QueryResult


@dataclass
class QueryRequest:
    index_dir: str | os.PathLike
    ids: list[str] | None = None  # indexed images (each is left out of its own results) ...
    images: list[str] | None = None  # ... or image files/URIs: exactly one of the two
    version: str | None = None  # default: the published one
    checkpoint: str | None = None  # embeds ``images`` (default: the index's; its hash must match)
    k: int = 10
    rerank: bool = False  # re-rank candidates by the introspective distance
    rerank_k: int | None = None  # candidates re-ranked (default: max(10k, 100))
    uncertainty_weight: float | None = None  # lambda of the re-ranking (default: the checkpoint's)
    nprobe: int | None = None  # IVF: override the version's tuned value
    refine: int | None = None  # lossy codes: candidates re-scored per result (default: the version's)
    combine: str = "auto"  # how the shards are searched together (search.IndexSearcher)
    gpu: bool = False  # search an exact (Flat) index on the GPUs faiss sees
    min_confidence: float | None = None  # abstain (no hits) below this P(top-1 right)


@dataclass
class QueryResponse:
    version: str
    vectors: int
    uncertainty_weight: float | None  # the re-ranking's lambda; None when not re-ranked
    results: list[QueryResult]

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "results": [asdict(r) for r in self.results]}


def query_index(request: QueryRequest) -> QueryResponse:
    if (request.ids is None) == (request.images is None):
        raise ValueError("query by --ids or by --images (one of the two)")
    searcher = IndexSearcher(request.index_dir, request.version, combine=request.combine, nprobe=request.nprobe,
                             gpu=request.gpu, refine=request.refine)
    if request.ids is not None:
        mu, u = searcher.lookup(request.ids)
        names, exclude = list(request.ids), list(request.ids)
    else:
        mu, u = _embed_query_images(searcher.manifest, request.images, request.checkpoint)
        names, exclude = list(request.images), None
    results = searcher.search(mu, u, request.k, rerank=request.rerank, rerank_k=request.rerank_k,
                              uncertainty_weight=request.uncertainty_weight, exclude=exclude, names=names,
                              min_confidence=request.min_confidence)
    weight = request.uncertainty_weight if request.uncertainty_weight is not None else searcher.uncertainty_weight
    return QueryResponse(searcher.version, len(searcher), weight if request.rerank else None, results)


def _embed_query_images(manifest: dict, images: list[str], checkpoint: str | None) -> tuple[np.ndarray, np.ndarray]:
    blobs = [_read_query_image(image) for image in images]  # a wrong path is refused before the model loads
    path = checkpoint_for_index(manifest, checkpoint)
    mu, sigma = Embedder(path).embed_images(blobs, names=[f"query image {i}" for i in images])
    return mu, image_uncertainty(sigma)


def _read_query_image(image: str) -> bytes:
    fs, path = filesystem_for(image)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"query image {image} does not exist")
    if kind != pafs.FileType.File:
        raise IsADirectoryError(f"query image {image} is a folder; pass image files")
    with fs.open_input_stream(path) as f:
        return f.read()


def checkpoint_for_index(manifest: dict[str, Any], checkpoint: str | os.PathLike | None = None) -> str:
    """A local file holding the model that embeds queries for an index version: ``checkpoint``
    when given (a path, a shared-storage URI or an MLflow model URI: ``idml.registry``), else the
    path the version's manifest records. Either way its sha256 must be the one the version was
    built with: vectors from another model are not comparable with the index's."""
    recorded = manifest["checkpoint"]
    try:
        path = str(resolve_checkpoint(checkpoint if checkpoint is not None else recorded["path"]))
    except FileNotFoundError:
        if checkpoint is not None:
            raise
        raise FileNotFoundError(f"checkpoint {recorded['path']} of index version {manifest['version']} does not "
                                "exist; pass the model with --checkpoint") from None
    if file_sha256(path) != recorded["sha256"]:
        raise ValueError(f"checkpoint {checkpoint or path} is not the one index version {manifest['version']} was built "
                         f"with (sha256 {recorded['sha256'][:12]}…); pass that checkpoint with --checkpoint")
    return path
