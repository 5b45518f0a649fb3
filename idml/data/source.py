"""The one way to open a dataset: a built-in name, a local folder, or any pyarrow/fsspec URI
(``s3://``, ``gs://``, ``file://``, ...). Pure pyarrow (fsspec for schemes pyarrow lacks), no Ray
and no torch: the local loop, the Ray pipelines and the indexer all start here."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from idml.errors import DamagedFileError
from idml.files import stream_sha256
from idml.integrity import STAMPS_NAME, Stamps, describe_digest, is_sha256

__all__ = ["DATASET_SCHEMA", "FORMAT_VERSION", "MANIFEST_NAME", "DatasetSource", "contiguous_targets",
           "filesystem_for", "manifest_digest", "manifest_problems", "open_dataset", "read_manifest", "schema_problems",
           "seal_manifest", "split_info"]

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

    def checksum_problems(self, split: str, *, rehash: bool = False) -> list[str]:
        """The shards of ``split`` whose content is not the one the manifest's sha256 records (a
        shard swapped for another of the same size, bytes overwritten in place). A local shard
        found sound before is known by its stamp (``idml.integrity.Stamps``, kept beside the
        manifest) and hashed again only when its stat changed; ``rehash`` hashes every one."""
        stamps = Stamps(None if rehash or not self.is_local else f"{self.root}/{STAMPS_NAME}")
        problems = []
        for shard in self.shards(split):
            path = f"{self.root}/{shard['path']}"
            try:
                if self.is_local:
                    sound, digest = stamps.matches(shard["path"], shard["sha256"], path)
                else:
                    with self.filesystem.open_input_stream(path) as f:
                        digest = stream_sha256(f)
                    sound = digest == shard["sha256"]
            except FileNotFoundError:
                continue  # ``shard_problems`` names it
            except OSError as e:
                problems.append(f"{split}: cannot read {path} ({e.strerror or e})")
                continue
            if not sound:
                problems.append(f"{split}: checksum mismatch for {path} ({describe_digest(digest, shard['sha256'])}): "
                                "the shard was damaged or replaced")
        stamps.save()
        return problems

    def check_shards(self, splits: list[str] | tuple[str, ...] | None = None) -> None:
        """Refuse a damaged dataset before any work starts: ``shard_problems`` of ``splits``
        (default: every split in the manifest), then each shard's checksum
        (``checksum_problems``), raised as one ``DamagedFileError`` that names the shards.
        Training runs it on the driver, before a worker or an epoch starts."""
        available = list(self.manifest.get("splits", {}))
        chosen = [split for split in (available if splits is None else splits) if split in available]
        problems = [p for split in chosen for p in self.shard_problems(split)]
        if not problems:
            problems = [p for split in chosen for p in self.checksum_problems(split)]
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


def open_dataset(uri: str | os.PathLike) -> DatasetSource:
    """Find the dataset (a folder or a URI) and read its manifest, with an error that says what
    to do when it does not exist, is not a dataset, or was written by another format version.
    It never fetches: a built-in name such as ``emoji`` is resolved by the entry point first
    (``idml.data.builtin.resolve_dataset``), so reading a dataset never downloads one."""
    uri = str(uri)
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
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8 text, nested too deeply
        why = " ".join(str(e).split())[:200] if not isinstance(e, RecursionError) else "nested too deeply"
        raise DamagedFileError(f"{where}/{MANIFEST_NAME} is not valid JSON ({why}); re-create the dataset") from e
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}/{MANIFEST_NAME} has format_version {version!r}; this idml reads version "
                         f"{FORMAT_VERSION}. Re-create the dataset with this idml version")
    recorded = manifest.get(MANIFEST_CHECKSUM)
    # Manifests written before the checksum existed have none; their fields are still checked below.
    if recorded is not None and recorded != manifest_digest(manifest):
        raise DamagedFileError(f"{where}/{MANIFEST_NAME} is damaged: its content does not match its checksum "
                               f"({MANIFEST_CHECKSUM}), so it was changed after it was written; re-create the dataset "
                               "with `idml data convert` or `idml data fetch`")
    problems = manifest_problems(manifest)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DamagedFileError(f"{where}/{MANIFEST_NAME} is damaged: {'; '.join(problems[:3])}{more}; "
                               "re-create the dataset with `idml data convert` or `idml data fetch`")
    return DatasetSource(uri, root, fs, manifest, raw)


_SPLIT_NAMES = ("train", "val", "test")
# The manifest's own checksum: sha256 of its canonical JSON without this key (``manifest_digest``).
MANIFEST_CHECKSUM = "manifest_sha256"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The checksum of a manifest's content: whitespace and key order do not count."""
    content = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with its checksum (what ``write_dataset`` stores)."""
    return {**{k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}, MANIFEST_CHECKSUM: manifest_digest(manifest)}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """What makes a manifest unusable, from its own fields (no shard is opened): the types every
    reader relies on, shard paths that stay inside the dataset folder, a sha256 per shard, and
    labels that agree with ``num_classes`` (rows against counts: ``shard_problems``). Empty when it is well formed."""
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return [f"'splits' must be a mapping of split names, got {type(splits).__name__}"]
    problems = []
    for split, info in splits.items():
        if split not in _SPLIT_NAMES:
            problems.append(f"unknown split {split!r} (splits are {', '.join(_SPLIT_NAMES)})")
            continue
        if not isinstance(info, dict):
            problems.append(f"splits.{split} must be a mapping, got {type(info).__name__}")
            continue
        for key in ("num_images", "num_classes"):
            if not _is_count(info.get(key)):
                problems.append(f"splits.{split}.{key} must be a count, got {info.get(key)!r}")
        labels = info.get("labels")
        if not isinstance(labels, list) or not all(_is_count(label) for label in labels):
            problems.append(f"splits.{split}.labels must be a list of labels (ints >= 0)")
        elif len(set(labels)) != len(labels) or info.get("num_classes") != len(labels):
            problems.append(f"splits.{split}.labels holds {len(set(labels))} distinct of {len(labels)} labels, "
                            f"num_classes says {info.get('num_classes')!r}")
        shards = info.get("shards")
        if not isinstance(shards, list):
            problems.append(f"splits.{split}.shards must be a list of shards, got {type(shards).__name__}")
            continue
        for i, shard in enumerate(shards):
            problems.extend(f"splits.{split}.shards[{i}] {p}" for p in _shard_entry_problems(shard))
    return problems


def _shard_entry_problems(shard: Any) -> list[str]:
    if not isinstance(shard, dict):
        return [f"must be a mapping, got {type(shard).__name__}"]
    problems = []
    path = shard.get("path")
    if not isinstance(path, str) or not path:
        problems.append(f"has no path ({path!r})")
    elif (path.startswith("/") or "\\" in path or "\0" in path or posixpath.normpath(path) != path
          or path.split("/")[0] not in _SPLIT_NAMES):
        problems.append(f"path {path!r} is not a file inside the dataset folder (<split>/<name>.parquet)")
    for key in ("num_rows", "bytes"):
        if not _is_count(shard.get(key)):
            problems.append(f"{key} must be a count, got {shard.get(key)!r}")
    if not is_sha256(shard.get("sha256")):
        problems.append(f"has no sha256 checksum ({shard.get('sha256')!r})")
    return problems


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the dataset at ``root`` (a folder or URI; no built-in names)."""
    return open_dataset(root).manifest


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
