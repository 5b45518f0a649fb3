"""The one way to open a dataset: a built-in name, a local folder, or any pyarrow/fsspec URI
(``s3://``, ``gs://``, ``file://``, ...). Pure pyarrow (fsspec for schemes pyarrow lacks), no Ray
and no torch: the local loop, the Ray pipelines and the indexer all start here."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from idml.errors import DamagedFileError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# What every shard holds (``format.py`` writes it, every reader expects it).
DATASET_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)

_HOW_TO_CREATE = (
    "create it with `idml data convert <format> <src> <root>` "
    "or fetch a built-in dataset with `idml data fetch <name>`"
)


@dataclass(frozen=True)
class DatasetSource:
    """A dataset in the project's format, wherever it is stored."""

    uri: str  # as the user gave it
    root: str  # the folder inside ``filesystem``
    filesystem: pafs.FileSystem
    manifest: dict
    manifest_bytes: bytes = field(default=b"", repr=False, compare=False)  # as stored (for fingerprints)

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def check_local(self) -> None:
        if not self.is_local:
            raise ValueError(f"dataset {self.uri} is not on the local disk; the single-process loop reads local "
                             "folders (copy it locally, or train with --ray, which reads any URI)")

    def split_info(self, split: str) -> dict[str, Any]:
        return split_info(self.manifest, split, self.uri)

    def has_split(self, split: str) -> bool:
        return self.manifest.get("splits", {}).get(split, {}).get("num_images", 0) > 0

    def shards(self, split: str) -> list[dict[str, Any]]:
        return list(self.split_info(split)["shards"])

    def paths(self, split: str) -> list[str]:
        """The shard files of ``split``, in order (paths inside ``filesystem``)."""
        return [f"{self.root}/{shard['path']}" for shard in self.shards(split)]

    def sample_images(self, split: str, n: int = 2) -> list[bytes]:
        """The first ``n`` encoded images of ``split`` (an MLflow model's input example)."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.paths(split)[0], columns=["image"], filesystem=self.filesystem)
        return [bytes(b) for b in table.column("image").to_pylist()[:n]]

    def label_to_target(self, split: str) -> dict[int, int]:
        return contiguous_targets(self.manifest, split)

    def num_images(self, split: str) -> int:
        return int(self.split_info(split)["num_images"])

    def shard_problems(self, split: str) -> list[str]:
        """What is wrong with the shards of ``split`` against the manifest, found cheaply: each
        shard exists and its Parquet footer reads, it has the dataset's columns and types, the
        manifest's row count and size, and the rows add up to ``num_images``. Only file metadata
        is read (no images, no checksums). Empty when all is well."""
        info = self.split_info(split)
        problems: list[str] = []
        total = 0
        for shard in info.get("shards", []):
            path = f"{self.root}/{shard['path']}"
            file = self.filesystem.get_file_info(path)
            if file.type != pafs.FileType.File:
                problems.append(f"{split}: missing shard {path}")
                continue
            try:
                with self.filesystem.open_input_file(path) as f:
                    meta = pq.ParquetFile(f).metadata
                    schema = meta.schema.to_arrow_schema()
            except Exception as e:  # any Parquet/IO error is a problem to report, not to raise
                problems.append(f"{split}: cannot read {path} as Parquet ({e})")
                continue
            # The most telling problem first: a missing column says more than the size it changed.
            problems.extend(f"{split}: {path} {problem}" for problem in schema_problems(schema))
            if meta.num_rows != shard["num_rows"]:
                problems.append(f"{split}: {path} has {meta.num_rows} rows, manifest says {shard['num_rows']}")
            if file.size != shard["bytes"]:
                problems.append(f"{split}: {path} has {file.size} bytes, manifest says {shard['bytes']}")
            total += meta.num_rows
        if total != info.get("num_images") and not problems:
            problems.append(f"{split}: shards hold {total} rows, manifest says {info.get('num_images')} images")
        return problems

    def check_shards(self, splits: list[str] | tuple[str, ...] | None = None) -> None:
        """Refuse a damaged dataset before any work starts: ``shard_problems`` of ``splits``
        (default: every split in the manifest), raised as one ``DamagedFileError`` that names
        the shards. Training runs it on the driver, before a worker or an epoch starts."""
        available = list(self.manifest.get("splits", {}))
        problems = [p for split in (available if splits is None else splits) if split in available
                    for p in self.shard_problems(split)]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise DamagedFileError(
                f"dataset {self.uri} is damaged: {'; '.join(problems[:3])}{more}. `idml data inspect {self.uri} "
                "--verify` lists every problem; re-create the dataset with `idml data convert` or `idml data fetch`")


def schema_problems(schema: pa.Schema) -> list[str]:
    """The dataset's columns that ``schema`` lacks or holds with another type (extra columns are fine)."""
    problems = []
    for expected in DATASET_SCHEMA:
        index = schema.get_field_index(expected.name)
        if index < 0:
            problems.append(f"has no {expected.name!r} column")
        elif not schema.field(index).type.equals(expected.type):
            problems.append(f"has column {expected.name!r} of type {schema.field(index).type}, expected {expected.type}")
    return problems


def filesystem_for(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it: a local path becomes absolute; a URI goes to
    pyarrow, or to fsspec for a scheme pyarrow lacks (az://, memory://, ...)."""
    uri = str(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)).rstrip("/") or "/"
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import fsspec

        inner, path = fsspec.core.url_to_fs(uri)
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(inner))
    return fs, path.rstrip("/")


def open_dataset(name_or_uri: str | os.PathLike, *, builtin: bool = True) -> DatasetSource:
    """Find the dataset and read its manifest, with an error that says what to do when it does
    not exist, is not a dataset, or was written by another format version. ``builtin``: a bare
    name such as ``emoji`` is fetched into the cache first (``resolve_dataset``)."""
    uri = str(name_or_uri)
    if builtin and "://" not in uri:
        from idml.data.builtin import resolve_dataset  # a built-in name or a local folder

        uri = str(resolve_dataset(uri))
    fs, root = filesystem_for(uri)
    where = uri if "://" in uri else root
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"dataset folder {where} does not exist; {_HOW_TO_CREATE}")
    path = f"{root}/{MANIFEST_NAME}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{where} has no {MANIFEST_NAME}, so it is not an idml dataset; {_HOW_TO_CREATE}"
                                + (" and upload the folder" if "://" in uri else ""))
    with fs.open_input_stream(path) as f:
        raw = f.read()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}/{MANIFEST_NAME} is not valid JSON ({e}); re-create the dataset") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}/{MANIFEST_NAME} has format_version {version!r}; this idml reads version "
                         f"{FORMAT_VERSION}. Re-create the dataset with this idml version")
    return DatasetSource(str(name_or_uri), root, fs, manifest, raw)


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the dataset at ``root`` (a folder or URI; no built-in names)."""
    return open_dataset(root, builtin=False).manifest


def contiguous_targets(manifest: dict[str, Any], split: str) -> dict[int, int]:
    """Map the dataset labels of ``split`` to 0..C-1 in sorted-label order.

    Proxy losses need contiguous targets; every consumer uses this one mapping.
    """
    labels = split_info(manifest, split)["labels"]
    return {int(label): i for i, label in enumerate(sorted(labels))}


def split_info(manifest: dict[str, Any], split: str, root: Any = None) -> dict[str, Any]:
    splits = manifest.get("splits", {})
    if split not in splits:
        where = f" in {root}" if root is not None else ""
        raise ValueError(f"split {split!r} not found{where}; available splits: {', '.join(splits) or 'none'}")
    return splits[split]


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (shard checksums, checkpoint identity)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
