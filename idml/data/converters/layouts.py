"""The dataset layouts ``idml data convert`` reads: one lister each (which images, which classes,
which split) and ``CONVERTERS``, the table of them. A new layout is a lister here plus one line
in the table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from idml.data.conversion_report import ConversionReport
from idml.errors import InputError

from .listing import (IMAGE_SUFFIXES, OUTSIDE, Converter, Listing, SourceFolder, SourceImage, file_loader, find_root,
                      read_test_classes, read_text, require_folder)
from .pipeline import check_fraction


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
    require_folder(src)
    check_fraction("test_fraction", test_fraction)
    report = ConversionReport()
    found, class_names = _scan_folders(src, with_domains, SourceFolder(src, follow_links, report), report)
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
            load=file_loader(path),
        )
        for cls, domain, path in found
    ]
    source = {"converter": "image_folder", "src": str(src), "with_domains": with_domains,
              "test_classes": None if test is None else sorted(test), "test_fraction": test_fraction,
              "follow_links": follow_links}
    return Listing(items, classes, src.resolve().name, source, report,
                   test_fraction=test_fraction if test is None else None)


def _scan_folders(src: Path, with_domains: bool, folder: SourceFolder,
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
    test = set(read_test_classes(test_classes))
    unknown = sorted(test - set(classes))
    if unknown:
        raise InputError(
            f"test_classes names unknown class(es) {unknown[:10]}; classes are folder names in {src}"
        )
    return test


def _read_table(path: Path, columns: int, skip_header: bool = False) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of each non-empty line of a whitespace-separated list file."""
    rows = []
    lines = read_text(path).splitlines()
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
    root = find_root(src, "images.txt", ["CUB_200_2011"])
    labels_file = root / "image_class_labels.txt"
    if not labels_file.is_file():
        raise FileNotFoundError(f"{labels_file} not found; it must sit next to {root / 'images.txt'}")
    report = ConversionReport()
    folder = SourceFolder(src, follow_links, report)
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
            load=file_loader(root / "images" / rel),
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

    root = find_root(src, "cars_annos.mat", ["cars196", "CARS196"])
    mat_path = root / "cars_annos.mat"
    try:
        mat = scipy.io.loadmat(mat_path, squeeze_me=True, struct_as_record=False)
    except Exception as e:  # scipy raises several types for unreadable files
        raise InputError(f"cannot read {mat_path} as a MATLAB file ({e})") from e
    if "annotations" not in mat:
        raise InputError(f"{mat_path} has no 'annotations' struct array")
    import numpy as np

    report = ConversionReport()
    folder = SourceFolder(src, follow_links, report)
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
            load=file_loader(root / rel),
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
    root = find_root(src, "Ebay_train.txt", ["Stanford_Online_Products"])
    report = ConversionReport()
    folder = SourceFolder(src, follow_links, report)
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
            load=file_loader(root / rel),
        )
        for class_id, split, rel in found
    ]
    return Listing(items, [str(c) for c in sorted({c for c, _, _ in found})], "sop",
                   {"converter": "sop", "src": str(src), "follow_links": follow_links}, report)


# The table: the CLI's `idml data convert` choices and dispatch. A new layout is a lister
# above plus one line here.
CONVERTERS: dict[str, Converter] = {
    "image-folder": Converter(list_image_folder, "src/<class>/<image>, or src/<domain>/<class>/<image> with --with-domains",
                              scans_src=True),
    "cub": Converter(list_cub, "CUB-200-2011 (images.txt, image_class_labels.txt)"),
    "cars196": Converter(list_cars196, "Cars196 (car_ims/, cars_annos.mat)"),
    "sop": Converter(list_sop, "Stanford Online Products (Ebay_train.txt, Ebay_test.txt)"),
}

