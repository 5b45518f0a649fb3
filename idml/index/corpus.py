"""What to index: a dataset in the sharded Parquet format, or a folder / URI of raw images.

Listing a corpus records every file's size and mtime (and a dataset shard's checksum from the
dataset's manifest): an update compares them with the previous version's record and reads only
the files that differ (``idml.index.reads.plan_reads``)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from idml.data.boundary import FolderBoundary
from idml.data.converters import IMAGE_SUFFIXES
from idml.data.source import MANIFEST_NAME, filesystem_for, open_dataset

_SUFFIXES = {s.lower() for s in IMAGE_SUFFIXES}
OUTSIDE = "outside the corpus folder"
# A file modified this close to its listing may change again within the same mtime tick, unseen:
# its mtime is not trusted (recorded as unknown), so the next update reads it again. Object
# stores report mtimes in whole seconds, hence more than one.
RACY_SECONDS = 2.0
UNKNOWN_MTIME = -1

# What a version records of each corpus image and its file (``corpus.parquet``).
FILE_STATS_SCHEMA = pa.schema([("file", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                               ("sha256", pa.string())])


@dataclass
class Corpus:
    kind: str  # "dataset" or "images"
    uri: str
    root: str  # path inside ``filesystem``
    filesystem: pafs.FileSystem
    files: list[str]  # Parquet shards (dataset) or image files (images), paths inside ``filesystem``
    num_rows: int
    fingerprint: str  # changes whenever the content may have changed
    num_bytes: int  # on storage (for sizing read blocks)
    splits: list[str] = field(default_factory=list)
    follow_links: bool = False
    outside: list[str] = field(default_factory=list)  # image files skipped: links leading out of the folder
    # Per file of ``files``: size and mtime when listed (mtime UNKNOWN_MTIME when racy) and, for a
    # dataset shard, the sha256 the dataset's manifest records ("" for image files).
    file_stats: pa.Table | None = None

    def describe(self) -> dict[str, Any]:
        return {"uri": self.uri, "kind": self.kind, "splits": self.splits, "num_rows": self.num_rows,
                "fingerprint": self.fingerprint, "follow_links": self.follow_links, "outside": len(self.outside)}

    def relative(self, path: str) -> str:
        """``path`` (inside ``filesystem``) relative to the corpus root: what versions record, so a
        corpus read through another URI of the same folder still matches."""
        prefix = self.root.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else path


def _file_stats(rel_paths: list[str], infos: list[pafs.FileInfo], sha256: list[str], listed_at: float) -> pa.Table:
    mtimes = []
    for info in infos:
        mtime = info.mtime_ns
        racy = mtime is None or listed_at - mtime / 1e9 < RACY_SECONDS
        mtimes.append(UNKNOWN_MTIME if racy else int(mtime))
    return pa.table({"file": pa.array(rel_paths, pa.string()), "size": pa.array([int(i.size) for i in infos], pa.int64()),
                     "mtime_ns": pa.array(mtimes, pa.int64()), "sha256": pa.array(sha256, pa.string())},
                    schema=FILE_STATS_SCHEMA)


def resolve_corpus(uri: str, splits: list[str] | None = None, *, follow_links: bool = False) -> Corpus:
    """A dataset folder (``manifest.json`` present; ``splits`` default to all of them) or a
    folder of images (any depth; files with image suffixes; the id is the relative path). Local
    paths and pyarrow filesystem URIs (``file://``, ``s3://``, ``gs://``, ...) both work.

    An image whose real location is outside the folder (a symbolic link, or a file in a linked
    folder, leading out of it) is skipped and listed in ``outside`` unless ``follow_links``: an
    index never takes in files from elsewhere on the machine without a word."""
    fs, root = filesystem_for(uri)
    uri = uri if "://" in uri else root  # absolute, so `update` finds it from any folder
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"corpus {uri} is not a folder; pass a dataset folder or a folder of images")
    manifest_info = fs.get_file_info(f"{root}/{MANIFEST_NAME}")
    if manifest_info.type == pafs.FileType.File:
        return _dataset(uri, splits)
    if splits:
        raise ValueError(f"--split applies to datasets; {uri} is a folder of images (it has no {MANIFEST_NAME})")
    return _images(uri, fs, root, follow_links)


def _dataset(uri: str, splits: list[str] | None) -> Corpus:
    source = open_dataset(uri)
    available = list(source.manifest.get("splits", {}))
    splits = list(splits or available)
    unknown = [s for s in splits if s not in available]
    if unknown:
        raise ValueError(f"split(s) {unknown} not in {uri}; available splits: {', '.join(available) or 'none'}")
    source.check_shards(splits)  # a damaged shard is refused here, not halfway through embedding
    shards = [shard for s in splits for shard in source.shards(s)]
    files = [f"{source.root}/{shard['path']}" for shard in shards]
    num_rows = sum(source.num_images(s) for s in splits)
    num_bytes = sum(int(shard.get("bytes", 0)) for shard in shards)
    fingerprint = hashlib.sha256(source.manifest_bytes + json.dumps(splits).encode()).hexdigest()
    listed_at = time.time()
    stats = _file_stats([shard["path"] for shard in shards], source.filesystem.get_file_info(files),
                        [str(shard.get("sha256") or "") for shard in shards], listed_at)
    return Corpus("dataset", uri, source.root, source.filesystem, files, num_rows, fingerprint, num_bytes, splits,
                  file_stats=stats)


def _images(uri: str, fs: pafs.FileSystem, root: str, follow_links: bool) -> Corpus:
    listed_at = time.time()
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted((i for i in infos if i.type == pafs.FileType.File and os.path.splitext(i.path)[1].lower() in _SUFFIXES),
                   key=lambda i: i.path)
    outside: list[str] = []
    if isinstance(fs, pafs.LocalFileSystem) and not follow_links:  # only a local folder has links
        boundary = FolderBoundary(root)
        inside = [boundary.contains(i.path) for i in files]
        outside = [i.path for i, ok in zip(files, inside) if not ok]
        files = [i for i, ok in zip(files, inside) if ok]
    if not files:
        hint = (f"; {len(outside)} lie {OUTSIDE} (symbolic links leading out of it): pass --follow-links to read them"
                if outside else "")
        raise ValueError(f"{uri} holds no images (files ending in {', '.join(sorted(_SUFFIXES))}){hint}")
    digest = hashlib.sha256()
    for i in files:
        digest.update(f"{i.path}\0{i.size}\0{i.mtime_ns}\n".encode())
    corpus = Corpus("images", uri, root, fs, [i.path for i in files], len(files), digest.hexdigest(),
                    sum(i.size for i in files), follow_links=follow_links, outside=outside)
    corpus.file_stats = _file_stats([corpus.relative(i.path) for i in files], files, [""] * len(files), listed_at)
    return corpus


def read_ids_and_images(corpus: Corpus, path: str):
    """One corpus file as a pyarrow table with ``id`` + ``image`` (dataset) or ``path`` + ``bytes``
    (an image file), plus the file's ``path``: the input ``BatchEmbedder`` takes (used outside
    Ray: benchmarks, tests)."""
    if corpus.kind == "dataset":
        table = pq.read_table(path, columns=["id", "image"], filesystem=corpus.filesystem)
        return table.append_column("path", pa.array([path] * table.num_rows, pa.string()))
    with corpus.filesystem.open_input_stream(path) as f:
        return pa.table({"path": [path], "bytes": pa.array([f.read()], pa.binary())})
