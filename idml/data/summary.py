"""Human-readable summaries and sample grids of an idml dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from idml.data.format import SPLITS
from idml.data.source import open_dataset, read_manifest
from idml.data.images import InvalidImageError, decode_image


def summarize(root: str | os.PathLike) -> str:
    """A table per split (images, classes, domains, shards, MiB) plus the conversion report."""
    manifest = read_manifest(root)
    lines = [
        f"dataset {manifest.get('name')!r} at {root}",
        f"created {manifest.get('created_at')}, source {manifest.get('source', {}).get('converter', '?')}",
        "",
        f"{'split':<8}{'images':>9}{'classes':>9}{'domains':>9}{'shards':>8}{'MiB':>9}",
    ]
    totals = [0, 0, 0, 0.0]
    splits = manifest.get("splits", {})
    for split in [s for s in SPLITS if s in splits] + [s for s in splits if s not in SPLITS]:
        info = splits[split]
        mib = sum(s["bytes"] for s in info["shards"]) / (1 << 20)
        lines.append(
            f"{split:<8}{info['num_images']:>9}{info['num_classes']:>9}"
            f"{len(info['images_per_domain']):>9}{len(info['shards']):>8}{mib:>9.1f}"
        )
        totals = [totals[0] + info["num_images"], totals[1] + info["num_classes"], totals[2] + len(info["shards"]), totals[3] + mib]
    lines.append(f"{'total':<8}{totals[0]:>9}{totals[1]:>9}{'':>9}{totals[2]:>8}{totals[3]:>9.1f}")
    domains = sorted({d for info in splits.values() for d in info["images_per_domain"]})
    lines.append(f"domains: {', '.join(domains)}")

    report = manifest.get("conversion_report") or {}
    skipped = report.get("skipped", {})
    if skipped:
        lines.append("")
        lines.append(f"skipped inputs ({sum(skipped.values())}):")
        for reason, count in skipped.items():
            examples = report.get("examples", {}).get(reason, [])
            lines.append(f"  {reason}: {count}" + (f"  e.g. {', '.join(examples[:3])}" if examples else ""))
    else:
        lines.append("skipped inputs: none")
    empty = report.get("empty_classes", [])
    if empty:
        lines.append(f"classes without valid images (left out): {len(empty)}: {', '.join(empty[:20])}")
    lines.extend(f"note: {note}" for note in report.get("notes", []))
    return "\n".join(lines)


def save_sample_grid(
    root: str | os.PathLike,
    path: str | os.PathLike,
    split: str = "train",
    n_classes: int = 8,
) -> str:
    """Save a PNG grid: one row per class (``n_classes`` evenly spaced labels), one column per domain."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Pick rows from the small columns first, then read images only from shards that hold them.
    picks: dict[tuple[int, str], tuple[int, int]] = {}  # (label, domain) -> (shard, row)
    names: dict[int, str] = {}
    source = open_dataset(root)
    source.check_shards([split])  # a damaged shard is named, not met as a missing column mid-read
    files = source.paths(split)
    metas = [pq.read_table(file, columns=["label", "class_name", "domain"]) for file in files]
    all_labels = sorted({l for t in metas for l in pc.unique(t.column("label")).to_pylist()})
    # Evenly spaced classes show more of the dataset than the first few labels.
    step = max(1, len(all_labels) / max(1, n_classes))
    labels = sorted({all_labels[int(i * step)] for i in range(min(n_classes, len(all_labels)))})
    domains = sorted({d for t in metas for d in pc.unique(t.column("domain")).to_pylist()})
    wanted = set(labels)
    for shard_index, table in enumerate(metas):
        for row, (label, class_name, domain) in enumerate(
            zip(table.column("label").to_pylist(), table.column("class_name").to_pylist(), table.column("domain").to_pylist())
        ):
            if label in wanted and (label, domain) not in picks:
                picks[(label, domain)] = (shard_index, row)
                names[label] = class_name

    images = {}
    for shard_index in sorted({s for s, _ in picks.values()}):
        column = pq.read_table(files[shard_index], columns=["image"]).column("image")
        for key, (s, row) in picks.items():
            if s == shard_index:
                try:
                    images[key] = decode_image(column[row].as_py())
                except InvalidImageError:
                    images[key] = None

    rows, cols = max(1, len(labels)), max(1, len(domains))
    fig = Figure(figsize=(1.8 * cols, 1.9 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for r, label in enumerate(labels):
        for c, domain in enumerate(domains):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            image = images.get((label, domain))
            if image is not None:
                ax.imshow(image)
            else:
                ax.set_axis_off()
            ax.set_title(f"{names.get(label, label)}\n{domain}", fontsize=7)
    fig.suptitle(f"{read_manifest(root).get('name')} / {split}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return str(path)
