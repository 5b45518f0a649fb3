"""The one conversion pipeline every layout and built-in dataset goes through (``convert_items``):
validate every image, label the classes that kept one, carve ``val`` out of the training classes,
write the dataset (the steps are listed in ``idml.data.converters``)."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Sequence

from tqdm.auto import tqdm

from idml.data.conversion_report import ConversionReport
from idml.data.format import DEFAULT_SHARD_BYTES, ImageRecord, check_destination, write_dataset
from idml.data.images import DEFAULT_MAX_PIXELS, InvalidImageError, normalize_image_bytes
from idml.errors import InputError

from .listing import OUTSIDE, SourceImage

logger = logging.getLogger(__name__)

DEFAULT_VAL_FRACTION = 0.1
# Recall@1 over one class is always 1.0: a validation split needs two classes (of 2+ images)
# before it can tell models apart.
MIN_VAL_CLASSES = 2
# Re-encoded images are kept in memory between validation and writing up to this
# many bytes; beyond it they are re-encoded again while writing.
_CACHE_BUDGET_BYTES = 1 << 30


def select_val_classes(train_classes: Iterable[str], val_fraction: float) -> list[str]:
    """Pick the training classes that move to ``val``, deterministically.

    Classes are ordered by the sha1 hex digest of their name and the first
    round(val_fraction * C) are taken: at least 1 when val_fraction > 0 and C > 1,
    and never all of them. Returns the chosen names sorted.
    """
    check_fraction("val_fraction", val_fraction)
    classes = sorted(set(train_classes))
    if val_fraction == 0.0 or len(classes) < 2:
        return []
    n = min(max(1, round(val_fraction * len(classes))), len(classes) - 1)
    by_hash = sorted(classes, key=lambda c: hashlib.sha1(c.encode("utf-8")).hexdigest())
    return sorted(by_hash[:n])


def select_test_classes(classes: Sequence[str], test_fraction: float) -> set[str]:
    """The last ``int(C * test_fraction)`` of ``classes`` (in their order): at least 1 and at
    most C-1 when ``test_fraction`` > 0 and C > 1; none when it is 0."""
    check_fraction("test_fraction", test_fraction)
    n_test = int(len(classes) * test_fraction)
    if test_fraction > 0 and len(classes) > 1:
        n_test = min(max(n_test, 1), len(classes) - 1)
    return set(classes[len(classes) - n_test :]) if n_test else set()


def check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:  # also refuses nan
        option = name.replace("_", "-")
        raise InputError(f"{name} (--{option}) must be in [0, 1), got {value}")


def _ordered_map(fn: Callable, items: Sequence, workers: int) -> Iterator:
    """Like map(fn, items) on a thread pool, with a bounded number of pending items."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 8 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _default_workers() -> int:
    # Decoding releases the GIL, so threads use the cores without process overhead.
    return max(1, min(4, os.cpu_count() or 1))


def convert_items(
    items: Sequence[SourceImage],
    dst: str | os.PathLike,
    *,
    name: str,
    class_order: Sequence[str],
    source: dict[str, Any] | None = None,
    report: ConversionReport | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Validate ``items``, assign labels and splits, and write the dataset at ``dst``.

    ``class_order`` lists every class (including ones without items) in label order. Items
    with ``split=None`` get theirs from ``test_fraction`` after validation, so that a class
    without valid images never takes a place in a split: ``select_test_classes`` of the classes
    with valid images in class order.
    """
    report = report if report is not None else ConversionReport()
    check_fraction("val_fraction", val_fraction)
    if shard_bytes <= 0:
        raise InputError(f"shard_bytes must be > 0 (--shard-mb), got {shard_bytes}")
    # Refuse an unusable output path now, not after reading every image.
    check_destination(dst, overwrite=overwrite)
    class_split = _class_splits(items, class_order, test_fraction)
    normalize = partial(normalize_image_bytes, max_pixels=max_pixels, max_side=max_side)
    outcome, valid_per_class = _validate(items, class_order, normalize, report, name=name,
                                         workers=num_workers or _default_workers())
    report.empty_classes = [c for c in class_order if valid_per_class.get(c, 0) == 0]
    kept = [c for c in class_order if valid_per_class.get(c, 0) > 0]
    if not kept:
        hint = (f"; {report.skipped[OUTSIDE]} file(s) lie outside the source folder (links or listed paths "
                "leading out of it): pass --follow-links (follow_links=True) to read linked files"
                if OUTSIDE in report.skipped else "; check the source folder")
        raise InputError(
            f"no valid images found for dataset {name!r} ({len(items)} candidates, "
            f"skipped: {report.skipped or 'none'}){hint}"
        )
    undecided = [c for c in kept if class_split[c] is None]
    test_classes = select_test_classes(undecided, test_fraction) if undecided else set()
    class_split.update({c: "test" if c in test_classes else "train" for c in undecided})
    labels = {c: i for i, c in enumerate(kept)}
    train_classes = [c for c in kept if class_split[c] == "train"]
    val_classes = set(select_val_classes(train_classes, val_fraction))
    usable = sum(valid_per_class[c] >= 2 for c in val_classes)
    if val_classes and usable < MIN_VAL_CLASSES:
        report.notes.append(_small_val_note(len(val_classes), usable, len(train_classes), val_fraction))
        val_classes = set()
    split_of = {c: ("val" if c in val_classes else class_split[c]) for c in kept}
    records = _records(items, outcome, normalize, labels, split_of)
    source = dict(source or {})
    source.setdefault("val_fraction", val_fraction)
    source.setdefault("max_side", max_side)
    total = len(items) - outcome.count(False)
    manifest = write_dataset(tqdm(records, total=total, desc=f"{name}: writing", unit="img", disable=None), dst,
                             name=name, source=source, shard_bytes=shard_bytes, report=report, overwrite=overwrite)
    report.log_summary(logger)
    logger.info("wrote dataset %r to %s: %s", name, dst, ", ".join(
        f"{split} {info['num_images']} images / {info['num_classes']} classes" for split, info in manifest["splits"].items()))
    return manifest


def _small_val_note(n_val: int, n_usable: int, n_train: int, val_fraction: float) -> str:
    """Why the validation split was left out, and how to get one that can rank models."""
    fix = (f"use --val-fraction {math.ceil(150 / n_train) / 100:.2f} ({MIN_VAL_CLASSES} classes) or more classes"
           if n_train > MIN_VAL_CLASSES else f"add classes ({n_train} training classes cannot spare {MIN_VAL_CLASSES})")
    gives = f"{n_val} class(es)" + ("" if n_usable == n_val else f" of which {n_usable} with 2+ images")
    return (f"no validation split: val_fraction {val_fraction} of {n_train} training classes gives {gives}, "
            "too few to rank models (Recall@1 over one class is always 1.0); training will keep "
            f"the last epoch's model. To select models on validation, {fix}; --val-fraction 0 leaves it out "
            "without this note")


def _class_splits(items: Sequence[SourceImage], class_order: Sequence[str],
                  test_fraction: float | None) -> dict[str, str | None]:
    """Each class's split ("train", "test", or None: decided by ``test_fraction`` later);
    classes must not straddle them."""
    class_split: dict[str, str | None] = {}
    allowed = ("train", "test") if test_fraction is None else ("train", "test", None)
    for item in items:
        if item.split not in allowed:
            raise ValueError(f"{item.source}: split {item.split!r} must be 'train' or 'test'"
                             + ("" if test_fraction is None else " or None"))
        if class_split.setdefault(item.class_name, item.split) != item.split:
            raise ValueError(
                f"class {item.class_name!r} has images in both train and test (e.g. {item.source}); "
                "classes must be disjoint across splits"
            )
    missing = set(class_split) - set(class_order)
    if missing:
        raise ValueError(f"classes {sorted(missing)[:5]} are not in class_order")
    return class_split


def _validate(items: Sequence[SourceImage], class_order: Sequence[str], normalize: Callable[[bytes], bytes],
              report: ConversionReport, *, name: str, workers: int) -> tuple[list[Any], dict[str, int]]:
    """Read and fully decode every item (in a thread pool). Per item: False (skipped, counted in
    ``report``), the normalized bytes (kept while they fit the cache budget), True (re-read the
    unchanged file while writing) or "redo" (normalize again while writing)."""

    def check(item: SourceImage) -> tuple[str, Any]:
        try:
            data = item.load()
        except FileNotFoundError:
            return "skip", "missing file"
        except OSError as e:
            return "skip", f"unreadable ({type(e).__name__})"
        try:
            out = normalize(data)
        except InvalidImageError as e:
            return "skip", e.reason
        return "ok", (None if out is data else out)

    outcome: list[Any] = [None] * len(items)
    valid_per_class: dict[str, int] = {c: 0 for c in class_order}
    cached = 0
    results = _ordered_map(check, items, workers)
    for i, (status, value) in enumerate(
        tqdm(results, total=len(items), desc=f"{name}: checking images", unit="img", disable=None)
    ):
        item = items[i]
        if status == "skip":
            report.skip(value, item.source)
            outcome[i] = False
            continue
        valid_per_class[item.class_name] += 1
        if value is not None and cached + len(value) <= _CACHE_BUDGET_BYTES:
            cached += len(value)
            outcome[i] = value
        else:
            outcome[i] = True if value is None else "redo"
    return outcome, valid_per_class


def _records(items: Sequence[SourceImage], outcome: list[Any], normalize: Callable[[bytes], bytes],
             labels: dict[str, int], split_of: dict[str, str]) -> Iterator[ImageRecord]:
    for item, state in zip(items, outcome):
        if state is False:
            continue
        if state is True:
            data = item.load()
        elif state == "redo":
            data = normalize(item.load())
        else:
            data = state
        yield ImageRecord(id=item.id, image=data, label=labels[item.class_name], class_name=item.class_name,
                          domain=item.domain, split=split_of[item.class_name], source=item.source)

