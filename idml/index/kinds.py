"""The index-kind table: how each kind of index is trained, stored, opened, searched as shards,
tuned and checked. The other modules look a kind up here instead of branching on its name.

A *kind* (``IndexSpec.index_type``, as manifests record it) is how shards of a faiss factory
string behave; ``kind_of`` tells it from a built index:

- ``flat``: exact search (``IDMap,Flat``): nothing to train, sample or tune, recall 1 by
  construction; the only kind searched on GPUs.
- ``ivf``: inverted lists (``IVF4096,Flat``, ``IVF4096,PQ64``, ``IVF1024,SQ8``): one trained
  index holds the coarse quantizer, once, in ``trained.faiss``; shard files are written without it,
  memory-mapped when opened (a query reads only the lists it probes), searched together with one
  coarse search (``IndexShardsIVF``) or merged into one on-disk index. ``nprobe`` is tuned.
- ``hnsw``: a graph per shard, an IDMap-wrapped copy of one template; ``efSearch`` is tuned.
- ``scan``: compressed codes (``PQ32``, ``SQ8``) scanned in full, per shard, copies of one
  trained template; nothing to tune.

``NAMED_INDEXES`` are the names ``--index`` takes besides ``auto`` and factory strings. Adding an
index is one entry: a name here (e.g. ``ivf-sq8``), or, for an index that behaves unlike the four
kinds, an ``IndexKind`` in ``KINDS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..faiss_import import faiss
from .faiss_io import components, quantizer_stripped, read_index, write_index_atomic

# efSearch values the tuning of an HNSW index tries, ascending.
EF_SEARCH_VALUES = (16, 32, 64, 128, 256, 512, 1024)


def _powers_of_two_up_to(nlist: int) -> list[int]:
    return sorted({min(nlist, 2 ** i) for i in range(0, max(1, nlist).bit_length() + 1)})


@dataclass(frozen=True)
class IndexKind:
    name: str
    # Whether a built index (its parts: ``faiss_io.components``) is of this kind; KINDS is asked in order.
    recognises: Callable[[list[Any]], bool]
    # Exact scores: no trained template (a shard is an IDMap over a Flat index), no recall sample,
    # nothing to tune or re-score.
    exact: bool = False
    shared_quantizer: bool = False  # IVF: the shards share trained.faiss's coarse quantizer (above)
    search_param: str | None = None  # the faiss parameter that trades recall for speed, tuned at build time
    spec_field: str | None = None  # the IndexSpec field its tuned value is stored in
    search_values: Callable[[int], list[int]] = lambda nlist: []  # values tuning tries, ascending, given nlist
    # The factory string of versions that recorded none (older than factory strings): Flat and IVF-Flat.
    legacy_factory: Callable[[int], str] | None = None

    def template_factory(self, name: str) -> str:
        """What every shard is a copy of: IVF carries labels in its lists, the rest get an IDMap."""
        return name if self.shared_quantizer else f"IDMap,{name}"

    def new_shard(self, dim: int, factory: str, trained: faiss.Index | None) -> faiss.Index:
        """An empty shard: an IDMap over Flat for exact search, else a copy of the trained template."""
        if self.exact:
            return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        if trained is None:
            raise ValueError(f"a {factory} shard needs the trained index (trained.faiss)")
        return faiss.clone_index(trained)

    def write_shard(self, index: faiss.Index, path: Path) -> None:
        """A shard's file; IVF's without the coarse quantizer: trained.faiss holds it once, instead
        of every shard file repeating it (4096 x 512 centroids are 8 MB)."""
        with quantizer_stripped(index):  # a no-op for other kinds
            write_index_atomic(index, path)

    def open_shard(self, path: str | os.PathLike, trained: faiss.Index | None) -> faiss.Index:
        """A shard file as ``new_shard`` and ``write_shard`` made it. IVF shards are
        memory-mapped (opening is instant and a query reads only the lists it probes) and get the
        coarse quantizer of ``trained`` back; older shard files that still hold their own copy keep it."""
        index = read_index(path, mmap=self.shared_quantizer)
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

    def shards_index(self, shards: list[faiss.Index], dim: int, nlist: int,
                     trained: faiss.Index | None) -> tuple[faiss.Index, list[Any]]:
        """One faiss index searching ``shards`` together, and the objects it needs kept alive.
        IVF: one coarse search, then every shard's lists; the rest: every shard searched on its own
        (an exact scan, an HNSW graph, a code scan), results merged."""
        if self.shared_quantizer:
            quantizer = faiss.extract_index_ivf(trained).quantizer
            combined = faiss.IndexShardsIVF(quantizer, nlist, False, False)
            parts: list[Any] = [trained, quantizer, *shards]
        else:
            combined = faiss.IndexShards(dim, False, False)
            parts = list(shards)
        for shard in shards:
            combined.add_shard(shard)
        return combined, parts

    def tuned_value(self, spec: Any) -> int:
        """The spec's nprobe (IVF) or efSearch (HNSW); 0 for kinds with nothing to tune."""
        return int(getattr(spec, self.spec_field)) if self.spec_field else 0

    def set_tuned_value(self, spec: Any, value: int) -> None:
        if self.spec_field:
            setattr(spec, self.spec_field, int(value))


def _is_hnsw(parts: list[Any]) -> bool:
    return any(isinstance(p, faiss.IndexHNSW) for p in parts)


KINDS: dict[str, IndexKind] = {kind.name: kind for kind in (
    IndexKind("ivf", lambda parts: faiss.try_extract_index_ivf(parts[0]) is not None, shared_quantizer=True,
              search_param="nprobe", spec_field="nprobe", search_values=_powers_of_two_up_to,
              legacy_factory=lambda nlist: f"IVF{nlist},Flat"),
    IndexKind("hnsw", _is_hnsw, search_param="efSearch", spec_field="ef_search",
              search_values=lambda nlist: list(EF_SEARCH_VALUES)),
    IndexKind("flat", lambda parts: type(parts[0]) in (faiss.IndexFlat, faiss.IndexFlatIP), exact=True,
              legacy_factory=lambda nlist: "IDMap,Flat"),
    IndexKind("scan", lambda parts: True),
)}

# ``--index NAME``: the factory string of a named index, given its IVF lists (``--nlist``, or
# ``spec.default_nlist`` of the corpus). ``auto`` chooses among Flat, IVF-Flat and IVF-PQ (spec.resolve_spec).
NAMED_INDEXES: dict[str, Callable[[int], str]] = {
    "flat": lambda nlist: "Flat",
    "ivf": lambda nlist: f"IVF{nlist},Flat",
    # 8-bit scalar codes: a quarter of IVF-Flat's memory, re-scored by exact cosine (--refine)
    "ivf-sq8": lambda nlist: f"IVF{nlist},SQ8",
}
INDEX_SHORTHANDS = ("auto", *NAMED_INDEXES)


def kind_of(index: faiss.Index) -> IndexKind:
    parts = list(components(index))
    return next(kind for kind in KINDS.values() if kind.recognises(parts))
