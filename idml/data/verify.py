"""``idml data inspect --verify``: everything reading a dataset relies on, checked at once (the
readers check only what they need as they go: ``DatasetSource.check_shards``)."""

from __future__ import annotations

import os

import pyarrow.parquet as pq

from idml.data.source import open_dataset


def verify_dataset(root: str | os.PathLike) -> list[str]:
    """Check everything reading the dataset relies on; returns the problems (empty if OK):
    the manifest's own fields (``manifest_problems``), the cheap checks training runs
    (``DatasetSource.shard_problems``), each shard's sha256 (hashed again, stamps or not), and
    that the rows agree with the manifest: ids unique across the dataset, each row in its
    split, one class name per label, and the manifest's labels, classes and per-class and
    per-domain counts. A dataset without images is a problem too."""
    source = open_dataset(root)
    splits = source.manifest["splits"]
    if not any(info["num_images"] for info in splits.values()):
        return [f"{source.uri} holds no images (the manifest lists no split with images)"]
    problems = []
    for split in splits:
        problems.extend(source.shard_problems(split))
        problems.extend(source.checksum_problems(split, rehash=True))
    # The rows of a shard that does not read, or is not the one recorded, are not worth comparing.
    return problems or _content_problems(source)


def _content_problems(source) -> list[str]:
    """The rows (every column but the images) against the manifest."""
    manifest = source.manifest
    problems: list[str] = []
    seen: dict[str, str] = {}
    class_of: dict[int, str] = {}
    found_classes: set[tuple[int, str, str]] = set()
    for split, info in manifest["splits"].items():
        labels: set[int] = set()
        per_class: dict[str, int] = {}
        per_domain: dict[str, int] = {}
        for path in source.paths(split):
            table = pq.read_table(path, columns=["id", "label", "class_name", "domain", "split"],
                                  filesystem=source.filesystem)
            ids, row_labels, names, domains, row_splits = (table.column(c).to_pylist() for c in
                                                           ("id", "label", "class_name", "domain", "split"))
            for id_, label, name, domain, row_split in zip(ids, row_labels, names, domains, row_splits):
                if id_ in seen:
                    problems.append(f"duplicate image id {id_!r} (in {seen[id_]} and {path})")
                seen[id_] = path
                if row_split != split:
                    problems.append(f"{path}: row {id_!r} has split {row_split!r}, but the shard is in {split!r}")
                if class_of.setdefault(label, name) != name:
                    problems.append(f"{path}: label {label} names class {name!r} and {class_of[label]!r}")
                labels.add(label)
                per_class[name] = per_class.get(name, 0) + 1
                per_domain[domain] = per_domain.get(domain, 0) + 1
                found_classes.add((label, name, split))
        if sorted(labels) != info["labels"]:
            problems.append(f"{split}: the manifest's labels {_few(info['labels'])} are not the shards' "
                            f"{_few(sorted(labels))}")
        for key, counted in (("images_per_class", per_class), ("images_per_domain", per_domain)):
            if info.get(key) != dict(sorted(counted.items())):
                problems.append(f"{split}: the manifest's {key} does not match the shards' rows")
    listed = manifest.get("classes")
    listed_set = ({(c.get("label"), c.get("class_name"), c.get("split")) for c in listed if isinstance(c, dict)}
                  if isinstance(listed, list) else None)
    if listed_set != found_classes:
        problems.append("the manifest's classes (label, class_name, split) do not match the shards' rows")
    if len(problems) > 20:
        problems = problems[:20] + [f"... and {len(problems) - 20} more"]
    return problems


def _few(values: list, limit: int = 8) -> str:
    return "[" + ", ".join(map(str, values[:limit])) + (", ..." if len(values) > limit else "") + "]"
