"""Checking a faiss factory string before any embedding: built on a tiny random sample, it tells
the index's kind, its IVF lists, whether its codes are lossy or need training, and its memory."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..faiss_import import faiss
from .faiss_io import components, faiss_reason, no_polysemous_training, quantizer_stripped
from .kinds import kind_of
from .labels import SHARD_BITS

# Random vectors a factory string is built and searched on to check it (and to measure its bytes).
CHECK_SAMPLE = 1024
IDS_BYTES = 8  # every stored vector carries an int64 label


@dataclass(frozen=True)
class FactoryCheck:
    """What building a factory string on CHECK_SAMPLE random unit vectors showed."""

    factory: str  # without a leading IDMap (every shard gets its labels anyway)
    kind: str  # a kinds.KINDS name
    nlist: int  # IVF lists, 0 otherwise
    trains_codes: bool  # PQ, SQ codes need training (IVF-Flat, HNSW over full vectors do not)
    lossy: bool  # codes (PQ, SQ) approximate the vectors, and so the scores
    fixed_bytes: int  # serialized size of a shard with no vectors (codebooks, list headers)
    bytes_per_vector: float  # codes, label and (HNSW) links per added vector
    quantizer_bytes: int = 0  # IVF coarse centroids: once, in trained.faiss (shard files go without)

    def estimated_bytes(self, n: int, shards: int = 1) -> int:
        """Searched as ``shards`` shards: every shard file holds its own copy of the codebooks
        besides the one in trained.faiss; the coarse quantizer is held once."""
        return int(self.quantizer_bytes + self.fixed_bytes * (shards + 1) + n * self.bytes_per_vector)


def _stores_exact_vectors(index: faiss.Index) -> bool:
    """Flat storage (Flat, IVF-Flat lists, HNSW over Flat) keeps the vectors as they are, so its
    scores are exact; codes (PQ, SQ, ...) approximate them."""
    storage = list(components(index))[-1]
    return isinstance(storage, (faiss.IndexFlat, faiss.IndexIVFFlat))


@functools.lru_cache(maxsize=32)
def check_factory(factory: str, dim: int) -> FactoryCheck:
    """Build ``factory`` for ``dim``-d inner-product search on a tiny random sample: a string
    faiss cannot parse, build for this dimension, train, fill or search by inner product is
    refused (InputError, faiss's reason in one line). IVF lists are filled with random
    centroids instead of k-means, so the check costs well under a second even for IVF65536."""
    name = re.sub(r"^IDMap2?,", "", factory.replace(" ", ""))
    where = f"--index {factory!r}"
    try:
        index = faiss.index_factory(dim, name, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise InputError(f"{where}: faiss cannot build it for {dim}-d vectors: {faiss_reason(e)}; "
                         "see https://github.com/facebookresearch/faiss/wiki/The-index-factory") from None
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise InputError(f"{where}: faiss builds it with the L2 metric only, but idml searches by inner product "
                         "(cosine); choose another type (e.g. IVF4096,PQ64 or HNSW32)")
    kind = kind_of(index)
    if kind.shared_quantizer and not isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        # Shards share one coarse search (IndexShardsIVF) and merge on disk only as bare IVF indexes.
        raise InputError(f"{where}: idml shards bare IVF indexes; a pre-transform (OPQ, PCA) or a refine stage "
                         "(RFlat, Refine(...)) around IVF is not supported: drop it (e.g. IVF4096,PQ64)")
    if kind.exact:
        name = "Flat"
    index = faiss.index_factory(dim, kind.template_factory(name), faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((CHECK_SAMPLE, dim)).astype(np.float32)
    faiss.normalize_L2(sample)
    labels = np.arange(CHECK_SAMPLE, dtype=np.int64) + (np.int64(3) << SHARD_BITS)
    try:
        if ivf is not None and ivf.quantizer.is_trained and ivf.quantizer.ntotal == 0:
            centroids = rng.standard_normal((ivf.nlist, dim)).astype(np.float32)
            faiss.normalize_L2(centroids)
            ivf.quantizer.add(centroids)  # train() then skips k-means and trains only the codes
        no_polysemous_training(index)
        for part in components(index):
            if hasattr(part, "pq"):
                part.pq.cp.niter = 2  # the check needs codebooks that work, not good ones
                part.pq.cp.min_points_per_centroid = 0  # no "clustering 1024 points to 256 centroids" warnings
        # Codes that need training (PQ, SQ); IVF-Flat and HNSW over full vectors need none.
        needs_codec = not index.is_trained and not isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat)
        if not index.is_trained:
            index.train(sample)
        empty = len(faiss.serialize_index(index))
        with quantizer_stripped(index):
            empty_shard = len(faiss.serialize_index(index))
        index.add_with_ids(sample, labels)
        _, found = index.search(sample[:8], 4)
    except RuntimeError as e:
        raise InputError(f"{where}: faiss cannot build it on a sample of {CHECK_SAMPLE} {dim}-d vectors: "
                         f"{faiss_reason(e)}") from None
    if not np.isin(found[:, 0], labels).all():
        raise InputError(f"{where}: searching it found nothing on a sample of {CHECK_SAMPLE} vectors; "
                         "choose another type")
    lossy = not _stores_exact_vectors(index)
    if ivf is not None:
        # Per list, the stored lists carry an 8-byte size; a sample filling few lists would skew a
        # measured difference, so IVF is counted from its code size.
        return FactoryCheck(name, kind.name, int(ivf.nlist), bool(needs_codec), lossy, empty_shard + 8 * int(ivf.nlist),
                            float(ivf.code_size + IDS_BYTES), quantizer_bytes=empty - empty_shard)
    full = len(faiss.serialize_index(index))
    return FactoryCheck(name, kind.name, 0, bool(needs_codec), lossy, empty, (full - empty) / CHECK_SAMPLE)
