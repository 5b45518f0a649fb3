"""faiss shards: the index spec, building one shard per embedding partition, combining them.

Vectors are L2-normalised ``mu``; the metric is inner product (= cosine). Every vector carries
the label ``shard << 32 | row`` (its shard number and its row in the shard's embedding file), so
the label alone finds the id and the uncertainty, in sharded and merged indexes alike, and a
shard reused unchanged by a later version keeps its labels.

Small corpora get exact ``Flat`` shards; large ones ``IVF<nlist>,Flat`` shards that share one
coarse quantizer trained on a sample, searched together with ``IndexShardsIVF`` (one coarse
search, then every shard's lists) or merged into one on-disk IVF (``faiss.contrib.ondisk``).

GPUs (with ``faiss-gpu``: ``pip install 'idml[gpu]'``): k-means, the expensive part of an IVF
build, runs on every GPU faiss sees; searching a Flat index runs on them when asked
(``combine(..., gpu=True)``, ``idml index query --gpu``). IVF shards are always searched on the
CPU: their lists are memory-mapped files, which is what keeps an index bigger than RAM (or than
GPU memory) searchable.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..faiss_import import faiss

log = logging.getLogger(__name__)

INDEX_TYPES = ("auto", "flat", "ivf")
# Up to here exact search costs ~n*d flops per query (about 3 ms on two CPU cores at d=512),
# cheap enough to keep every answer exact.
FLAT_MAX_VECTORS = 200_000
SHARD_BITS = 32
ROW_MASK = (1 << SHARD_BITS) - 1
# faiss warns below 39 training points per centroid; 64 gives stabler centroids at little cost.
TRAIN_POINTS_PER_LIST = 64


@dataclass
class IndexSpec:
    index_type: str  # "flat" or "ivf"
    dim: int
    nlist: int = 0
    nprobe: int = 0  # 0 = not yet tuned
    nprobe_auto: bool = True  # tuned on the recall sample (to target_recall) at every build/update
    train_size: int = 0
    niter: int = 10
    seed: int = 1234
    metric: str = "inner_product"
    target_recall: float = 0.95

    @property
    def factory(self) -> str:
        return "IDMap,Flat" if self.index_type == "flat" else f"IVF{self.nlist},Flat"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "factory": self.factory, "faiss_version": faiss.__version__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IndexSpec":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def default_nlist(n: int) -> int:
    """The power of two nearest sqrt(n), with at least TRAIN_POINTS_PER_LIST points per list.

    faiss suggests 4..16*sqrt(n) for the fastest queries; on CPU, training and adding cost
    O(n * nlist * d) and dominate the build, so the default is the cheap end (raise --nlist on
    a GPU or a big machine).
    """
    nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(n)))))
    return int(max(1, min(nlist, n // TRAIN_POINTS_PER_LIST)))


def resolve_spec(index_type: str, n: int, dim: int, *, nlist: int | None = None, nprobe: int | None = None,
                 train_size: int | None = None, target_recall: float = 0.95) -> IndexSpec:
    """Pick the index for ``n`` vectors: ``auto`` is Flat up to FLAT_MAX_VECTORS, IVF above."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index type {index_type!r} is not one of {', '.join(INDEX_TYPES)}")
    if n < 1:
        raise ValueError("nothing to index: the corpus has no readable images")
    kind = index_type if index_type != "auto" else ("flat" if n <= FLAT_MAX_VECTORS else "ivf")
    if kind == "flat":
        return IndexSpec("flat", dim, nprobe=0, nprobe_auto=False, target_recall=target_recall)
    nlist = int(nlist or default_nlist(n))
    if nlist < 1 or nlist > n:
        raise ValueError(f"nlist={nlist} must be between 1 and the number of vectors ({n})")
    train = int(min(n, train_size or TRAIN_POINTS_PER_LIST * nlist))
    if train < nlist:
        raise ValueError(f"train_size={train} is below nlist={nlist}; k-means needs at least one point per list")
    if nprobe is not None and not 1 <= nprobe <= nlist:
        raise ValueError(f"nprobe={nprobe} must be between 1 and nlist={nlist}")
    return IndexSpec("ivf", dim, nlist=nlist, nprobe=int(nprobe or 0), nprobe_auto=nprobe is None,
                     train_size=train, target_recall=target_recall)


def gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def labels_for(shard: int, n: int) -> np.ndarray:
    return (np.int64(shard) << SHARD_BITS) | np.arange(n, dtype=np.int64)


def split_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, np.int64)
    return labels >> SHARD_BITS, labels & ROW_MASK


def train_ivf(sample: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """An empty IVF index whose coarse quantizer is trained on ``sample`` (k-means)."""
    index = faiss.index_factory(spec.dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = spec.niter
    ivf.cp.seed = spec.seed
    ivf.cp.max_points_per_centroid = max(1, math.ceil(len(sample) / spec.nlist))
    clustering = None
    if gpu_count():
        # k-means is the expensive part of an IVF build; the GPU clusters ~100x faster.
        clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(spec.dim))
        ivf.clustering_index = clustering
    index.train(np.ascontiguousarray(sample, np.float32))
    if clustering is not None:
        ivf.clustering_index = None
    return index


def new_shard_index(spec: IndexSpec, trained: faiss.Index | None) -> faiss.Index:
    if spec.index_type == "flat":
        return faiss.IndexIDMap(faiss.IndexFlatIP(spec.dim))
    if trained is None:
        raise ValueError("an IVF shard needs the trained quantizer")
    return faiss.clone_index(trained)


def build_shard(mu: np.ndarray, shard: int, spec: IndexSpec, trained: faiss.Index | None) -> faiss.Index:
    index = new_shard_index(spec, trained)
    if len(mu):
        index.add_with_ids(np.ascontiguousarray(mu, np.float32), labels_for(shard, len(mu)))
    return index


def write_index_atomic(index: faiss.Index, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def read_index(path: str | os.PathLike, *, mmap: bool = False) -> faiss.Index:
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set nprobe on an IVF index, on every shard of an IndexShardsIVF; no-op for Flat."""
    if nprobe <= 0:
        return
    if isinstance(index, faiss.IndexShardsIVF):
        for i in range(index.count()):
            faiss.extract_index_ivf(index.at(i)).nprobe = nprobe
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe


@dataclass
class CombinedIndex:
    """A searchable view of all shards (faiss does not own the Python shard objects, so this
    keeps them alive)."""

    index: faiss.Index
    spec: IndexSpec
    parts: list[Any] = field(default_factory=list)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        if nprobe:
            set_nprobe(self.index, nprobe)
        k = min(k, self.ntotal)
        return self.index.search(np.ascontiguousarray(queries, np.float32), k)


def combine(shards: list[faiss.Index], spec: IndexSpec, trained: faiss.Index | None, *, gpu: bool = False) -> CombinedIndex:
    """Search shards as one index (labels are global already, so no id shifting). ``gpu``: Flat
    shards are copied to every GPU faiss sees (each shard split across them)."""
    if gpu:
        if not gpu_count():
            raise ValueError("--gpu: faiss sees no GPU (faiss-cpu is installed, or no GPU is visible); "
                             "install faiss-gpu with `pip install 'idml[gpu]'` on a CUDA 12 machine")
        if spec.index_type != "flat":
            raise ValueError("--gpu searches exact (Flat) indexes; this IVF index is searched on the CPU "
                             "(its lists are memory-mapped)")
        shards = [faiss.index_cpu_to_all_gpus(shard) for shard in shards]
    if spec.index_type == "flat":
        combined = faiss.IndexShards(spec.dim, False, False)
        parts: list[Any] = list(shards)
    else:
        quantizer = faiss.extract_index_ivf(trained).quantizer
        combined = faiss.IndexShardsIVF(quantizer, spec.nlist, False, False)
        parts = [trained, quantizer, *shards]
    for shard in shards:
        combined.add_shard(shard)
    set_nprobe(combined, spec.nprobe)
    return CombinedIndex(combined, spec, parts)


def merge_ondisk(trained_path: Path, shard_paths: list[Path], out_dir: Path, spec: IndexSpec) -> CombinedIndex:
    """IVF shards merged into one index whose lists live in ``out_dir/merged.ivfdata`` (mmapped),
    for serving more vectors than fit in RAM. Built once, into a temporary folder renamed into
    place, then reused."""
    from faiss.contrib.ondisk import merge_ondisk as _merge

    if spec.index_type != "ivf":
        raise ValueError("only IVF shards can be merged on disk; a Flat index is searched as shards")
    index_path = out_dir / "merged.index"
    if not index_path.is_file():
        tmp_dir = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        trained = faiss.read_index(str(trained_path))
        _merge(trained, [str(p) for p in shard_paths], str(tmp_dir / "merged.ivfdata"))
        faiss.write_index(trained, str(tmp_dir / "merged.index"))
        del trained
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp_dir, out_dir)
    # ONDISK_SAME_DIR finds the lists next to the index after the rename (IO_FLAG_MMAP would
    # crash on on-disk lists in faiss 1.15).
    index = faiss.read_index(str(index_path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    set_nprobe(index, spec.nprobe)
    return CombinedIndex(index, spec)


class ExactTopK:
    """Exact inner-product top-k of ``queries`` over vectors added part by part (one part in
    memory at a time). Missing neighbours have label -1 and score -inf."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = np.ascontiguousarray(queries, np.float32)
        self.k = k
        self.heap = faiss.ResultHeap(len(self.queries), k, keep_max=True) if len(self.queries) else None

    def add(self, vecs: np.ndarray, labels: np.ndarray) -> None:
        if self.heap is None or not len(vecs):
            return
        dist, idx = faiss.knn(self.queries, np.ascontiguousarray(vecs, np.float32), min(self.k, len(vecs)),
                              metric=faiss.METRIC_INNER_PRODUCT)
        self.heap.add_result(dist, np.where(idx >= 0, np.asarray(labels)[np.maximum(idx, 0)], -1))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.heap is None:
            return np.zeros((0, self.k), np.float32), np.zeros((0, self.k), np.int64)
        self.heap.finalize()
        return self.heap.D, self.heap.I


def exact_topk(queries: np.ndarray, parts, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``ExactTopK`` over an iterable of (vectors, labels)."""
    acc = ExactTopK(queries, k)
    for vecs, labels in parts:
        acc.add(vecs, labels)
    return acc.result()
