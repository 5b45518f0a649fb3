"""Checking an index version: files against their checksums, counts, labels, every id once
(``verify_index``), and against the corpus as it is now (``verify_against_corpus``);
``verify_version`` is the whole ``idml index verify``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from idml.errors import DamagedFileError
from idml.integrity import SealedFolder

from .corpus import Corpus, read_ids_and_images, resolve_corpus
from .embed import hash_batch
from .faiss_io import read_index
from .labels import labels_for
from .spec import IndexSpec
from .exact_vectors import open_vectors
from .partitions import KEY_SCHEMA
from .recall import RecallSample
from .store import MANIFEST_NAME, IndexStore, merge_sources


@dataclass
class VerifyRequest:
    index_dir: str | os.PathLike
    version: str | None = None  # default: the published one
    # Also compare with a corpus: its URI, or "" for the one the version was built from; None: not compared.
    corpus: str | None = None
    checksums: bool = True  # hash every file (False: sizes only, faster)


@dataclass
class VerifyResult:
    version: str  # the version checked (or why there is none)
    problems: list[str]


def verify_version(request: VerifyRequest, *,
                   list_corpus: Callable[[Corpus], pa.Table] | None = None) -> VerifyResult:
    """``verify_index``, then, when the version is sound and ``request.corpus`` is given,
    ``verify_against_corpus`` on the corpus's (id, content_hash) listing: ``list_corpus``
    (``pipelines.index.listing_with_ray`` hashes on Ray), by default ``local_listing``."""
    store = IndexStore(request.index_dir)
    problems = verify_index(request.index_dir, request.version, checksums=request.checksums)
    version = request.version or store.current_version() or f"({store.root}: nothing published)"
    if request.corpus is not None and not problems:
        manifest = store.read_manifest(version)
        built_from = manifest["corpus"]
        uri = request.corpus or built_from["uri"]
        same_corpus = uri == built_from["uri"]
        splits = built_from.get("splits") if same_corpus else None
        corpus = resolve_corpus(uri, splits or None, follow_links=same_corpus and built_from.get("follow_links", False))
        problems += verify_against_corpus(manifest, request.index_dir, (list_corpus or local_listing)(corpus))
    return VerifyResult(version, problems)


def local_listing(corpus: Corpus) -> pa.Table:
    """(id, content_hash) of every corpus image, hashed in this process."""
    id_prefix = corpus.root if corpus.kind == "images" else None
    tables = [hash_batch(read_ids_and_images(corpus, path), id_prefix) for path in corpus.files]
    return pa.concat_tables(tables or [pa.schema([("id", pa.string()), ("content_hash", pa.string())]).empty_table()])


def verify_index(index_dir: str | os.PathLike, version: str | None = None, *, checksums: bool = True) -> list[str]:
    """Problems found in ``version`` (default: the published one) and in its derived files (the
    merged cache); empty when it is sound."""
    store = IndexStore(index_dir)
    try:
        version = store.resolve_version(version)
        manifest = store.read_manifest(version)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    return _version_problems(store, version, manifest, checksums) + _cache_problems(store, version, manifest, checksums)


def _cache_problems(store: IndexStore, version: str, manifest: dict[str, Any], checksums: bool) -> list[str]:
    """Damage to the version's merged cache, every file hashed (a query would find it by stamp too)."""
    merged = store.merged_dir(version)
    if not merged.is_dir():
        return []
    problems = SealedFolder(merged).problems(checksums=checksums, remember=False, built_from=merge_sources(manifest))
    return [f"{problem} (a derived file: merged again from the version's shards at the next query)"
            for problem in problems]


def _version_problems(store: IndexStore, version: str, manifest: dict[str, Any], checksums: bool) -> list[str]:
    vdir = store.version_dir(version)
    # The same file check query and update run when they open a version, but every file hashed.
    problems = list(store.file_problems(version, manifest, checksums=checksums).values())
    listed = set(manifest.get("files", {})) | {MANIFEST_NAME}
    for path in sorted(vdir.rglob("*")):
        if path.is_file() and str(path.relative_to(vdir)) not in listed:
            problems.append(f"{path} is not listed in the manifest")
    if problems:
        return problems  # the deeper checks would only repeat the damage

    spec = IndexSpec.from_dict(manifest["faiss"])
    all_ids, total = [], 0
    for entry in manifest["shards"]:
        problems += _check_shard(vdir, entry, spec)
        all_ids.append(pq.read_table(vdir / entry["embeddings"], columns=["id"]).column("id"))
        total += entry["count"]
    ids = pa.chunked_array([c for col in all_ids for c in col.chunks], pa.string())
    counts = manifest["counts"]
    if total != counts["vectors"] or len(ids) != counts["vectors"]:
        problems.append(f"shards hold {len(ids)} rows (manifest shard counts {total}), the manifest says {counts['vectors']} vectors")
    if len(ids) and pc.count_distinct(ids).as_py() != len(ids):
        dups = [v["values"] for v in pc.value_counts(ids).to_pylist() if v["counts"] > 1][:5]
        problems.append(f"ids indexed more than once: {dups}")
    corrupt = [c["id"] for c in manifest.get("corrupt", [])]
    if len(corrupt) != counts.get("corrupt", 0):
        problems.append(f"{len(corrupt)} corrupt images listed, the counts say {counts.get('corrupt')}")
    if corrupt and len(ids) and pc.any(pc.is_in(ids, value_set=pa.array(corrupt, pa.string()))).as_py():
        problems.append("an image listed as corrupt is also indexed")
    if counts["vectors"] + len(corrupt) != counts.get("corpus_images", counts["vectors"] + len(corrupt)):
        problems.append(f"{counts['vectors']} vectors + {len(corrupt)} corrupt != {counts['corpus_images']} corpus images")
    if (vdir / "recall_sample.npz").is_file():
        try:
            sample = RecallSample.load(vdir / "recall_sample.npz")
            if sample.queries.shape[1:] != (spec.dim,):
                problems.append(f"recall sample vectors are {sample.queries.shape[1:]}, expected ({spec.dim},)")
        except Exception as e:  # a damaged file is a finding, not a crash
            problems.append(f"cannot read the recall sample ({e})")
    return problems


def _check_shard(vdir: Path, entry: dict[str, Any], spec: IndexSpec) -> list[str]:
    problems = []
    name = entry["embeddings"]
    meta = pq.ParquetFile(vdir / name).metadata
    if meta.num_rows != entry["count"]:
        problems.append(f"{name} has {meta.num_rows} rows, the manifest says {entry['count']}")
    # Only labels and counts are checked: an IVF shard stored without its coarse quantizer needs
    # no trained.faiss for them.
    index = read_index(vdir / entry["index"], mmap=spec.kind.shared_quantizer)
    if index.d != spec.dim:
        problems.append(f"{entry['index']} has dimension {index.d}, expected {spec.dim}")
    if index.ntotal != entry["count"]:
        problems.append(f"{entry['index']} holds {index.ntotal} vectors, the manifest says {entry['count']}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        problems.append(f"{entry['index']} does not use inner product")
    labels = _index_labels(index)
    expected = labels_for(entry["shard"], entry["count"])
    if labels is not None and not np.array_equal(np.sort(labels), expected):
        problems.append(f"{entry['index']} does not hold exactly the labels of shard {entry['shard']} rows 0..{entry['count'] - 1}")
    if spec.refine and not entry.get("vectors"):
        problems.append(f"shard {entry['shard']} has no exact vectors to re-score its lossy {spec.factory} codes")
    elif entry.get("vectors"):
        try:
            open_vectors(vdir / entry["vectors"], entry["count"], spec.dim)
        except DamagedFileError as e:
            problems.append(str(e))
    return problems


def _index_labels(index: faiss.Index) -> np.ndarray | None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        invlists = ivf.invlists
        parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                 for i in range(ivf.nlist) if invlists.list_size(i)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map)
    return None


def verify_against_corpus(manifest: dict[str, Any], index_dir: str | os.PathLike, listing: pa.Table) -> list[str]:
    """Compare the version with the corpus as it is now (``listing``: id, content_hash): every
    image indexed (or known corrupt) once with its current content."""
    store = IndexStore(index_dir)
    vdir = store.version_dir(manifest["version"])
    indexed = pa.concat_tables([pq.read_table(vdir / e["embeddings"], columns=["id", "content_hash"]) for e in manifest["shards"]])
    corrupt = manifest.get("corrupt", [])
    corrupt_rows = pa.table({"id": pa.array([c["id"] for c in corrupt], pa.string()),
                             "content_hash": pa.array([c["content_hash"] for c in corrupt], pa.string())})
    known = pa.concat_tables([indexed.cast(KEY_SCHEMA), corrupt_rows.cast(KEY_SCHEMA)])
    now = listing.select(["id", "content_hash"])
    problems = []
    missing = now.join(known.select(["id"]), keys="id", join_type="left anti").column("id").to_pylist()
    extra = known.join(now.select(["id"]), keys="id", join_type="left anti").column("id").to_pylist()
    both = now.join(known.rename_columns(["id", "indexed_hash"]), keys="id", join_type="inner")
    stale = both.filter(pc.not_equal(both.column("content_hash"), both.column("indexed_hash"))).column("id").to_pylist()
    if missing:
        problems.append(f"{len(missing)} corpus images are not indexed (e.g. {sorted(missing)[:5]}); run `idml index update`")
    if extra:
        problems.append(f"{len(extra)} indexed images are no longer in the corpus (e.g. {sorted(extra)[:5]}); run `idml index update`")
    if stale:
        problems.append(f"{len(stale)} images changed since they were indexed (e.g. {sorted(stale)[:5]}); run `idml index update`")
    return problems
