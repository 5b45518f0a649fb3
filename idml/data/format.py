"""The one on-disk dataset format: sharded Parquet per split plus ``manifest.json``.

Layout::

    <root>/manifest.json
    <root>/<split>/part-00000.parquet, part-00001.parquet, ...

Every row holds one encoded image (PNG or JPEG bytes) and its labels; see
``DATASET_SCHEMA``. ``label`` is a dataset-wide class index; consumers that need
targets 0..C-1 for one split use ``contiguous_targets``.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from idml.data.conversion_report import ConversionReport
from idml.data.source import DATASET_SCHEMA, FORMAT_VERSION, MANIFEST_NAME, open_dataset, seal_manifest
from idml.files import file_sha256
from idml.errors import InputError
from idml.integrity import STAMPS_NAME

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_SHARD_BYTES = 64 << 20
# Small row groups let streaming readers fetch a piece of a shard at a time.
ROW_GROUP_ROWS = 512

COLUMNS = tuple(DATASET_SCHEMA.names)

@dataclass
class ImageRecord:
    id: str
    image: bytes
    label: int
    class_name: str
    domain: str
    split: str
    # Where the record came from (e.g. a file path); only used in error messages.
    source: str | None = field(default=None, compare=False, repr=False)


class _ShardWriter:
    """Writes one split as shards that roll over at ``shard_bytes`` of image data."""

    def __init__(self, tmp_root: Path, split: str, shard_bytes: int):
        self.dir = tmp_root / split
        self.dir.mkdir(parents=True)
        self.split = split
        self.shard_bytes = shard_bytes
        self.shards: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._rows = 0
        self._image_bytes = 0
        self._buffer: list[ImageRecord] = []

    def add(self, record: ImageRecord) -> None:
        if self._writer is None:
            self._open()
        self._buffer.append(record)
        self._rows += 1
        self._image_bytes += len(record.image)
        if len(self._buffer) >= ROW_GROUP_ROWS:
            self._flush()
        if self._image_bytes >= self.shard_bytes:
            self._close_shard()

    def close(self) -> None:
        if self._writer is not None:
            self._close_shard()

    def _open(self) -> None:
        self._path = self.dir / f"part-{len(self.shards):05d}.parquet"
        self._writer = pq.ParquetWriter(
            self._path,
            DATASET_SCHEMA,
            # Images are already compressed; only the small string columns gain from it.
            compression={name: ("NONE" if name == "image" else "ZSTD") for name in COLUMNS},
            use_dictionary=["class_name", "domain", "split"],
        )
        self._rows = 0
        self._image_bytes = 0

    def _flush(self) -> None:
        if not self._buffer:
            return
        columns = {
            "id": [r.id for r in self._buffer],
            "image": [r.image for r in self._buffer],
            "label": [int(r.label) for r in self._buffer],
            "class_name": [r.class_name for r in self._buffer],
            "domain": [r.domain for r in self._buffer],
            "split": [r.split for r in self._buffer],
        }
        table = pa.Table.from_pydict(columns, schema=DATASET_SCHEMA)
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self._buffer = []

    def _close_shard(self) -> None:
        self._flush()
        self._writer.close()
        self._writer = None
        self.shards.append(
            {
                "path": f"{self.split}/{self._path.name}",
                "num_rows": self._rows,
                "bytes": self._path.stat().st_size,
                "sha256": file_sha256(self._path),
            }
        )


def _check_record(record: ImageRecord) -> None:
    where = f"record {record.id!r}" + (f" from {record.source}" if record.source else "")
    if record.split not in SPLITS:
        raise ValueError(f"{where} has split {record.split!r}; expected one of {SPLITS}")
    if not isinstance(record.image, (bytes, bytearray, memoryview)) or len(record.image) == 0:
        raise ValueError(f"{where} has no encoded image bytes")
    if not isinstance(record.label, numbers.Integral) or isinstance(record.label, bool) or record.label < 0:
        raise ValueError(f"{where} has label {record.label!r}; labels are ints >= 0")
    if not record.class_name:
        raise ValueError(f"{where} has an empty class_name")
    if not record.domain:
        raise ValueError(f"{where} has an empty domain; use 'default' when there are none")


def check_destination(root: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuse an output path whose contents a write would lose, before any work starts: a file,
    a path under a file, a non-empty folder that is not a dataset, a dataset without
    ``overwrite``, or a dataset folder that also holds other files (``overwrite`` replaces only
    what a dataset consists of)."""
    root = Path(root)
    ancestor = root.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise NotADirectoryError(f"cannot create output folder {root}: {ancestor} is a file; choose another output path")
    if not root.exists():
        return
    if not root.is_dir():
        raise FileExistsError(f"output path {root} is a file, not a folder; choose a new or empty folder")
    entries = sorted(p.name for p in root.iterdir())
    if not entries:
        return
    manifest = _dataset_manifest(root)
    if manifest is None:
        raise FileExistsError(
            f"output folder {root} already holds other files ({_some(entries)}) and is not an idml dataset; "
            "nothing was written: choose a new or empty folder")
    if not overwrite:
        raise FileExistsError(
            f"output folder {root} already holds dataset {manifest.get('name')!r}; nothing was written: "
            "pass --overwrite (overwrite=True) to replace it, or choose a new folder")
    foreign = [e for e in entries if e not in (MANIFEST_NAME, STAMPS_NAME, *SPLITS)]
    if foreign:
        raise FileExistsError(
            f"output folder {root} holds dataset {manifest.get('name')!r} and other files ({_some(foreign)}); "
            "--overwrite replaces only a folder that holds just a dataset: move those files out first")


def _dataset_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest if ``root`` holds an idml dataset (any format version), else None. A
    ``manifest.json`` of another tool (a web extension's, say) does not make a dataset."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    is_ours = isinstance(manifest, dict) and "format_version" in manifest and isinstance(manifest.get("splits"), dict)
    return manifest if is_ours else None


def _some(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _warn_about_leftovers(root: Path) -> None:
    # A conversion killed mid-write leaves its hidden temporary folder; it is never deleted here,
    # as it may belong to a conversion still running.
    leftovers = sorted(p.name for p in root.parent.glob(f".{root.name}.tmp-*")) if root.parent.is_dir() else []
    if leftovers:
        logger.warning("%s holds %d unfinished output(s) of an interrupted conversion (%s); delete them to free "
                       "the space once no conversion into %s is running", root.parent, len(leftovers),
                       _some(leftovers), root)


def write_dataset(
    records: Iterable[ImageRecord],
    root: str | os.PathLike,
    *,
    name: str,
    source: dict[str, Any] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    report: ConversionReport | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``records`` as a dataset at ``root`` and return its manifest.

    Everything is written to a temporary sibling folder that is renamed into
    place at the end, so a failure never leaves a half-written dataset at
    ``root``. What ``check_destination`` refuses is never touched.
    """
    root = Path(root)
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be > 0 (--shard-mb), got {shard_bytes}")
    check_destination(root, overwrite=overwrite)
    _warn_about_leftovers(root)
    tmp_root = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp_root.mkdir(parents=True)
    except OSError as e:
        raise InputError(f"cannot write output folder {root}: {e.strerror or e} in {root.parent}; "
                         "choose a writable location") from e
    report = report if report is not None else ConversionReport()
    try:
        manifest = _write_into(records, tmp_root, name=name, source=source, shard_bytes=shard_bytes, report=report)
        manifest = seal_manifest(manifest)
        with open(tmp_root / MANIFEST_NAME, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        if root.exists():
            # Move the old dataset aside first so `root` is always either old or new.
            trash = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(root, trash)
            os.rename(tmp_root, root)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp_root, root)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    return manifest


class _Identity:
    """Unique ids, and one class name per label and one label per class name, across splits."""

    def __init__(self):
        self.sources: dict[str, str | None] = {}
        self.label_to_class: dict[int, str] = {}
        self.class_to_label: dict[str, int] = {}

    def check(self, record: ImageRecord) -> None:
        label = int(record.label)
        if record.id in self.sources:
            first = self.sources[record.id]
            sources = " and ".join(repr(s) for s in (first, record.source) if s)
            raise ValueError(
                f"duplicate image id {record.id!r}" + (f" (from {sources})" if sources else "")
                + "; ids must be unique across the dataset"
            )
        self.sources[record.id] = record.source
        if self.label_to_class.setdefault(label, record.class_name) != record.class_name:
            raise ValueError(
                f"label {label} is used for class {self.label_to_class[label]!r} and for "
                f"{record.class_name!r} (record {record.id!r}); each label must name one class"
            )
        if self.class_to_label.setdefault(record.class_name, label) != label:
            raise ValueError(
                f"class {record.class_name!r} has labels {self.class_to_label[record.class_name]} and "
                f"{label} (record {record.id!r}); each class must have one label"
            )


def _write_into(
    records: Iterable[ImageRecord],
    tmp_root: Path,
    *,
    name: str,
    source: dict[str, Any] | None,
    shard_bytes: int,
    report: ConversionReport,
) -> dict[str, Any]:
    writers: dict[str, _ShardWriter] = {}
    identity = _Identity()
    stats: dict[str, dict[str, Any]] = {}
    class_splits: set[tuple[int, str]] = set()

    for record in records:
        _check_record(record)
        identity.check(record)
        label = int(record.label)
        if record.split not in writers:
            writers[record.split] = _ShardWriter(tmp_root, record.split, shard_bytes)
            stats[record.split] = {"labels": set(), "per_class": {}, "per_domain": {}}
        writers[record.split].add(record)
        s = stats[record.split]
        s["labels"].add(label)
        s["per_class"][record.class_name] = s["per_class"].get(record.class_name, 0) + 1
        s["per_domain"][record.domain] = s["per_domain"].get(record.domain, 0) + 1
        class_splits.add((label, record.split))

    if not writers:
        raise ValueError("no records to write; the dataset would be empty")
    for writer in writers.values():
        writer.close()

    splits = {}
    for split in SPLITS:
        if split not in writers:
            continue
        s = stats[split]
        splits[split] = {
            "num_images": sum(s["per_class"].values()),
            "num_classes": len(s["labels"]),
            "labels": sorted(s["labels"]),
            "images_per_class": dict(sorted(s["per_class"].items())),
            "images_per_domain": dict(sorted(s["per_domain"].items())),
            "shards": writers[split].shards,
        }
    report.written = {split: info["num_images"] for split, info in splits.items()}
    split_order = {split: i for i, split in enumerate(SPLITS)}
    classes = [
        {"label": label, "class_name": identity.label_to_class[label], "split": split}
        for label, split in sorted(class_splits, key=lambda ls: (ls[0], split_order[ls[1]]))
    ]
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": dict(source or {}),
        "classes": classes,
        "splits": splits,
        "conversion_report": report.to_dict(),
    }


def split_files(root: str | os.PathLike, split: str) -> list[str]:
    """Absolute paths of the shards of ``split`` of the local dataset at ``root``, in order."""
    return open_dataset(Path(root).resolve()).paths(split)


def read_split(
    root: str | os.PathLike, split: str, columns: list[str] | None = None
) -> pa.Table:
    if columns is not None:
        unknown = [c for c in columns if c not in COLUMNS]
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; columns are {list(COLUMNS)}")
    tables = [pq.read_table(path, columns=columns) for path in split_files(root, split)]
    schema = DATASET_SCHEMA if columns is None else pa.schema([DATASET_SCHEMA.field(c) for c in columns])
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)
