"""faiss plumbing every index kind shares: reading and writing index files, the parts an index
wraps, faiss's error messages, and a shard's IVF coarse quantizer stripped for writing."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from ..faiss_import import faiss


def faiss_reason(err: Exception) -> str:
    """faiss's message without its C++ location prefix, on one line."""
    text = " ".join(str(err).split())
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", text)


def components(index: faiss.Index):
    """The index and the indexes it wraps (IDMap, pre-transforms, HNSW storage)."""
    index = faiss.downcast_index(index)
    yield index
    for attr in ("index", "storage"):
        inner = getattr(index, attr, None)
        if isinstance(inner, faiss.Index):
            yield from components(inner)


def no_polysemous_training(index: faiss.Index) -> None:
    # index_factory turns polysemous training on for IVF-PQ: minutes of CPU for a code ordering
    # only polysemous search (which idml does not use) benefits from.
    for part in components(index):
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False


def write_index_atomic(index: faiss.Index, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def read_index(path: str | os.PathLike, *, mmap: bool = False) -> faiss.Index:
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)


@contextlib.contextmanager
def quantizer_stripped(index: faiss.Index):
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
