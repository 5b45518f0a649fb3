"""What every layout lister shares: the ``Listing`` it returns, the ``Converter`` entry of the
table (``layouts.CONVERTERS``), the ``SourceImage`` the pipeline reads, and the guard that keeps
a lister inside its source folder (``SourceFolder``) with the file readers that say what is wrong."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from idml.data.boundary import FolderBoundary, within
from idml.data.conversion_report import ConversionReport
from idml.errors import InputError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
OUTSIDE = "outside the source folder"


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



def file_loader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


class SourceFolder:
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


def require_folder(src: Path) -> None:
    if not src.exists():
        raise FileNotFoundError(f"source folder {src} does not exist; pass the extracted dataset folder")
    if not src.is_dir():
        raise NotADirectoryError(f"source {src} is a file, not a folder; pass the extracted dataset folder")


def find_root(src: Path, marker: str, nested: Sequence[str]) -> Path:
    """``src`` or a conventional sub-folder of it that holds ``marker``."""
    require_folder(src)
    for candidate in [src, *(src / n for n in nested)]:
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(
        f"{src / marker} not found (also looked in {', '.join(str(src / n) for n in nested)}); "
        "point src at the extracted dataset folder"
    )


def read_test_classes(test_classes: Iterable[str] | str | os.PathLike) -> list[str]:
    if isinstance(test_classes, (str, os.PathLike)):
        path = Path(test_classes)
        if not path.is_file():
            raise FileNotFoundError(
                f"test class list {path} not found; pass a text file with one class name per line"
            )
        return [line.strip() for line in read_text(path).splitlines() if line.strip()]
    return [str(c) for c in test_classes]


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not a UTF-8 text file ({e.reason} at byte {e.start}); "
                         "is it the dataset's original file?") from None

