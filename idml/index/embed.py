"""Embedding a batch of encoded images with a trained checkpoint.

``BatchEmbedder`` is a plain callable class (no Ray) on top of ``idml.inference.Embedder``: Ray
Data runs it in ``map_batches`` on an actor pool (the model loads once per actor), and the
benchmark and the in-process build run the same object in a plain loop.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch

from idml.checkpoint import checkpoint_config, load_checkpoint
from idml.data.images import InvalidImageError, decode_image
from idml.files import file_sha256
from idml.inference import Embedder
from idml.registry import is_model_uri

log = logging.getLogger(__name__)

STATUS_EMBEDDED = "embedded"
STATUS_CORRUPT = "corrupt"
# The row's (id, content hash) is already embedded (a previous version or a finished partition
# of an interrupted run): it is listed but not decoded again.
STATUS_KNOWN = "known"

OUTPUT_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("content_hash", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("mu", pa.list_(pa.float32())),
    pa.field("sigma", pa.list_(pa.float32())),
    pa.field("file", pa.string()),  # the corpus file the row came from (null when the input does not say)
])


def content_hash(data: bytes) -> str:
    """Identity of an image's content: ``update`` re-embeds an id only when this changes."""
    return hashlib.sha256(data).hexdigest()


def describe_checkpoint(path: str | Path, state: Mapping[str, Any] | None = None, *, ref: str | None = None,
                        model: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What an index records about its model: the sha256 of the file pins it; ``path`` is what
    the user gave (``ref``: a path, made absolute, or a URI such as ``models:/NAME@alias`` or
    ``s3://...``, which ``idml.registry.resolve_checkpoint`` resolves again for queries and
    updates); ``model`` is ``idml.registry.describe_model(ref)`` (registered name, version and
    training run of an MLflow model); the rest is for people. ``state``: the checkpoint at
    ``path``, when already loaded."""
    state = load_checkpoint(path) if state is None else state
    cfg = checkpoint_config(dict(state))
    given = model_reference(ref if ref is not None else str(path))
    return {"path": given, "sha256": file_sha256(path), "backbone": cfg.model.backbone,
            "embedding_dim": cfg.model.embedding_dim, "image_size": cfg.data.image_size,
            "uncertainty_weight": cfg.loss.uncertainty_weight, "epoch": state.get("epoch"),
            # how confident a query may be of its top-1 hit (idml.evaluation.confidence): the
            # checkpoint's, recorded with the version so every query reads it without the model
            "confidence": state.get("confidence"),
            "model": dict(model) if model else {"model_uri": given}}


def model_reference(ref: str) -> str:
    """A checkpoint reference as a version records it: a URI (``models:/``, ``runs:/``, ``s3://``,
    ``file://`` ...) as given, a local path made absolute (so an update finds it from any folder)."""
    return ref if is_model_uri(ref) or "://" in ref else str(Path(ref).resolve())


def model_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """What embedding needs of a checkpoint (weights and config): a ``last.pt``'s optimizer
    state is left behind rather than shipped to every embedding actor."""
    return {k: state[k] for k in ("model", "config", "epoch") if k in state}


class BatchEmbedder(Embedder):
    """Maps a batch of encoded images to semantic (``mu``) and uncertainty (``sigma``) embeddings
    (the model side is ``idml.inference.Embedder``; this adds the index's batch protocol).

    Input batches (a ``pa.Table`` or a dict of columns) hold either ``id`` + ``image`` (the
    dataset format) or ``path`` + ``bytes`` (``read_binary_files``; the id is the path relative
    to ``id_prefix``). Output rows follow ``OUTPUT_SCHEMA``: corrupt images come back with status
    ``corrupt`` and the decoder's reason instead of failing the batch; rows whose (id, content
    hash) is in ``known`` come back as ``known`` without being decoded.
    """

    def __init__(self, checkpoint: str | Mapping[str, Any], *, known: pa.Table | None = None,
                 id_prefix: str | None = None, device: str | None = None, threads: int = 0,
                 channels_last: bool | None = None, precision: str = "auto", batch_size: int = 0,
                 delay_s: float = 0.0):
        super().__init__(checkpoint, device=device, threads=threads, channels_last=channels_last, precision=precision)
        self.known = dict(zip(known.column("id").to_pylist(), known.column("content_hash").to_pylist())) if known is not None else {}
        self.id_prefix = id_prefix
        # The model's batch: a longer input (a whole Ray Data block) is embedded in slices of this
        # many images, so Ray hands over one block per call without the model seeing larger batches.
        self.batch_size = int(batch_size)
        # Test hook: a slow embedder lets a test kill a build between two partitions.
        self.delay_s = float(delay_s)

    def __call__(self, batch) -> pa.Table:
        ids, blobs = batch_ids_and_images(batch, self.id_prefix)
        files = batch_files(batch, len(ids))
        n = len(ids)
        hashes = [content_hash(b) if b is not None else "" for b in blobs]
        status = [STATUS_KNOWN if self.known.get(i) == h else None for i, h in zip(ids, hashes)]
        errors: list[str | None] = [None] * n
        todo = [r for r in range(n) if status[r] is None]
        step = self.batch_size or max(1, len(todo))
        embedded, mus, sigmas = [], [], []
        for start in range(0, len(todo), step):
            rows, tensors = self._decode_rows(blobs, todo[start:start + step], status, errors)
            if tensors:
                mu, sigma = self.embed_tensors(torch.stack(tensors))
                embedded += rows
                mus.append(mu)
                sigmas.append(sigma)
            if self.delay_s:
                time.sleep(self.delay_s)
        mask = np.zeros(n, bool)
        mask[embedded] = True
        empty = np.zeros((0, self.dim), np.float32)
        return pa.table({
            "id": pa.array(ids, pa.string()),
            "content_hash": pa.array(hashes, pa.string()),
            "status": pa.array(status, pa.string()),
            "error": pa.array(errors, pa.string()),
            "mu": _sparse_list_array(np.concatenate(mus) if mus else empty, mask),
            "sigma": _sparse_list_array(np.concatenate(sigmas) if sigmas else empty, mask),
            "file": pa.array(files, pa.string()),
        }, schema=OUTPUT_SCHEMA)

    def _decode_rows(self, blobs, rows: list[int], status: list, errors: list) -> tuple[list[int], list[torch.Tensor]]:
        """Decoded, transformed images of ``rows`` (and those rows); a corrupt image is marked
        in ``status``/``errors`` instead."""
        decoded, tensors = [], []
        for r in rows:
            try:
                tensors.append(self.transform(decode_image(blobs[r])))
                decoded.append(r)
                status[r] = STATUS_EMBEDDED
            except InvalidImageError as e:
                status[r], errors[r] = STATUS_CORRUPT, str(e)
        return decoded, tensors


def batch_ids_and_images(batch, id_prefix: str | None = None) -> tuple[list[str], list[bytes]]:
    """(ids, encoded images) of a batch with ``id`` + ``image`` (the dataset format) or ``path``
    + ``bytes`` (``read_binary_files``; the id is the path relative to ``id_prefix``)."""
    columns = batch.column_names if isinstance(batch, pa.Table) else list(batch)

    def col(name):
        c = batch[name]
        return c.to_pylist() if isinstance(c, (pa.ChunkedArray, pa.Array)) else list(c)

    if "id" in columns and "image" in columns:
        return [str(i) for i in col("id")], col("image")
    if "path" in columns and "bytes" in columns:
        prefix = id_prefix.rstrip("/") + "/" if id_prefix else ""
        paths = [str(p) for p in col("path")]
        return [p[len(prefix):] if prefix and p.startswith(prefix) else p for p in paths], col("bytes")
    raise ValueError(f"batch has columns {columns}; expected id + image (dataset) or path + bytes (image files)")


def batch_files(batch, n: int) -> list[str | None]:
    """The ``path`` column of a batch (the file each row was read from), or nulls."""
    columns = batch.column_names if isinstance(batch, pa.Table) else list(batch)
    if "path" not in columns:
        return [None] * n
    c = batch["path"]
    return [str(p) for p in (c.to_pylist() if isinstance(c, (pa.ChunkedArray, pa.Array)) else list(c))]


def hash_batch(batch, id_prefix: str | None = None) -> pa.Table:
    """(id, content_hash) of every image in a batch, without decoding (``verify --corpus``)."""
    ids, blobs = batch_ids_and_images(batch, id_prefix)
    return pa.table({"id": pa.array(ids, pa.string()),
                     "content_hash": pa.array([content_hash(b) for b in blobs], pa.string())})


def embedded_batch(ids, hashes, mu: np.ndarray, sigma: np.ndarray) -> pa.Table:
    """Embedder-shaped output for vectors computed elsewhere (synthetic benchmarks)."""
    mask = np.ones(len(mu), bool)
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "content_hash": pa.array(hashes, pa.string()),
        "status": pa.array([STATUS_EMBEDDED] * len(mu), pa.string()),
        "error": pa.nulls(len(mu), pa.string()),
        "mu": _sparse_list_array(mu, mask),
        "sigma": _sparse_list_array(sigma, mask),
        "file": pa.nulls(len(mu), pa.string()),
    }, schema=OUTPUT_SCHEMA)


def _sparse_list_array(vectors: np.ndarray, mask: np.ndarray) -> pa.ListArray:
    """One list<float32> per row: the next vector where ``mask`` is set, null elsewhere."""
    lengths = np.where(mask, vectors.shape[1], 0)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(np.ascontiguousarray(vectors, np.float32).ravel())
    return pa.ListArray.from_arrays(offsets, values, type=pa.list_(pa.float32()), mask=pa.array(~mask))
