"""The index spec: which faiss index a version is, chosen for the corpus, the options and a
memory budget, and recorded in the manifest.

Vectors are L2-normalised ``mu``; the metric is inner product (= cosine). Small corpora get exact
``Flat`` shards; large ones ``IVF<nlist>,Flat``. Any faiss factory string searching by inner
product works too (``factory.check_factory``), as do the names of ``kinds.NAMED_INDEXES``. Under
a memory budget ``choose_index`` picks Flat, IVF-Flat or IVF-PQ. Lossy codes (PQ, SQ) give
approximate scores: such an index keeps every shard's exact vectors beside it and re-scores
``refine`` x k candidates by exact cosine (``exact_vectors``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InputError
from ..faiss_import import faiss
from .factory import IDS_BYTES, FactoryCheck, check_factory
from .kinds import KINDS, NAMED_INDEXES, IndexKind

# Up to here exact search costs ~n*d flops per query (about 3 ms on two CPU cores at d=512),
# cheap enough to keep every answer exact.
FLAT_MAX_VECTORS = 200_000
# faiss warns below 39 training points per centroid; 64 gives stabler centroids at little cost.
TRAIN_POINTS_PER_LIST = 64
# A PQ/SQ codebook (2^8 centroids per sub-quantizer) trained on fewer points is noisy.
CODEC_TRAIN_POINTS = TRAIN_POINTS_PER_LIST * 256
# Candidates per result re-scored by exact cosine when codes are lossy: on loose clusters (20k x
# 64, IVF64,PQ16) recall@10 vs exact goes 0.51 (1x) -> 0.85 (4x) -> 0.96 (10x), for reading 100
# stored vectors per query at k = 10 (microseconds of dot products, once the pages are cached).
DEFAULT_REFINE = 10
_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass
class IndexSpec:
    index_type: str  # the kind: a kinds.KINDS name
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
    def kind(self) -> IndexKind:
        return KINDS[self.index_type]

    @property
    def factory(self) -> str:
        return self.index_factory or self.kind.legacy_factory(self.nlist)

    @property
    def search_param(self) -> str | None:
        """The faiss parameter that trades recall for speed, tuned at build time."""
        return self.kind.search_param

    @property
    def search_value(self) -> int:
        return self.kind.tuned_value(self)

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
    above; with ``max_index_bytes``, ``choose_index``), a name of ``kinds.NAMED_INDEXES`` (``flat``,
    ``ivf``: IVF-Flat of ``nlist`` lists, ...), or a faiss factory string (``IVF4096,PQ64``, ``HNSW32``, ...; ``check_factory``).
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
    elif index_type in NAMED_INDEXES:
        factory, reason = NAMED_INDEXES[index_type](nlist or default_nlist(n)), f"--index {index_type}"
    else:
        if nlist is not None:
            raise InputError(f"--nlist applies to --index auto or ivf; write the lists into the factory string "
                             f"instead (e.g. IVF{nlist},PQ64), not --index {index_type!r}")
        factory, reason = index_type, f"--index {index_type}"
    check = check_factory(factory, dim)
    kind, estimate = KINDS[check.kind], check.estimated_bytes(n, shards)
    if max_index_bytes and estimate > max_index_bytes:
        raise InputError(f"--index {index_type}: {check.factory} needs about {format_bytes(estimate)} for {n} vectors, "
                         f"over --max-index-memory {format_bytes(max_index_bytes)}; raise the budget, or leave "
                         "--index auto to choose a smaller index")
    if check.nlist > n:
        raise InputError(f"--index {check.factory}: {check.nlist} IVF lists for {n} vectors; use at most one list "
                         f"per vector (about {default_nlist(n)} is typical)")
    common = dict(target_recall=target_recall, max_query_ms=max_query_ms, estimated_bytes=estimate,
                  max_index_bytes=max_index_bytes, choice=reason, refine=refine_depth(refine, check))
    if kind.exact:
        return IndexSpec(kind.name, dim, nprobe=0, nprobe_auto=False, **common)
    if nprobe is not None and kind.search_param != "nprobe":
        raise InputError(f"--nprobe applies to IVF indexes; {check.factory} is {kind.name} "
                         f"({f'{kind.search_param} is tuned instead' if kind.search_param else 'nothing to tune'})")
    wanted = TRAIN_POINTS_PER_LIST * check.nlist
    if check.trains_codes:
        wanted = max(wanted, CODEC_TRAIN_POINTS)
    train = int(min(n, train_size or wanted)) if wanted or train_size else 0
    if kind.shared_quantizer and train < check.nlist:
        raise ValueError(f"train_size={train} is below nlist={check.nlist}; k-means needs at least one point per list")
    if nprobe is not None and not 1 <= nprobe <= check.nlist:
        raise ValueError(f"nprobe={nprobe} must be between 1 and nlist={check.nlist}")
    return IndexSpec(kind.name, dim, nlist=check.nlist, nprobe=int(nprobe or 0),
                     nprobe_auto=nprobe is None and kind.search_param is not None,
                     train_size=train, index_factory=check.factory, **common)
