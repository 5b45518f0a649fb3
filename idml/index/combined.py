"""A version's shards searched as one index: together in memory (``combine``: IndexShardsIVF for
IVF, one coarse search then every shard's lists; IndexShards for the rest), or, for IVF, merged
into one on-disk index (``merge_ondisk``). Lossy codes are re-scored by exact cosine.

IVF shards are always searched on the CPU: their lists are memory-mapped files, which is what
keeps an index bigger than RAM (or than GPU memory) searchable; an exact (Flat) index is searched
on the GPUs faiss sees when asked (``gpu.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..faiss_import import faiss
from ..files import exclusive
from ..integrity import SealedFolder
from .exact_vectors import ShardVectors
from .gpu import gpu_count, gpu_status
from .spec import IndexSpec
from .tuning import apply_search_params, set_nprobe, set_search_param

log = logging.getLogger(__name__)


@dataclass
class CombinedIndex:
    """A searchable view of all shards (faiss does not own the Python shard objects, so this
    keeps them alive). With ``vectors`` (``exact_vectors.ShardVectors``) and ``spec.refine`` > 1,
    a search re-scores refine x k candidates by exact cosine and returns exact scores."""

    index: faiss.Index
    spec: IndexSpec
    parts: list[Any] = field(default_factory=list)
    vectors: ShardVectors | None = None
    # Derived files read while searching (the merged lists), with their stat when found sound.
    files: dict[Path, os.stat_result] = field(default_factory=dict)

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
        if not spec.kind.exact:
            raise ValueError(f"--gpu searches exact (Flat) indexes; this {spec.factory} index is searched on the CPU")
        shards = [faiss.index_cpu_to_all_gpus(shard) for shard in shards]
    combined, parts = spec.kind.shards_index(shards, spec.dim, spec.nlist, trained)
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


MERGED_FILES = ("merged.index", "merged.ivfdata")


def merge_ondisk(trained_path: Path, shard_paths: list[Path], out_dir: Path, spec: IndexSpec, *,
                 vectors: ShardVectors | None = None, built_from: Any = None) -> CombinedIndex:
    """IVF shards merged into one index whose lists live in ``out_dir/merged.ivfdata``, one
    memory-mapped file: searched as fast as one in-memory index (IndexShardsIVF scans every shard's
    part of each probed list: 1.6-1.9x slower), still opened without reading it and bigger than
    RAM. Built once, into a temporary folder renamed into place, then reused; processes opening
    the same version at once (serve replicas) merge it once, under a lock. Only the shards' lists
    are taken (the quantizer and codebooks are the trained index's), so shard files with or
    without their own quantizer merge alike.

    The merged files are derived files of the integrity rule (``idml.integrity``): their checksums
    are recorded when they are merged and checked at every open (by stamp while their stat is
    unchanged). A damaged or missing one, or a folder merged from other shards (``built_from``:
    what identifies the shards, e.g. their checksums), is logged, deleted and merged again."""
    if not spec.kind.shared_quantizer:
        raise ValueError("only IVF shards can be merged on disk; a Flat index is searched as shards")
    cache = SealedFolder(out_dir)
    if not out_dir.is_dir() or cache.problems(built_from=built_from):
        with exclusive(out_dir.with_name(out_dir.name + ".lock")):
            # Checked again: another process may have merged it while this one waited.
            problems = cache.problems(built_from=built_from) if out_dir.is_dir() else ["absent"]
            if problems:
                if out_dir.is_dir():
                    log.warning("%s; merging the shards into %s again (a derived file, rebuilt from its sources)",
                                problems[0], out_dir)
                _merge_into(out_dir, trained_path, shard_paths, built_from)
                cache.stats = {name: os.stat(out_dir / name) for name in MERGED_FILES}
    # ONDISK_SAME_DIR finds the lists next to the index after the rename (IO_FLAG_MMAP would
    # crash on on-disk lists in faiss 1.15).
    with _faiss_prints_logged():
        index = faiss.read_index(str(out_dir / "merged.index"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    # On-disk lists start 32 threads per search to page the probed lists in: with the lists in the
    # page cache that made searches 1.4-1.6x slower than an in-memory index; without, no slower.
    faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).prefetch_nthread = 0
    set_nprobe(index, spec.nprobe)
    return CombinedIndex(index, spec, vectors=vectors,
                         files={out_dir / name: st for name, st in cache.stats.items()})


def _merge_into(out_dir: Path, trained_path: Path, shard_paths: list[Path], built_from: Any) -> None:
    """Merge into a temporary folder, seal it (the checksums of its files) and rename it into place."""
    from faiss.contrib.ondisk import merge_ondisk as _merge

    started = time.perf_counter()
    tmp_dir = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    trained = faiss.read_index(str(trained_path))
    with _faiss_prints_logged():
        _merge(trained, [str(p) for p in shard_paths], str(tmp_dir / "merged.ivfdata"))
    faiss.write_index(trained, str(tmp_dir / "merged.index"))
    del trained
    SealedFolder(tmp_dir).seal(list(MERGED_FILES), built_from=built_from)
    shutil.rmtree(out_dir, ignore_errors=True)  # a damaged merge, or one killed half-way before this lock
    os.rename(tmp_dir, out_dir)
    log.info("merged %d shards into %s in %.1fs (once per version)", len(shard_paths), out_dir,
             time.perf_counter() - started)
