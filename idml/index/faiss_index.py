"""faiss shards: the index spec, building one shard per embedding partition, combining them.

Vectors are L2-normalised ``mu``; the metric is inner product (= cosine). Every vector carries
the label ``shard << 32 | row`` (its shard number and its row in the shard's embedding file), so
the label alone finds the id and the uncertainty, in sharded and merged indexes alike, and a
shard reused unchanged by a later version keeps its labels.

Small corpora get exact ``Flat`` shards; large ones ``IVF<nlist>,Flat`` shards that share one
coarse quantizer trained on a sample, searched together with ``IndexShardsIVF`` (one coarse
search, then every shard's lists) or merged into one on-disk IVF (``faiss.contrib.ondisk``).
The quantizer is stored once, in ``trained.faiss``: shard files are written without it
(``write_shard``) and get it back when read (``read_shard``).
Any faiss factory string searching by inner product works too (``check_factory``): IVF ones
(``IVF4096,PQ64``, ``IVF1024,SQ8``) share one trained index as above; others (``HNSW32``,
``PQ32``) get one IDMap-wrapped copy of a trained template per shard (an HNSW graph per shard),
searched together with ``IndexShards``. Under a memory budget ``choose_index`` picks Flat,
IVF-Flat or IVF-PQ; ``tune_search`` sets nprobe/efSearch for a recall target and latency budget.
Lossy codes (PQ, SQ) give approximate scores: such an index keeps every shard's exact vectors
beside it and re-scores ``refine`` x k candidates by exact cosine (``exact_vectors``).

GPUs (with ``faiss-gpu``: ``pip install 'idml[gpu]'``): k-means, the expensive part of an IVF
build, runs on every GPU faiss sees; searching a Flat index runs on them when asked
(``combine(..., gpu=True)``, ``idml index query --gpu``). IVF shards are always searched on the
CPU: their lists are memory-mapped files, which is what keeps an index bigger than RAM (or than
GPU memory) searchable.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import InputError
from ..filelock import exclusive
from ..faiss_import import faiss
from .labels import SHARD_BITS, labels_for, split_labels  # noqa: F401

if TYPE_CHECKING:
    from .exact_vectors import ShardVectors

log = logging.getLogger(__name__)

INDEX_SHORTHANDS = ("auto", "flat", "ivf")
# flat: exact; ivf: inverted lists, one trained index cloned into every shard and searched
# together (one coarse search); hnsw: a graph per shard; scan: compressed codes (PQ, SQ) scanned
# in full, per shard. hnsw and scan shards are IDMap-wrapped copies of one trained template.
INDEX_KINDS = ("flat", "ivf", "hnsw", "scan")
# Up to here exact search costs ~n*d flops per query (about 3 ms on two CPU cores at d=512),
# cheap enough to keep every answer exact.
FLAT_MAX_VECTORS = 200_000
# faiss warns below 39 training points per centroid; 64 gives stabler centroids at little cost.
TRAIN_POINTS_PER_LIST = 64
# A PQ/SQ codebook (2^8 centroids per sub-quantizer) trained on fewer points is noisy.
CODEC_TRAIN_POINTS = TRAIN_POINTS_PER_LIST * 256
# Random vectors a factory string is built and searched on to check it (and to measure its bytes).
CHECK_SAMPLE = 1024
IDS_BYTES = 8  # every stored vector carries an int64 label
EF_SEARCH_VALUES = (16, 32, 64, 128, 256, 512, 1024)
# Candidates per result re-scored by exact cosine when codes are lossy: on loose clusters (20k x
# 64, IVF64,PQ16) recall@10 vs exact goes 0.51 (1x) -> 0.85 (4x) -> 0.96 (10x), for reading 100
# stored vectors per query at k = 10 (microseconds of dot products, once the pages are cached).
DEFAULT_REFINE = 10
LATENCY_QUERIES = 32
# The least recall@10 the next nprobe/efSearch value must add for the tuning to go on below its
# target: 5 of the 2,560 neighbours the default 256-query sample checks.
PLATEAU_GAIN = 0.002
_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass
class IndexSpec:
    index_type: str  # one of INDEX_KINDS
    dim: int
    nlist: int = 0
    nprobe: int = 0  # 0 = not yet tuned
    nprobe_auto: bool = True  # nprobe (IVF) or efSearch (HNSW) tuned on the recall sample at every build/update
    train_size: int = 0  # 0: nothing to train (Flat, HNSW over full vectors)
    niter: int = 10
    seed: int = 1234
    metric: str = "inner_product"
    target_recall: float = 0.95
    index_factory: str = ""  # the faiss factory string; "" = the plain Flat/IVF-Flat of `factory` (older versions)
    ef_search: int = 0  # HNSW only; 0 = not yet tuned
    max_query_ms: float | None = None  # latency budget of the tuning (ms per single query)
    max_index_bytes: int | None = None  # --max-index-memory
    estimated_bytes: int = 0  # memory of the index for the vectors it was built for
    choice: str = ""  # why this index
    # Lossy codes (PQ, SQ): every shard's exact vectors are stored beside it and search re-scores
    # refine x k candidates by exact cosine. 0: scores are exact, or the codes' own (built with
    # --refine 0, or a version older than re-scoring): no vector files.
    refine: int = 0

    @property
    def factory(self) -> str:
        if self.index_factory:
            return self.index_factory
        return "IDMap,Flat" if self.index_type == "flat" else f"IVF{self.nlist},Flat"

    @property
    def search_param(self) -> str | None:
        """The faiss parameter that trades recall for speed, tuned at build time."""
        return {"ivf": "nprobe", "hnsw": "efSearch"}.get(self.index_type)

    @property
    def search_value(self) -> int:
        return self.nprobe if self.index_type == "ivf" else self.ef_search

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "factory": self.factory, "faiss_version": faiss.__version__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IndexSpec":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def parse_bytes(text: str | int) -> int:
    """``8GB`` (powers of 1000), ``8GiB`` (of 1024), or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS or float(match.group(1)) <= 0:
        raise InputError(f"memory size {text!r}: write a positive number with a unit, e.g. 8GB, 512MiB or 1.5TB")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def default_nlist(n: int) -> int:
    """The power of two nearest 4 * sqrt(n) (the low end of faiss's 4..16 * sqrt(n)), with at least
    TRAIN_POINTS_PER_LIST points per list.

    Lists of ~sqrt(n)/4 vectors: at 1M x 512 (docs/indexing.md) nprobe 1 of IVF4096 reached
    recall@10 0.99 at 89x exact search, where IVF1024 needed nprobe 4 for 0.98 at 11x. It costs
    build time: k-means grows with nlist^2 (48 s instead of 3 s on 2 CPUs there; a GPU clusters
    ~100x faster), so ``--nlist`` lower trades queries for a faster build.
    """
    nlist = 2 ** max(0, round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    return int(max(1, min(nlist, n // TRAIN_POINTS_PER_LIST)))


# -- factory strings ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FactoryCheck:
    """What building a factory string on CHECK_SAMPLE random unit vectors showed."""

    factory: str  # without a leading IDMap (every shard gets its labels anyway)
    kind: str  # one of INDEX_KINDS
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


def _faiss_reason(err: Exception) -> str:
    """faiss's message without its C++ location prefix, on one line."""
    text = " ".join(str(err).split())
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", text)


def _components(index: faiss.Index):
    """The index and the indexes it wraps (IDMap, pre-transforms, HNSW storage)."""
    index = faiss.downcast_index(index)
    yield index
    for attr in ("index", "storage"):
        inner = getattr(index, attr, None)
        if isinstance(inner, faiss.Index):
            yield from _components(inner)


def _no_polysemous_training(index: faiss.Index) -> None:
    # index_factory turns polysemous training on for IVF-PQ: minutes of CPU for a code ordering
    # only polysemous search (which idml does not use) benefits from.
    for part in _components(index):
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False


def _kind_of(index: faiss.Index) -> str:
    if faiss.try_extract_index_ivf(index) is not None:
        return "ivf"
    parts = list(_components(index))
    if any(isinstance(p, faiss.IndexHNSW) for p in parts):
        return "hnsw"
    top = parts[0]
    return "flat" if type(top) in (faiss.IndexFlat, faiss.IndexFlatIP) else "scan"


def _stores_exact_vectors(index: faiss.Index) -> bool:
    """Flat storage (Flat, IVF-Flat lists, HNSW over Flat) keeps the vectors as they are, so its
    scores are exact; codes (PQ, SQ, ...) approximate them."""
    storage = list(_components(index))[-1]
    return isinstance(storage, (faiss.IndexFlat, faiss.IndexIVFFlat))


def _template_factory(name: str, kind: str) -> str:
    """What every shard is a copy of: IVF carries labels in its lists, the rest get an IDMap."""
    return name if kind == "ivf" else f"IDMap,{name}"


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
        raise InputError(f"{where}: faiss cannot build it for {dim}-d vectors: {_faiss_reason(e)}; "
                         "see https://github.com/facebookresearch/faiss/wiki/The-index-factory") from None
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise InputError(f"{where}: faiss builds it with the L2 metric only, but idml searches by inner product "
                         "(cosine); choose another type (e.g. IVF4096,PQ64 or HNSW32)")
    kind = _kind_of(index)
    if kind == "ivf" and not isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        # Shards share one coarse search (IndexShardsIVF) and merge on disk only as bare IVF indexes.
        raise InputError(f"{where}: idml shards bare IVF indexes; a pre-transform (OPQ, PCA) or a refine stage "
                         "(RFlat, Refine(...)) around IVF is not supported: drop it (e.g. IVF4096,PQ64)")
    if kind == "flat":
        name = "Flat"
    index = faiss.index_factory(dim, _template_factory(name, kind), faiss.METRIC_INNER_PRODUCT)
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
        _no_polysemous_training(index)
        for part in _components(index):
            if hasattr(part, "pq"):
                part.pq.cp.niter = 2  # the check needs codebooks that work, not good ones
                part.pq.cp.min_points_per_centroid = 0  # no "clustering 1024 points to 256 centroids" warnings
        # Codes that need training (PQ, SQ); IVF-Flat and HNSW over full vectors need none.
        needs_codec = not index.is_trained and not isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat)
        if not index.is_trained:
            index.train(sample)
        empty = len(faiss.serialize_index(index))
        with _quantizer_stripped(index):
            empty_shard = len(faiss.serialize_index(index))
        index.add_with_ids(sample, labels)
        _, found = index.search(sample[:8], 4)
    except RuntimeError as e:
        raise InputError(f"{where}: faiss cannot build it on a sample of {CHECK_SAMPLE} {dim}-d vectors: "
                         f"{_faiss_reason(e)}") from None
    if not np.isin(found[:, 0], labels).all():
        raise InputError(f"{where}: searching it found nothing on a sample of {CHECK_SAMPLE} vectors; "
                         "choose another type")
    lossy = not _stores_exact_vectors(index)
    if ivf is not None:
        # Per list, the stored lists carry an 8-byte size; a sample filling few lists would skew a
        # measured difference, so IVF is counted from its code size.
        return FactoryCheck(name, kind, int(ivf.nlist), bool(needs_codec), lossy, empty_shard + 8 * int(ivf.nlist),
                            float(ivf.code_size + IDS_BYTES), quantizer_bytes=empty - empty_shard)
    full = len(faiss.serialize_index(index))
    return FactoryCheck(name, kind, 0, bool(needs_codec), lossy, empty, (full - empty) / CHECK_SAMPLE)


# -- choosing an index under a memory budget ---------------------------------------------------
def pq_code_sizes(dim: int) -> list[int]:
    """Bytes per vector of the IVF-PQ candidates, largest first: PQ needs M to divide d; at
    least 2 dimensions per sub-quantizer (M = d would cost as much as SQ8)."""
    return [m for m in range(dim // 2, 0, -1) if dim % m == 0]


def estimated_index_bytes(factory: str, n: int, dim: int, shards: int = 1) -> int:
    """Memory of ``n`` vectors in ``Flat``, ``IVF<nlist>,Flat`` or ``IVF<nlist>,PQ<M>`` (8-bit
    codes) searched as ``shards`` shards: vectors or codes plus an int64 label each, the coarse
    centroids once (trained.faiss; shard files are written without them), and the PQ codebooks
    once per shard file plus once in trained.faiss. The same as
    ``check_factory(...).estimated_bytes(n, shards)`` to within a few lists' headers."""
    if factory == "Flat":
        return n * (4 * dim + IDS_BYTES)
    match = re.fullmatch(r"IVF(\d+),(Flat|PQ(\d+))", factory)
    if match is None:
        raise ValueError(f"no memory formula for {factory!r}: use check_factory(...).estimated_bytes")
    centroids = int(match.group(1)) * dim * 4
    if match.group(2) == "Flat":
        return centroids + n * (4 * dim + IDS_BYTES)
    return centroids + (shards + 1) * 256 * dim * 4 + n * (int(match.group(3)) + IDS_BYTES)


@dataclass(frozen=True)
class IndexChoice:
    factory: str
    estimated_bytes: int
    reason: str


def choose_index(n: int, dim: int, max_bytes: int, *, nlist: int | None = None, shards: int = 1) -> IndexChoice:
    """autofaiss-like: exact ``Flat`` when the corpus is small enough for exact search
    (FLAT_MAX_VECTORS) and fits ``max_bytes``; else ``IVF-Flat`` if it fits; else ``IVF-PQ`` with
    the largest code that fits (best recall for the memory). Refused when even the smallest does
    not fit."""
    if n < 1:
        raise ValueError("nothing to index: the corpus has no readable images")
    budget = format_bytes(max_bytes)
    flat = estimated_index_bytes("Flat", n, dim)
    if n <= FLAT_MAX_VECTORS and flat <= max_bytes:
        return IndexChoice("Flat", flat, f"exact search: {n} vectors (<= {FLAT_MAX_VECTORS}) fit {budget}")
    lists = int(nlist or default_nlist(n))
    ivf_flat = f"IVF{lists},Flat"
    if estimated_index_bytes(ivf_flat, n, dim, shards) <= max_bytes:
        why = "more vectors than exact search serves fast" if flat <= max_bytes else f"Flat needs {format_bytes(flat)}"
        return IndexChoice(ivf_flat, estimated_index_bytes(ivf_flat, n, dim, shards), f"{why}; IVF-Flat fits {budget}")
    for m in pq_code_sizes(dim):
        factory = f"IVF{lists},PQ{m}"
        size = estimated_index_bytes(factory, n, dim, shards)
        if size <= max_bytes:
            return IndexChoice(factory, size, f"IVF-Flat needs {format_bytes(estimated_index_bytes(ivf_flat, n, dim, shards))}; "
                                              f"the largest PQ code ({m} bytes/vector) that fits {budget}")
    raise InputError(f"--max-index-memory {budget}: even {factory} needs about {format_bytes(size)} for {n} "
                     f"{dim}-d vectors; raise the budget or index fewer vectors")


def refine_depth(refine: int | None, check: FactoryCheck) -> int:
    """The re-scoring depth a build stores (``IndexSpec.refine``): DEFAULT_REFINE for lossy codes
    unless ``refine`` says otherwise; 0 or 1 turn re-scoring off, stored as 0 (1 would re-score
    just the k results faiss found: no better recall, for files as big as the vectors). Exact
    indexes have nothing to re-score: a nonzero ``refine`` is refused, not ignored."""
    if refine is None:
        return DEFAULT_REFINE if check.lossy else 0
    if refine < 0:
        raise InputError(f"--refine must be >= 0 (0 or 1: no re-scoring, no exact vector files), got {refine}")
    if refine and not check.lossy:
        raise InputError(f"--refine {refine}: {check.factory} stores the vectors themselves, so its scores are "
                         "already exact and there is nothing to re-score; leave --refine out (it applies to "
                         "lossy codes: PQ, SQ)")
    return refine if refine > 1 else 0


def resolve_spec(index_type: str, n: int, dim: int, *, nlist: int | None = None, nprobe: int | None = None,
                 train_size: int | None = None, target_recall: float = 0.95, max_index_bytes: int | None = None,
                 max_query_ms: float | None = None, shards: int = 1, refine: int | None = None) -> IndexSpec:
    """The index for ``n`` vectors. ``index_type``: ``auto`` (Flat up to FLAT_MAX_VECTORS, IVF-Flat
    above; with ``max_index_bytes``, ``choose_index``), ``flat``, ``ivf`` (IVF-Flat, ``nlist``
    lists), or a faiss factory string (``IVF4096,PQ64``, ``HNSW32``, ...; ``check_factory``).
    ``refine``: the re-scoring depth of lossy codes (``refine_depth``; default DEFAULT_REFINE)."""
    if n < 1:
        raise ValueError("nothing to index: the corpus has no readable images")
    if nlist is not None and not 1 <= nlist <= n:
        raise ValueError(f"nlist={nlist} must be between 1 and the number of vectors ({n})")
    if index_type == "auto" and max_index_bytes:
        choice = choose_index(n, dim, max_index_bytes, nlist=nlist, shards=shards)
        factory, reason = choice.factory, choice.reason
    elif index_type == "auto":
        factory = "Flat" if n <= FLAT_MAX_VECTORS else f"IVF{nlist or default_nlist(n)},Flat"
        reason = f"auto: {n} vectors, {'<=' if n <= FLAT_MAX_VECTORS else '>'} {FLAT_MAX_VECTORS} (the most searched exactly)"
    elif index_type == "flat":
        factory, reason = "Flat", "--index flat"
    elif index_type == "ivf":
        factory, reason = f"IVF{nlist or default_nlist(n)},Flat", "--index ivf"
    else:
        if nlist is not None:
            raise InputError(f"--nlist applies to --index auto or ivf; write the lists into the factory string "
                             f"instead (e.g. IVF{nlist},PQ64), not --index {index_type!r}")
        factory, reason = index_type, f"--index {index_type}"
    check = check_factory(factory, dim)
    kind, estimate = check.kind, check.estimated_bytes(n, shards)
    if max_index_bytes and estimate > max_index_bytes:
        raise InputError(f"--index {index_type}: {check.factory} needs about {format_bytes(estimate)} for {n} vectors, "
                         f"over --max-index-memory {format_bytes(max_index_bytes)}; raise the budget, or leave "
                         "--index auto to choose a smaller index")
    if check.nlist > n:
        raise InputError(f"--index {check.factory}: {check.nlist} IVF lists for {n} vectors; use at most one list "
                         f"per vector (about {default_nlist(n)} is typical)")
    common = dict(target_recall=target_recall, max_query_ms=max_query_ms, estimated_bytes=estimate,
                  max_index_bytes=max_index_bytes, choice=reason, refine=refine_depth(refine, check))
    if kind == "flat":
        return IndexSpec("flat", dim, nprobe=0, nprobe_auto=False, **common)
    if nprobe is not None and kind != "ivf":
        raise InputError(f"--nprobe applies to IVF indexes; {check.factory} is {kind} "
                         f"({'efSearch is tuned instead' if kind == 'hnsw' else 'nothing to tune'})")
    wanted = TRAIN_POINTS_PER_LIST * check.nlist
    if check.trains_codes:
        wanted = max(wanted, CODEC_TRAIN_POINTS)
    train = int(min(n, train_size or wanted)) if wanted or train_size else 0
    if kind == "ivf" and train < check.nlist:
        raise ValueError(f"train_size={train} is below nlist={check.nlist}; k-means needs at least one point per list")
    if nprobe is not None and not 1 <= nprobe <= check.nlist:
        raise ValueError(f"nprobe={nprobe} must be between 1 and nlist={check.nlist}")
    return IndexSpec(kind, dim, nlist=check.nlist, nprobe=int(nprobe or 0), nprobe_auto=nprobe is None and kind != "scan",
                     train_size=train, index_factory=check.factory, **common)


# One exact search on the GPUs, in a child process: a faiss GPU kernel missing for the card
# aborts the process that launches it instead of raising.
_GPU_PROBE = """
import numpy as np, faiss
x = np.random.default_rng(0).random((64, 16), dtype=np.float32)
index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(16))
index.add(x)
assert (index.search(x[:4], 1)[1][:, 0] >= 0).all()
"""


@functools.lru_cache(maxsize=1)
def gpu_status() -> tuple[int, str]:
    """(GPUs faiss can use, why none where faiss sees some). 0 with faiss-cpu; 0 too, with the
    reason logged, when faiss's GPU kernels do not run on the cards: the PyPI faiss-gpu-cu12
    wheels carry kernels for compute capability 7.x-8.x only, and on a Hopper card (H100, H200)
    their first kernel aborts the process ("no kernel image is available", seen on an H200).
    So one tiny search runs in a child process first, once per process."""
    seen = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not seen:
        return 0, "faiss-cpu is installed, or faiss sees no GPU"
    try:
        probe = subprocess.run([sys.executable, "-c", _GPU_PROBE], capture_output=True, text=True, timeout=300)
        last = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
        failure = "" if probe.returncode == 0 else last.split("details: ", 1)[-1]  # faiss's assertions end with it
    except subprocess.TimeoutExpired:
        failure = "a search of 64 vectors took over 300 s"
    if not failure:
        return seen, ""
    reason = (f"faiss sees {seen} GPU(s) but cannot run its kernels on them ({failure[:300]}); its GPU builds "
              "from PyPI lack kernels for Hopper (H100, H200) and newer cards: install faiss-gpu from "
              "conda-forge, or build faiss with CUDA_ARCHITECTURES for the card")
    log.warning("%s; using the CPU", reason)
    return 0, reason


def gpu_count() -> int:
    """GPUs faiss can use (``gpu_status``)."""
    return gpu_status()[0]


def train_index(sample: np.ndarray | None, spec: IndexSpec) -> faiss.Index:
    """The empty index every shard is a copy of, trained on ``sample``: IVF's coarse quantizer
    (k-means) and any codes (PQ, SQ). An index with nothing to train needs no sample."""
    index = faiss.index_factory(spec.dim, _template_factory(spec.factory, spec.index_type), faiss.METRIC_INNER_PRODUCT)
    _no_polysemous_training(index)
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
        raise InputError(f"--index {spec.factory}: faiss cannot train it on {len(sample)} vectors: {_faiss_reason(e)}; "
                         "choose a smaller index (fewer lists, PQ<M>x4 codes) for this corpus") from None
    finally:
        if clustering is not None:
            ivf.clustering_index = None
    return index


def new_shard_index(spec: IndexSpec, trained: faiss.Index | None) -> faiss.Index:
    if spec.index_type == "flat":
        return faiss.IndexIDMap(faiss.IndexFlatIP(spec.dim))
    if trained is None:
        raise ValueError(f"a {spec.factory} shard needs the trained index (trained.faiss)")
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


@contextlib.contextmanager
def _quantizer_stripped(index: faiss.Index):
    """``index`` with its IVF coarse quantizer swapped, meanwhile, for an empty Flat one of the
    same dimension and metric; a no-op for other indexes."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or ivf.quantizer.ntotal == 0:
        yield
        return
    quantizer, owned = ivf.quantizer, ivf.own_fields
    placeholder = faiss.IndexFlat(ivf.d, quantizer.metric_type)  # Python owns it and frees it
    ivf.own_fields = False  # the shard must never free the placeholder
    ivf.quantizer = placeholder
    try:
        yield
    finally:
        ivf.quantizer = quantizer
        ivf.own_fields = owned


def write_shard(index: faiss.Index, path: Path) -> None:
    """A shard's file, without the IVF coarse quantizer: trained.faiss holds it once, instead of
    every shard file repeating it (4096 x 512 centroids are 8 MB)."""
    with _quantizer_stripped(index):
        write_index_atomic(index, path)


def read_shard(path: str | os.PathLike, spec: IndexSpec, trained: faiss.Index | None) -> faiss.Index:
    """A shard file as ``build_shard`` made it. IVF shards are memory-mapped (opening is instant
    and a query reads only the lists it probes) and get the coarse quantizer of ``trained`` back;
    older shard files that still hold their own copy keep it."""
    index = read_index(path, mmap=spec.index_type == "ivf")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or ivf.quantizer.ntotal > 0:
        return index
    if trained is None:
        raise ValueError(f"{path} is stored without its coarse quantizer; it needs the trained index (trained.faiss)")
    placeholder = faiss.downcast_index(ivf.quantizer)  # the empty Flat index write_shard stored
    ivf.own_fields = False  # the quantizer belongs to ``trained``
    ivf.quantizer = faiss.extract_index_ivf(trained).quantizer
    index.referenced_objects = [trained]  # the quantizer lives as long as the shard
    # Deleted here, explicitly: handing it to Python (``.this.own(True)``) corrupts SWIG's type
    # table in faiss 1.15 once Python frees it.
    type(placeholder).__swig_destroy__(placeholder)
    return index


def set_search_param(index: faiss.Index, name: str | None, value: int) -> None:
    """Set ``nprobe`` (IVF) or ``efSearch`` (HNSW) on an index and everything it wraps (every
    shard of IndexShards, IDMaps); no-op for a value <= 0 or no parameter."""
    if name and value > 0:
        faiss.ParameterSpace().set_index_parameter(index, name, int(value))


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    set_search_param(index, "nprobe", nprobe)


def apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    set_search_param(index, spec.search_param, spec.search_value)


def query_latency_ms(index: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Median time of one query alone (what a search request waits), over up to LATENCY_QUERIES."""
    queries = np.ascontiguousarray(queries[:LATENCY_QUERIES], np.float32)
    if not len(queries):
        return float("nan")
    k = max(1, min(k, int(index.ntotal)))
    index.search(queries[:1], k)  # warm: page in mmapped lists, allocate
    times = []
    for q in range(len(queries)):
        t = time.perf_counter()
        index.search(queries[q:q + 1], k)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def search_values(spec: IndexSpec, start: int = 0) -> list[int]:
    """nprobe (powers of two up to nlist) or efSearch values tried by the tuning, from ``start``."""
    if spec.index_type == "ivf":
        values = sorted({min(spec.nlist, 2 ** i) for i in range(0, max(1, spec.nlist).bit_length() + 1)})
    elif spec.index_type == "hnsw":
        values = list(EF_SEARCH_VALUES)
    else:
        return [0]
    return [v for v in values if v >= start] or [values[-1]]


@dataclass
class Tuning:
    value: int  # the chosen nprobe / efSearch (0: nothing to tune)
    recall: float
    queries: int
    query_ms: float | None  # None: not measured (exact search)
    reached: bool  # recall >= target within the latency budget
    tried: list[dict[str, float]]


def tune_search(measure: Callable[[int], tuple[float, int]], latency: Callable[[int], float], values: list[int],
                target: float, max_query_ms: float | None = None) -> Tuning:
    """The smallest value (values ascending) whose recall reaches ``target``; when the latency
    budget ``max_query_ms`` runs out first, the largest value within it (or the smallest value,
    if none is); when recall stops rising below the target (lossy codes cap it), the value where
    it stopped. ``measure(v)``: (recall, queries used); ``latency(v)``: ms per query."""
    tried: list[dict[str, float]] = []
    best = None
    for value in values:
        recall, used = measure(value)
        ms = latency(value)
        tried.append({"value": value, "recall": recall, "query_ms": ms})
        over = max_query_ms is not None and ms > max_query_ms
        if over and best is not None:
            break
        if best is not None and recall < target and recall - best[1] < PLATEAU_GAIN:
            break  # more only costs time: IVF4096,PQ64 on tight clusters went to nprobe 4096 (0.3x exact's speed) for 0.65
        best = (value, recall, used, ms)
        if over or recall >= target or math.isnan(recall):
            break
    value, recall, used, ms = best
    reached = recall >= target and (max_query_ms is None or ms <= max_query_ms)
    return Tuning(value, recall, used, ms, bool(reached), tried)


@dataclass
class CombinedIndex:
    """A searchable view of all shards (faiss does not own the Python shard objects, so this
    keeps them alive). With ``vectors`` (``exact_vectors.ShardVectors``) and ``spec.refine`` > 1,
    a search re-scores refine x k candidates by exact cosine and returns exact scores."""

    index: faiss.Index
    spec: IndexSpec
    parts: list[Any] = field(default_factory=list)
    vectors: ShardVectors | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def rescores(self) -> bool:
        return self.vectors is not None and self.spec.refine > 1

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        set_search_param(self.index, "nprobe", nprobe or 0)
        set_search_param(self.index, "efSearch", ef_search or 0)
        k = min(k, self.ntotal)
        queries = np.ascontiguousarray(queries, np.float32)
        if not self.rescores:
            return self.index.search(queries, k)
        _, candidates = self.index.search(queries, min(self.ntotal, k * self.spec.refine))
        return self.vectors.rescore(queries, candidates, k)


def combine(shards: list[faiss.Index], spec: IndexSpec, trained: faiss.Index | None, *, gpu: bool = False,
            vectors: ShardVectors | None = None) -> CombinedIndex:
    """Search shards as one index (labels are global already, so no id shifting). ``gpu``: Flat
    shards are copied to every GPU faiss sees (each shard split across them). ``vectors``: the
    shards' exact vectors, to re-score lossy candidates (``CombinedIndex``)."""
    if gpu:
        if not gpu_count():
            raise ValueError(f"--gpu: {gpu_status()[1]}; faiss-gpu: `pip install 'idml[gpu]'` on a CUDA 12 machine "
                             "(docs/indexing.md)")
        if spec.index_type != "flat":
            raise ValueError(f"--gpu searches exact (Flat) indexes; this {spec.factory} index is searched on the CPU")
        shards = [faiss.index_cpu_to_all_gpus(shard) for shard in shards]
    if spec.index_type == "ivf":
        quantizer = faiss.extract_index_ivf(trained).quantizer
        combined = faiss.IndexShardsIVF(quantizer, spec.nlist, False, False)
        parts: list[Any] = [trained, quantizer, *shards]
    else:  # every shard searched on its own (an HNSW graph, a code scan), results merged
        combined = faiss.IndexShards(spec.dim, False, False)
        parts = list(shards)
    for shard in shards:
        combined.add_shard(shard)
    apply_search_params(combined, spec)
    return CombinedIndex(combined, spec, parts, vectors)


_STDOUT_REDIRECT = threading.Lock()


@contextlib.contextmanager
def _faiss_prints_logged():
    """What faiss's C++ prints to stdout meanwhile ("resizing ... merged.ivfdata", "updating ondisk
    filename") goes to the debug log instead: stdout may carry a command's results (JSON). One
    thread at a time: interleaved redirections would leave fd 1 on another's capture file."""
    with _STDOUT_REDIRECT, tempfile.TemporaryFile() as capture:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(capture.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                log.debug("faiss: %s", line)


def merge_ondisk(trained_path: Path, shard_paths: list[Path], out_dir: Path, spec: IndexSpec, *,
                 vectors: ShardVectors | None = None) -> CombinedIndex:
    """IVF shards merged into one index whose lists live in ``out_dir/merged.ivfdata``, one
    memory-mapped file: searched as fast as one in-memory index (IndexShardsIVF scans every shard's
    part of each probed list: 1.6-1.9x slower), still opened without reading it and bigger than
    RAM. Built once, into a temporary folder renamed into place, then reused; processes opening
    the same version at once (serve replicas) merge it once, under a lock. Only the shards' lists
    are taken (the quantizer and codebooks are the trained index's), so shard files with or
    without their own quantizer merge alike."""
    from faiss.contrib.ondisk import merge_ondisk as _merge

    if spec.index_type != "ivf":
        raise ValueError("only IVF shards can be merged on disk; a Flat index is searched as shards")
    index_path = out_dir / "merged.index"
    if not index_path.is_file():
        with exclusive(out_dir.with_name(out_dir.name + ".lock")):
            if not index_path.is_file():  # another process may have merged it while this one waited
                started = time.perf_counter()
                tmp_dir = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
                shutil.rmtree(tmp_dir, ignore_errors=True)
                tmp_dir.mkdir(parents=True)
                trained = faiss.read_index(str(trained_path))
                with _faiss_prints_logged():
                    _merge(trained, [str(p) for p in shard_paths], str(tmp_dir / "merged.ivfdata"))
                faiss.write_index(trained, str(tmp_dir / "merged.index"))
                del trained
                shutil.rmtree(out_dir, ignore_errors=True)  # a merge killed half-way, before this lock
                os.rename(tmp_dir, out_dir)
                log.info("merged %d shards into %s in %.1fs (once per version)", len(shard_paths), out_dir,
                         time.perf_counter() - started)
    # ONDISK_SAME_DIR finds the lists next to the index after the rename (IO_FLAG_MMAP would
    # crash on on-disk lists in faiss 1.15).
    with _faiss_prints_logged():
        index = faiss.read_index(str(index_path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    # On-disk lists start 32 threads per search to page the probed lists in: with the lists in the
    # page cache that made searches 1.4-1.6x slower than an in-memory index; without, no slower.
    faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).prefetch_nthread = 0
    set_nprobe(index, spec.nprobe)
    return CombinedIndex(index, spec, vectors=vectors)


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
