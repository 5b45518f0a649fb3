"""What to index: a dataset in the sharded Parquet format, or a folder / URI of raw images."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from idml.data.boundary import FolderBoundary
from idml.data.converters import IMAGE_SUFFIXES
from idml.data.source import MANIFEST_NAME, filesystem_for, open_dataset

_SUFFIXES = {s.lower() for s in IMAGE_SUFFIXES}
OUTSIDE = "outside the corpus folder"


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

    def describe(self) -> dict[str, Any]:
        return {"uri": self.uri, "kind": self.kind, "splits": self.splits, "num_rows": self.num_rows,
                "fingerprint": self.fingerprint, "follow_links": self.follow_links, "outside": len(self.outside)}


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
    source = open_dataset(uri, builtin=False)
    available = list(source.manifest.get("splits", {}))
    splits = list(splits or available)
    unknown = [s for s in splits if s not in available]
    if unknown:
        raise ValueError(f"split(s) {unknown} not in {uri}; available splits: {', '.join(available) or 'none'}")
    source.check_shards(splits)  # a damaged shard is refused here, not halfway through embedding
    files = [path for s in splits for path in source.paths(s)]
    num_rows = sum(source.num_images(s) for s in splits)
    num_bytes = sum(int(shard.get("bytes", 0)) for s in splits for shard in source.shards(s))
    fingerprint = hashlib.sha256(source.manifest_bytes + json.dumps(splits).encode()).hexdigest()
    return Corpus("dataset", uri, source.root, source.filesystem, files, num_rows, fingerprint, num_bytes, splits)


def _images(uri: str, fs: pafs.FileSystem, root: str, follow_links: bool) -> Corpus:
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
    return Corpus("images", uri, root, fs, [i.path for i in files], len(files), digest.hexdigest(),
                  sum(i.size for i in files), follow_links=follow_links, outside=outside)


def read_ids_and_images(corpus: Corpus, path: str):
    """One corpus file as a pyarrow table with ``id`` + ``image`` (dataset) or ``path`` + ``bytes``
    (an image file), the input ``BatchEmbedder`` takes (used outside Ray: benchmarks, tests)."""
    import pyarrow as pa

    if corpus.kind == "dataset":
        return pq.read_table(path, columns=["id", "image"], filesystem=corpus.filesystem)
    with corpus.filesystem.open_input_stream(path) as f:
        return pa.table({"path": [path], "bytes": pa.array([f.read()], pa.binary())})
