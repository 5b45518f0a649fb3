"""The search service on Ray Serve: HTTP search over a published index version, by uploaded image
or by indexed id, re-loaded without a restart when a new version is published.

    serve run pipelines.serve:app index_dir=/shared/idx [checkpoint=...] [replicas=2] ...
    idml serve --index-dir /shared/idx                        # the same on a local Ray instance

Endpoints (every error is a 4xx/5xx with ``{"detail": "..."}``):

- ``POST /search?k=10&rerank=false``: the body is one encoded image (any content type), or
  JSON ``{"images": ["<base64>", ...]}`` (``Content-Type: application/json``) for several.
- ``GET /search/id/{id}?k=10&rerank=false``: neighbours of an indexed image (itself left out).
- ``GET /health``: the version answering, its vectors, the model; ``changed_files`` (answers
  withheld meanwhile) and ``reload_error``.

Each replica loads the model and the published version once (``idml.index.serving.ServedIndex``)
and embeds the images of concurrent requests in batches (``@serve.batch``). A background task
polls the index's ``CURRENT`` pointer; a new version is loaded off the event loop (the model
too, if the version was built with another checkpoint) and replaces the old one in a single
assignment: requests already running finish on the old one, none waits or fails. The same task
stats the files the served version reads (memory-mapped lists and vectors): one changed since it
was checked is checked again by loading the version again (a damaged merged cache is merged again
from the shards), and until then requests get 503, never an answer read from it
(``idml.index.serving.IndexFollower``).

The service has no authentication: it binds to 127.0.0.1 by default; expose it only behind a
proxy that authenticates.
"""

# No `from __future__ import annotations`: Serve reads the builder's parameter annotation as a
# class to validate `serve run ... key=value` arguments with it.

import asyncio
import base64
import binascii
import functools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve import Application

from idml.data.images import InvalidImageError
from idml.index import IndexStore
from idml.registry import is_model_uri
from idml.index.query import checkpoint_for_index
from idml.index.serving import IndexChangedError, IndexFollower, ServedIndex, UnknownIdError, results_as_dicts
from idml.tracking import tracking_uri

log = logging.getLogger("ray.serve")  # a replica's ray.serve logger writes to its log file

APP_NAME = "idml-search"
MAX_ONGOING_REQUESTS = 64  # per replica; enough to fill a batch (Serve's default is 5)


class ServeOptions(BaseModel):
    """The service's options: ``idml serve`` flags, or ``serve run pipelines.serve:app key=value``."""

    model_config = ConfigDict(extra="forbid")

    index_dir: str = Field(description="folder holding the index versions (shared storage on a cluster)")
    checkpoint: str | None = Field(None, description="model: a path, shared-storage URI or models:/NAME@alias "
                                                     "(default: the file the index manifest records; its sha256 "
                                                     "must match the manifest's)")
    replicas: int = Field(1, ge=1, description="Serve replicas; each loads the model and the index")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs each replica reserves")
    poll_s: float = Field(1.0, gt=0, description="seconds between checks for a newly published index version")
    max_bytes: int = Field(16 * 2**20, ge=1, description="largest request body (413 above)")
    max_k: int = Field(100, ge=1, description="largest k a request may ask for")
    max_images: int = Field(16, ge=1, description="most images in one JSON request")
    refine: int | None = Field(None, ge=0, description="lossy indexes (PQ, SQ): candidates per result re-scored by "
                                                       "exact cosine (default: the version's; 0 or 1: off)")
    max_batch_size: int = Field(16, ge=1, description="most images embedded in one model call")
    batch_wait_s: float = Field(0.005, ge=0, description="how long a batch waits for more images")

    @field_validator("index_dir", "checkpoint")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        # Replicas do not run in the caller's working folder; URIs (s3://, models:/) stay as they are.
        if value is None or ":/" in value:
            return value
        return str(Path(value).expanduser().resolve())


def check_servable(options: ServeOptions) -> str:
    """Fail before deploying (on the driver) when there is nothing to serve: no published
    version, or no usable checkpoint for it. Returns the version."""
    manifest = IndexStore(options.index_dir).read_manifest()
    checkpoint_for_index(manifest, options.checkpoint)
    return manifest["version"]


def load_served(options: ServeOptions, version: str | None = None, previous: ServedIndex | None = None) -> ServedIndex:
    """``version`` (default: the published one) searched as ``options`` say: with their model and
    re-scoring depth. A replica loads every version through here, the first and each new one."""
    return ServedIndex.load(options.index_dir, version, checkpoint=options.checkpoint, refine=options.refine,
                            previous=previous)


api = FastAPI(title="idml search", description="Nearest neighbours in a published idml index, by image or by id")


@api.exception_handler(InvalidImageError)
async def _not_an_image(request: Request, error: InvalidImageError) -> JSONResponse:
    return JSONResponse({"detail": f"not a usable image: {error}"}, status_code=400)


@api.exception_handler(UnknownIdError)
async def _unknown_id(request: Request, error: UnknownIdError) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=404)


@api.exception_handler(IndexChangedError)
async def _index_changed(request: Request, error: IndexChangedError) -> JSONResponse:
    # Never an answer read from a file changed since it was checked: the watcher checks it again.
    return JSONResponse({"detail": str(error)}, status_code=503)


@api.exception_handler(Exception)
async def _internal(request: Request, error: Exception) -> JSONResponse:
    log.exception("request %s %s failed", request.method, request.url.path)
    return JSONResponse({"detail": f"internal error: {type(error).__name__}: {error}"}, status_code=500)


def search_body(content_type: str, body: bytes, *, max_images: int) -> tuple[list[bytes], list[str]]:
    """The encoded images of a ``POST /search`` body and their names in the answer: the body
    itself, or JSON ``{"images": [base64, ...]}``. Whatever the bytes, the outcome is the images or
    an ``HTTPException`` (400, 413), never another error (a 500). Defined above ``SearchService``:
    Serve serializes the class when it is decorated, with only the names defined by then."""
    if content_type.split(";")[0].strip().lower() == "application/json":
        blobs = images_from_json(body, max_images=max_images)
        return blobs, [f"image {i}" for i in range(len(blobs))]
    if not body:
        raise HTTPException(400, "empty body: send an encoded image, or JSON {\"images\": [base64, ...]}")
    return [body], ["image"]


def images_from_json(body: bytes, *, max_images: int) -> list[bytes]:
    try:
        data = json.loads(body)
    except RecursionError:  # e.g. [[[[...]]]] nested 100,000 levels deep
        raise HTTPException(400, "body is not usable JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise HTTPException(400, f"body is not valid JSON: {' '.join(str(e).split())[:200]}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        raise HTTPException(400, "JSON body must be {\"images\": [\"<base64 image>\", ...]} with at least one image")
    if len(images) > max_images:
        raise HTTPException(413, f"{len(images)} images in one request; at most {max_images}")
    blobs = []
    for i, text in enumerate(images):
        try:
            blobs.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as e:
            raise HTTPException(400, f"images[{i}] is not valid base64: {e}") from None
    return blobs


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS, health_check_period_s=10)
@serve.ingress(api)
class SearchService:
    async def __init__(self, options: dict[str, Any]):
        self.options = ServeOptions(**options)
        self.follower = await asyncio.to_thread(IndexFollower, self.options.index_dir,
                                                functools.partial(load_served, self.options), log)
        self._embed_batch.set_max_batch_size(self.options.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(self.options.batch_wait_s)
        self._watcher = asyncio.get_running_loop().create_task(self._follow_published_version())
        log.info("serving index %s (%d vectors)", self.served.version, len(self.served.searcher))

    @property
    def served(self) -> ServedIndex:
        return self.follower.served

    # -- endpoints ----------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return self.follower.health()

    @api.post("/search")
    async def search_images(self, request: Request, k: int = 10, rerank: bool = False,
                            min_confidence: float | None = None) -> dict[str, Any]:
        served = self.served  # this request answers from this version, whatever is published meanwhile
        self._check_k(k)
        self._check_min_confidence(served, min_confidence)
        body = await self._read_body(request)
        blobs, names = search_body(request.headers.get("content-type", ""), body, max_images=self.options.max_images)
        images = await asyncio.to_thread(lambda: [served.prepare(b) for b in blobs])
        embedded = await asyncio.gather(*(self._embed_batch((served, image)) for image in images))
        mu = np.stack([m for m, _ in embedded])
        uncertainty = np.array([u for _, u in embedded], np.float32)
        results = await asyncio.to_thread(served.search, mu, uncertainty, k, rerank=rerank, names=names,
                                          min_confidence=min_confidence)
        return self._answer(served, results, k, rerank)

    @api.get("/search/id/{item_id:path}")
    async def search_id(self, item_id: str, k: int = 10, rerank: bool = False,
                        min_confidence: float | None = None) -> dict[str, Any]:
        served = self.served
        self._check_k(k)
        self._check_min_confidence(served, min_confidence)
        mu, uncertainty = await asyncio.to_thread(served.lookup, [item_id])
        results = await asyncio.to_thread(served.search, mu, uncertainty, k, rerank=rerank, exclude=[item_id],
                                          names=[item_id], min_confidence=min_confidence)
        return self._answer(served, results, k, rerank)

    # -- batching and reloading ---------------------------------------------------------------
    @serve.batch  # batch size and wait: set from the options in __init__
    async def _embed_batch(self, items: list[tuple[ServedIndex, torch.Tensor]]) -> list[tuple[np.ndarray, float]]:
        """One model call per served version in the batch (two only while a swap is under way)."""
        out: list[Any] = [None] * len(items)
        for served in {id(s): s for s, _ in items}.values():
            rows = [i for i, (s, _) in enumerate(items) if s is served]
            batch = torch.stack([items[i][1] for i in rows])
            mu, uncertainty = await asyncio.to_thread(served.embed, batch)
            for j, i in enumerate(rows):
                out[i] = (mu[j], float(uncertainty[j]))
        return out

    async def _follow_published_version(self) -> None:
        # A new version, or files of the served one changed on disk (IndexFollower.poll).
        while True:
            await asyncio.sleep(self.options.poll_s)
            await asyncio.to_thread(self.follower.poll)

    def check_health(self) -> None:
        """Serve restarts a replica whose check fails: one that stopped following new versions."""
        if self._watcher.done():
            raise RuntimeError("the index version watcher stopped")

    # -- request parsing ----------------------------------------------------------------------
    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.options.max_k:
            raise HTTPException(400, f"k must be between 1 and {self.options.max_k}, got {k}")

    @staticmethod
    def _check_min_confidence(served: ServedIndex, min_confidence: float | None) -> None:
        if min_confidence is None:
            return
        if not 0 <= min_confidence <= 1:  # NaN fails this too
            raise HTTPException(400, f"min_confidence must be a probability in [0, 1], got {min_confidence}")
        if served.searcher.confidence is None:
            raise HTTPException(400, f"index {served.version}'s model has no confidence to abstain by (trained "
                                     "without a validation split, or before confidences existed)")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.options.max_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"request body of {int(declared)} bytes is over the limit of {limit}")
        body = bytearray()
        async for chunk in request.stream():  # a body without a declared length is cut off too
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"request body is over the limit of {limit} bytes")
        return bytes(body)

    def _answer(self, served: ServedIndex, results, k: int, rerank: bool) -> dict[str, Any]:
        return {"version": served.version, "k": k, "rerank": rerank,
                "uncertainty_weight": served.searcher.uncertainty_weight, "results": results_as_dicts(results)}


def app(options: ServeOptions) -> Application:
    """The Serve application (an app builder: ``serve run pipelines.serve:app index_dir=DIR``)."""
    check_servable(options)
    actor: dict[str, Any] = {"num_cpus": options.cpus_per_replica}
    if options.checkpoint and is_model_uri(options.checkpoint):
        # Replicas resolve models:/ and runs:/ themselves, against the tracking server the driver used.
        actor["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri()}}
    deployment = SearchService.options(num_replicas=options.replicas, ray_actor_options=actor)
    return deployment.bind(options.model_dump())
