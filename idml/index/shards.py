"""Shards: the trained template every shard is a copy of, and building a shard from one embedding
partition (writing and opening its file: ``kinds.IndexKind``)."""

from __future__ import annotations

import math
import numpy as np

from ..errors import InputError
from ..faiss_import import faiss
from .faiss_io import faiss_reason, no_polysemous_training
from .gpu import gpu_count
from .labels import labels_for
from .spec import IndexSpec


def train_index(sample: np.ndarray | None, spec: IndexSpec) -> faiss.Index:
    """The empty index every shard is a copy of, trained on ``sample``: IVF's coarse quantizer
    (k-means) and any codes (PQ, SQ). An index with nothing to train needs no sample."""
    index = faiss.index_factory(spec.dim, spec.kind.template_factory(spec.factory), faiss.METRIC_INNER_PRODUCT)
    no_polysemous_training(index)
    if index.is_trained:
        return index
    if sample is None or not len(sample):
        raise ValueError(f"{spec.factory} needs training vectors")
    ivf = faiss.try_extract_index_ivf(index)
    clustering = None
    if ivf is not None:
        ivf.cp.niter = spec.niter
        ivf.cp.seed = spec.seed
        ivf.cp.max_points_per_centroid = max(1, math.ceil(len(sample) / spec.nlist))
        if gpu_count():
            # k-means is the expensive part of an IVF build; the GPU clusters ~100x faster.
            clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(spec.dim))
            ivf.clustering_index = clustering
    try:
        index.train(np.ascontiguousarray(sample, np.float32))
    except RuntimeError as e:  # e.g. fewer vectors than a PQ codebook has centroids
        raise InputError(f"--index {spec.factory}: faiss cannot train it on {len(sample)} vectors: {faiss_reason(e)}; "
                         "choose a smaller index (fewer lists, PQ<M>x4 codes) for this corpus") from None
    finally:
        if clustering is not None:
            ivf.clustering_index = None
    return index


def build_shard(mu: np.ndarray, shard: int, spec: IndexSpec, trained: faiss.Index | None) -> faiss.Index:
    index = spec.kind.new_shard(spec.dim, spec.factory, trained)
    if len(mu):
        index.add_with_ids(np.ascontiguousarray(mu, np.float32), labels_for(shard, len(mu)))
    return index

