"""Converters from common image-dataset layouts to the idml format (see ``format.py``).

A layout is a *lister* (``list_cub``, ...: which images, which classes, which split) in the
``CONVERTERS`` registry; ``convert(layout, src, dst)`` writes any of them through one pipeline
(``convert_items``, also used by the built-in datasets):

0. The output path is checked first (``check_destination``): nothing is read only to be
   refused at the end. Listers read only files inside the source folder (``_SourceFolder``):
   a link or a listed path that leads outside is skipped and counted, unless ``follow_links``.
1. Every image is read and validated by fully decoding it (``normalize_image_bytes``)
   in a small thread pool; invalid ones are counted in a ``ConversionReport`` by reason.
2. Classes left without any valid image are reported and get no label. Labels
   0..K-1 go to the remaining classes in the converter's canonical class order. A layout that
   splits classes by a fraction (image-folder) splits only these classes (``select_test_classes``).
3. A deterministic ``val_fraction`` of the training classes moves to split ``val``
   (``select_val_classes``): disjoint classes for model selection. A validation split too small
   to rank models (fewer than ``MIN_VAL_CLASSES`` classes with 2+ images) is left out with a
   warning, kept in the report's notes: training then keeps the last epoch's model.
4. ``write_dataset`` writes the shards and the manifest (with the report).

Classes are disjoint across splits, as deep metric learning evaluates on unseen classes.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from tqdm.auto import tqdm

from idml.data.boundary import FolderBoundary, within
from idml.data.conversion_report import ConversionReport
from idml.data.format import DEFAULT_SHARD_BYTES, ImageRecord, check_destination, write_dataset
from idml.data.images import DEFAULT_MAX_PIXELS, InvalidImageError, normalize_image_bytes
from idml.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
DEFAULT_VAL_FRACTION = 0.1
# Recall@1 over one class is always 1.0: a validation split needs two classes (of 2+ images)
# before it can tell models apart.
MIN_VAL_CLASSES = 2
OUTSIDE = "outside the source folder"
# Re-encoded images are kept in memory between validation and writing up to this
# many bytes; beyond it they are re-encoded again while writing.
_CACHE_BUDGET_BYTES = 1 << 30


@dataclass
class Listing:
    """What a layout lister finds: the images, every class in label order, a default dataset
    name, a description for the manifest, and the files it already skipped. ``test_fraction``:
    for items listed without a split (``split=None``), see ``convert_items``."""

    items: list[SourceImage]
    class_order: list[str]
    name: str
    source: dict[str, Any]
    report: ConversionReport = field(default_factory=ConversionReport)
    test_fraction: float | None = None


@dataclass(frozen=True)
class Converter:
    list_images: Callable[..., Listing]  # (src: Path, **layout options) -> Listing
    help: str
    # The lister takes every image under src (rather than the files a list names), so an
    # output folder inside src would turn into a class of the next conversion.
    scans_src: bool = False


@dataclass
class SourceImage:
    """One input image before validation; ``split`` is "train", "test", or None when the
    class's split is decided on the classes with valid images (``convert_items``'s ``test_fraction``)."""

    id: str
    class_name: str
    domain: str
    split: str | None
    source: str
    load: Callable[[], bytes]


def select_val_classes(train_classes: Iterable[str], val_fraction: float) -> list[str]:
    """Pick the training classes that move to ``val``, deterministically.

    Classes are ordered by the sha1 hex digest of their name and the first
    round(val_fraction * C) are taken: at least 1 when val_fraction > 0 and C > 1,
    and never all of them. Returns the chosen names sorted.
    """
    _check_fraction("val_fraction", val_fraction)
    classes = sorted(set(train_classes))
    if val_fraction == 0.0 or len(classes) < 2:
        return []
    n = min(max(1, round(val_fraction * len(classes))), len(classes) - 1)
    by_hash = sorted(classes, key=lambda c: hashlib.sha1(c.encode("utf-8")).hexdigest())
    return sorted(by_hash[:n])


def select_test_classes(classes: Sequence[str], test_fraction: float) -> set[str]:
    """The last ``int(C * test_fraction)`` of ``classes`` (in their order): at least 1 and at
    most C-1 when ``test_fraction`` > 0 and C > 1; none when it is 0."""
    _check_fraction("test_fraction", test_fraction)
    n_test = int(len(classes) * test_fraction)
    if test_fraction > 0 and len(classes) > 1:
        n_test = min(max(n_test, 1), len(classes) - 1)
    return set(classes[len(classes) - n_test :]) if n_test else set()


def _check_fraction(name: str, value: float) -> None:
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
    _check_fraction("val_fraction", val_fraction)
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


def _file_loader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


class _SourceFolder:
    """Which files a converter may read: those inside the source folder ``src``. A path that
    leads outside (absolute or climbing out with ``..`` in a list file; a symbolic link, unless
    ``follow_links``) is skipped and counted in ``report`` as "outside the source folder", so a
    dataset never takes in files from elsewhere on the machine without a word."""

    def __init__(self, src: Path, follow_links: bool, report: ConversionReport):
        self.lexical_root = os.path.abspath(src)
        self.boundary = FolderBoundary(src)
        self.follow_links = follow_links
        self.report = report

    def admits(self, path: Path) -> bool:
        inside = within(os.path.abspath(path), self.lexical_root) and (self.follow_links or self.boundary.contains(path))
        if not inside:
            self.report.skip(OUTSIDE, str(path))
        return inside


def _require_folder(src: Path) -> None:
    if not src.exists():
        raise FileNotFoundError(f"source folder {src} does not exist; pass the extracted dataset folder")
    if not src.is_dir():
        raise NotADirectoryError(f"source {src} is a file, not a folder; pass the extracted dataset folder")


def _find_root(src: Path, marker: str, nested: Sequence[str]) -> Path:
    """``src`` or a conventional sub-folder of it that holds ``marker``."""
    _require_folder(src)
    for candidate in [src, *(src / n for n in nested)]:
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(
        f"{src / marker} not found (also looked in {', '.join(str(src / n) for n in nested)}); "
        "point src at the extracted dataset folder"
    )


def _read_test_classes(test_classes: Iterable[str] | str | os.PathLike) -> list[str]:
    if isinstance(test_classes, (str, os.PathLike)):
        path = Path(test_classes)
        if not path.is_file():
            raise FileNotFoundError(
                f"test class list {path} not found; pass a text file with one class name per line"
            )
        return [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    return [str(c) for c in test_classes]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not a UTF-8 text file ({e.reason} at byte {e.start}); "
                         "is it the dataset's original file?") from None


def list_image_folder(
    src: Path,
    *,
    test_classes: Iterable[str] | str | os.PathLike | None = None,
    test_fraction: float = 0.5,
    with_domains: bool = False,
    follow_links: bool = False,
) -> Listing:
    """``src/<class>/<image>`` (or ``src/<domain>/<class>/<image>``).

    Images may sit in sub-folders of a class folder. With domains, a class is the
    same folder name across domain folders. Symbolic links that lead outside ``src`` are
    skipped and counted unless ``follow_links``.

    Class split: ``test_classes`` (names, or a path to a text file with one name
    per line) go to test and all others to train. Without it, the names of the classes
    with valid images are sorted and the last ``int(C * test_fraction)`` (at least 1 and at
    most C-1 when 0 < test_fraction and C > 1) go to test, so the default puts the first half in
    train. ``test_fraction=0`` puts every class in train.
    """
    _require_folder(src)
    _check_fraction("test_fraction", test_fraction)
    report = ConversionReport()
    found, class_names = _scan_folders(src, with_domains, _SourceFolder(src, follow_links, report), report)
    classes = sorted(class_names)
    test = None if test_classes is None else _known_test_classes(classes, test_classes, src)

    # Group rows by class (then domain) so each class's images sit together in the shards.
    found.sort(key=lambda t: (t[0], t[1], str(t[2])))
    items = [
        SourceImage(
            id=path.relative_to(src).as_posix(),
            class_name=cls,
            domain=domain,
            split=None if test is None else "test" if cls in test else "train",
            source=str(path),
            load=_file_loader(path),
        )
        for cls, domain, path in found
    ]
    source = {"converter": "image_folder", "src": str(src), "with_domains": with_domains,
              "test_classes": None if test is None else sorted(test), "test_fraction": test_fraction,
              "follow_links": follow_links}
    return Listing(items, classes, src.resolve().name, source, report,
                   test_fraction=test_fraction if test is None else None)


def _scan_folders(src: Path, with_domains: bool, folder: _SourceFolder,
                  report: ConversionReport) -> tuple[list[tuple[str, str, Path]], set[str]]:
    """``(class, domain, path)`` of every image under the class folders, and the class names;
    other files, and links ``folder`` does not admit, are counted in ``report``."""

    def entries(directory: Path) -> list[Path]:
        try:
            listed = sorted(directory.iterdir())
        except OSError as e:
            report.skip(f"unreadable folder ({type(e).__name__})", str(directory))
            return []
        return [p for p in listed if not p.is_symlink() or folder.admits(p)]

    def subdirs(directory: Path) -> list[Path]:
        dirs = []
        for p in entries(directory):
            if p.is_dir() and not p.name.startswith("."):
                dirs.append(p)
            elif p.is_file():
                report.skip("file outside a class folder", str(p))
        return dirs

    def files_under(directory: Path, above: frozenset[str] = frozenset()) -> Iterator[Path]:
        real = os.path.realpath(directory)
        if real in above:  # a link back to a folder above: its files are listed already
            report.skip("link loop", str(directory))
            return
        for p in entries(directory):
            if p.is_dir():
                yield from files_under(p, above | {real})
            elif p.is_file():
                yield p
            elif p.is_symlink():
                report.skip("broken link", str(p))

    if with_domains:
        domain_dirs = [(d.name, d) for d in subdirs(src)]
        if not domain_dirs:
            raise InputError(f"{src} has no domain folders; expected src/<domain>/<class>/<image>")
    else:
        domain_dirs = [("default", src)]
    found: list[tuple[str, str, Path]] = []
    class_names: set[str] = set()
    for domain, domain_dir in domain_dirs:
        for class_dir in subdirs(domain_dir):
            class_names.add(class_dir.name)
            for path in files_under(class_dir):
                if any(part.startswith(".") for part in path.relative_to(class_dir).parts[:-1]):
                    # e.g. .ipynb_checkpoints copies: not part of the dataset, but counted.
                    report.skip("ignored file in hidden folder", str(path))
                elif path.suffix.lower() in IMAGE_SUFFIXES:
                    found.append((class_dir.name, domain, path))
                else:
                    report.skip("ignored non-image file", str(path))
    if not class_names:
        layout = "src/<domain>/<class>/<image>" if with_domains else "src/<class>/<image>"
        outside = f" ({report.skipped[OUTSIDE]} linked from outside it were skipped: see --follow-links)" \
            if OUTSIDE in report.skipped else ""
        raise InputError(f"{src} has no class folders{outside}; expected {layout}")
    return found, class_names


def _known_test_classes(classes: list[str], test_classes, src: Path) -> set[str]:
    test = set(_read_test_classes(test_classes))
    unknown = sorted(test - set(classes))
    if unknown:
        raise InputError(
            f"test_classes names unknown class(es) {unknown[:10]}; classes are folder names in {src}"
        )
    return test


def _read_table(path: Path, columns: int, skip_header: bool = False) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of each non-empty line of a whitespace-separated list file."""
    rows = []
    lines = _read_text(path).splitlines()
    for lineno, line in enumerate(lines[1:] if skip_header else lines, start=2 if skip_header else 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns - 1)
        if len(parts) != columns:
            raise InputError(f"{path}:{lineno}: expected {columns} fields, got {line!r}")
        rows.append((lineno, parts))
    return rows


def _int_field(value: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{path}:{lineno}: {what} {value!r} is not an integer") from None


def list_cub(src: Path, *, follow_links: bool = False) -> Listing:
    """CUB-200-2011: classes 1-100 train, 101-200 test.

    Reads ``images.txt`` and ``image_class_labels.txt``; class names are the image
    folder names (e.g. "001.Black_footed_Albatross"). ``src`` may also be the folder
    that contains ``CUB_200_2011/``. Listed paths that lead outside ``src`` are skipped
    and counted (links only with ``follow_links``).
    """
    root = _find_root(src, "images.txt", ["CUB_200_2011"])
    labels_file = root / "image_class_labels.txt"
    if not labels_file.is_file():
        raise FileNotFoundError(f"{labels_file} not found; it must sit next to {root / 'images.txt'}")
    report = ConversionReport()
    folder = _SourceFolder(src, follow_links, report)
    paths = {image_id: rel for _, (image_id, rel) in _read_table(root / "images.txt", 2)}
    class_of = {image_id: _int_field(cls, labels_file, lineno, "class id")
                for lineno, (image_id, cls) in _read_table(labels_file, 2)}
    class_names: dict[int, str] = {}
    found = []
    for image_id, rel in paths.items():
        if image_id not in class_of:
            raise InputError(f"image id {image_id} ({rel}) from images.txt has no entry in {labels_file}")
        if not folder.admits(root / "images" / rel):
            continue
        class_id = class_of[image_id]
        class_folder = Path(rel).parts[0]
        if class_names.setdefault(class_id, class_folder) != class_folder:
            raise InputError(
                f"class {class_id} has images in folders {class_names[class_id]!r} and {class_folder!r}; "
                f"check {labels_file}"
            )
        found.append((class_id, rel))
    found.sort()
    items = [
        SourceImage(
            id=f"images/{rel}",
            class_name=class_names[class_id],
            domain="default",
            split="train" if class_id <= 100 else "test",
            source=str(root / "images" / rel),
            load=_file_loader(root / "images" / rel),
        )
        for class_id, rel in found
    ]
    return Listing(items, [class_names[c] for c in sorted(class_names)], "cub200",
                   {"converter": "cub", "src": str(src), "follow_links": follow_links}, report)


def _mat_field(struct: Any, field: str, mat_path: Path) -> Any:
    try:
        value = getattr(struct, field)
    except AttributeError:
        raise InputError(f"{mat_path}: an annotation has no {field!r} field; is it the original cars_annos.mat?") from None
    return value.item() if hasattr(value, "item") and getattr(value, "size", 1) == 1 else value


def list_cars196(src: Path, *, follow_links: bool = False) -> Listing:
    """Cars196 (``car_ims/`` + ``cars_annos.mat``): classes 1-98 train, 99-196 test.

    Whole images are stored; the bounding boxes in the annotations are not applied. Listed
    paths that lead outside ``src`` are skipped and counted (links only with ``follow_links``).
    """
    import scipy.io  # only this converter needs scipy

    root = _find_root(src, "cars_annos.mat", ["cars196", "CARS196"])
    mat_path = root / "cars_annos.mat"
    try:
        mat = scipy.io.loadmat(mat_path, squeeze_me=True, struct_as_record=False)
    except Exception as e:  # scipy raises several types for unreadable files
        raise InputError(f"cannot read {mat_path} as a MATLAB file ({e})") from e
    if "annotations" not in mat:
        raise InputError(f"{mat_path} has no 'annotations' struct array")
    import numpy as np

    report = ConversionReport()
    folder = _SourceFolder(src, follow_links, report)
    annotations = np.atleast_1d(mat["annotations"])
    names = [str(n) for n in np.atleast_1d(mat["class_names"])] if "class_names" in mat else []
    found = []
    for a in annotations:
        rel = str(_mat_field(a, "relative_im_path", mat_path))
        try:
            class_id = int(_mat_field(a, "class", mat_path))
        except (TypeError, ValueError):
            raise InputError(f"{mat_path}: {rel} has a class that is not an integer") from None
        if not 1 <= class_id <= max(196, len(names)):
            raise InputError(f"{mat_path}: {rel} has class {class_id}, expected 1..196")
        if folder.admits(root / rel):
            found.append((class_id, rel))
    found.sort()

    def class_name(class_id: int) -> str:
        return names[class_id - 1] if class_id <= len(names) else str(class_id)

    items = [
        SourceImage(
            id=rel,
            class_name=class_name(class_id),
            domain="default",
            split="train" if class_id <= 98 else "test",
            source=str(root / rel),
            load=_file_loader(root / rel),
        )
        for class_id, rel in found
    ]
    return Listing(items, [class_name(c) for c in sorted({c for c, _ in found})], "cars196",
                   {"converter": "cars196", "src": str(src), "follow_links": follow_links}, report)


def list_sop(src: Path, *, follow_links: bool = False) -> Listing:
    """Stanford Online Products: Ebay_train.txt classes -> train, Ebay_test.txt -> test.

    class_name is the product class id as a string; domain is "default". Listed paths that
    lead outside ``src`` are skipped and counted (links only with ``follow_links``).
    """
    root = _find_root(src, "Ebay_train.txt", ["Stanford_Online_Products"])
    report = ConversionReport()
    folder = _SourceFolder(src, follow_links, report)
    found = []
    for split, filename in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        path = root / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; it must sit next to {root / 'Ebay_train.txt'}")
        for lineno, (_image_id, class_id, _super_id, rel) in _read_table(path, 4, skip_header=True):
            if folder.admits(root / rel):
                found.append((_int_field(class_id, path, lineno, "class_id"), split, rel))
    found.sort()
    items = [
        SourceImage(
            id=rel,
            class_name=str(class_id),
            domain="default",
            split=split,
            source=str(root / rel),
            load=_file_loader(root / rel),
        )
        for class_id, split, rel in found
    ]
    return Listing(items, [str(c) for c in sorted({c for c, _, _ in found})], "sop",
                   {"converter": "sop", "src": str(src), "follow_links": follow_links}, report)


# The registry: the CLI's `idml data convert` choices and dispatch. A new layout is a lister
# above plus one line here.
CONVERTERS: dict[str, Converter] = {
    "image-folder": Converter(list_image_folder, "src/<class>/<image>, or src/<domain>/<class>/<image> with --with-domains",
                              scans_src=True),
    "cub": Converter(list_cub, "CUB-200-2011 (images.txt, image_class_labels.txt)"),
    "cars196": Converter(list_cars196, "Cars196 (car_ims/, cars_annos.mat)"),
    "sop": Converter(list_sop, "Stanford Online Products (Ebay_train.txt, Ebay_test.txt)"),
}


def convert(layout: str, src: str | os.PathLike, dst: str | os.PathLike, *, name: str | None = None,
            **options: Any) -> dict[str, Any]:
    """Convert the dataset at ``src`` in ``layout`` (a key of ``CONVERTERS``) into the idml
    format at ``dst``. ``options`` are the layout's own (e.g. image-folder's ``with_domains``)
    and ``convert_items``'s (``val_fraction``, ``shard_bytes``, ``overwrite``, ...)."""
    if layout not in CONVERTERS:
        raise ValueError(f"unknown dataset layout {layout!r}; choose one of {', '.join(CONVERTERS)}")
    _check_apart(Path(src), Path(dst), scans_src=CONVERTERS[layout].scans_src)
    lister = CONVERTERS[layout].list_images
    own = set(inspect.signature(lister).parameters) - {"src"}
    unknown = sorted(set(options) - own - set(inspect.signature(convert_items).parameters))
    if unknown:
        raise InputError(f"the {layout} layout does not take {', '.join('--' + k.replace('_', '-') for k in unknown)}"
                         f" ({', '.join(unknown)})")
    listing = lister(Path(src), **{k: v for k, v in options.items() if k in own})
    return convert_items(listing.items, dst, name=name or listing.name, class_order=listing.class_order,
                         source=listing.source, report=listing.report, test_fraction=listing.test_fraction,
                         **{k: v for k, v in options.items() if k not in own})


def _check_apart(src: Path, dst: Path, *, scans_src: bool) -> None:
    """The output may not hold the source (``--overwrite`` would delete it), nor lie in a source
    that is scanned whole (the next conversion would read the dataset as a class)."""
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if scans_src and within(real_dst, real_src):
        raise InputError(f"output folder {dst} is inside the source folder {src}; the dataset would become "
                         f"part of its own source: choose an output folder outside {src}")
    if within(real_src, real_dst):
        raise InputError(f"source folder {src} is inside the output folder {dst}; choose an output folder that "
                         "does not hold the source")
