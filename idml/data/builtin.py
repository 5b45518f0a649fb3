"""Built-in datasets fetched and converted on first use into the idml cache.

Cache: ``$IDML_CACHE`` or ``~/.cache/idml``; datasets live in ``<cache>/datasets/<name>``
and fetched archives in ``<cache>/downloads``.

- ``emoji``: the same emoji drawn by four vendors (npm ``emoji-datasource-<vendor>``
  16.0.0, 64x64 PNGs). Classes are emoji, domains are vendors: a small, real
  cross-domain metric-learning benchmark.
- ``fashion-mnist``: a tiny class-split subset of Fashion-MNIST from the Debian
  package ``dataset-fashion-mnist``, for smoke tests.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from idml.data.converters import DEFAULT_VAL_FRACTION, SourceImage, convert_items
from idml.data.source import MANIFEST_NAME
from idml.data.conversion_report import ConversionReport
from idml.files import exclusive

logger = logging.getLogger(__name__)

BUILTIN_DATASETS = {
    "emoji": "emoji drawn by google/twitter/facebook/apple (npm emoji-datasource-* 16.0.0)",
    "fashion-mnist": "small class-split Fashion-MNIST subset (Debian dataset-fashion-mnist), smoke tests",
}
EMOJI_VENDORS = ("google", "twitter", "facebook", "apple")
EMOJI_VERSION = "16.0.0"
# Skin-tone modifiers are swatches rather than emoji; skin-tone variants are left out too.
SKIN_TONE_MODIFIERS = frozenset({"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"})
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEFAULT_PER_CLASS = 300
# 2 of the 5 training classes: the default 0.1 gives 1, too few to rank models (MIN_VAL_CLASSES),
# and the converter would drop the split; configs/smoke.yaml's batches fit the 3 left to train on.
FASHION_MNIST_VAL_FRACTION = 0.4


class MissingToolError(FileNotFoundError):
    """An external program needed to fetch a dataset (npm, apt-get, dpkg-deb) is missing."""


class DatasetFetchError(RuntimeError):
    """Fetching a built-in dataset failed (network, registry, tool error)."""


def default_cache_dir() -> Path:
    env = os.environ.get("IDML_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "idml"


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def builtin_root(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where built-in dataset ``name`` lives (or will live) in the cache."""
    return _cache(cache_dir) / "datasets" / name


def resolve_dataset(
    name_or_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    tarball_dir: str | os.PathLike | None = None,
) -> str:
    """The one place a dataset name from a user or a config becomes something ``open_dataset``
    reads: a URI (``s3://...``) or a folder holding manifest.json as it is, a built-in name as its
    folder in the cache, fetched and converted on first use and reused after. Entry points call it
    (the CLI, the training and evaluation workflows, the pipelines, the benchmarks); the readers
    below them never fetch."""
    if "://" in os.fspath(name_or_path):
        return os.fspath(name_or_path)  # opened (and checked) where it is stored
    path = Path(name_or_path).expanduser()
    if (path / MANIFEST_NAME).is_file():
        return os.fspath(name_or_path)
    name = os.fspath(name_or_path)
    if name in BUILTIN_DATASETS:
        return fetch_dataset(name, cache_dir=cache_dir, tarball_dir=tarball_dir)
    builtins = ", ".join(f"{n} ({d})" for n, d in BUILTIN_DATASETS.items())
    hint = (
        f"{path} is a folder without {MANIFEST_NAME}; "
        if path.is_dir()
        else f"{name!r} is neither a dataset folder nor a built-in dataset; "
    )
    raise ValueError(
        hint
        + f"built-in datasets: {builtins}. To use your own images, convert them first, e.g. "
        "`idml data convert image-folder <src> <dst>` (src/<class>/<image>), then pass <dst>"
    )


def fetch_dataset(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    tarball_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> str:
    """Fetch and convert built-in dataset ``name`` into the cache; returns its root."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; built-ins: {', '.join(BUILTIN_DATASETS)}")
    cache = _cache(cache_dir)
    root = builtin_root(name, cache)
    downloads = cache / "downloads"
    # Several processes (e.g. training workers) may resolve the same dataset at once.
    with exclusive(cache / "datasets" / f".{name}.lock"):
        if (root / MANIFEST_NAME).is_file() and not overwrite:
            return str(root)
        logger.info("preparing built-in dataset %r in %s", name, root)
        if name == "emoji":
            tarballs = fetch_emoji_tarballs(downloads, tarball_dir=tarball_dir)
            convert_emoji(tarballs, root, overwrite=overwrite)
        else:
            with tempfile.TemporaryDirectory(dir=_mkdir(downloads), prefix="fashion-mnist-") as tmp:
                idx_dir = fetch_fashion_mnist_files(downloads, Path(tmp))
                convert_fashion_mnist(idx_dir, root, overwrite=overwrite)
    return str(root)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:
        raise DatasetFetchError(f"{what}: `{' '.join(cmd)}` timed out") from e
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise DatasetFetchError(f"{what}: `{' '.join(cmd)}` failed (exit {proc.returncode}):\n{output}")


# --------------------------------------------------------------------------- emoji


def emoji_package(vendor: str) -> str:
    return f"emoji-datasource-{vendor}"


def emoji_tarball_name(vendor: str) -> str:
    return f"{emoji_package(vendor)}-{EMOJI_VERSION}.tgz"


def emoji_tarball_url(vendor: str) -> str:
    pkg = emoji_package(vendor)
    return f"https://registry.npmjs.org/{pkg}/-/{pkg}-{EMOJI_VERSION}.tgz"


def _emoji_help() -> str:
    cmds = "\n".join(f"  npm pack {emoji_package(v)}@{EMOJI_VERSION}" for v in EMOJI_VENDORS)
    urls = "\n".join(f"  {emoji_tarball_url(v)}" for v in EMOJI_VENDORS)
    return (
        "Get the four tarballs on a machine with npm:\n" + cmds
        + "\nor download them directly:\n" + urls
        + "\nthen put them in one folder and pass it with --tarball-dir (tarball_dir=...)."
    )


def fetch_emoji_tarballs(
    downloads: str | os.PathLike, *, tarball_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Paths of the four vendor tarballs: from ``tarball_dir``, the downloads cache, or npm."""
    if tarball_dir is not None:
        tarball_dir = Path(tarball_dir)
        tarballs = {v: tarball_dir / emoji_tarball_name(v) for v in EMOJI_VENDORS}
        missing = [str(p) for p in tarballs.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"missing emoji tarball(s): {', '.join(missing)}.\n{_emoji_help()}")
        return tarballs
    downloads = _mkdir(Path(downloads))
    tarballs = {v: downloads / emoji_tarball_name(v) for v in EMOJI_VENDORS}
    todo = [v for v, p in tarballs.items() if not p.is_file()]
    if todo:
        npm = shutil.which("npm")
        if npm is None:
            raise MissingToolError(f"npm is not installed (not found on PATH), so the emoji dataset cannot be fetched.\n{_emoji_help()}")
        for vendor in todo:
            spec = f"{emoji_package(vendor)}@{EMOJI_VERSION}"
            logger.info("fetching %s with npm pack", spec)
            # Pack into a temp folder and rename, so a failed download never looks finished.
            with tempfile.TemporaryDirectory(dir=downloads, prefix="npm-pack-") as tmp:
                _run([npm, "pack", spec, "--pack-destination", tmp], Path(tmp), f"fetching {spec}")
                packed = Path(tmp) / emoji_tarball_name(vendor)
                if not packed.is_file():
                    raise DatasetFetchError(f"npm pack {spec} did not produce {packed.name}")
                os.replace(packed, tarballs[vendor])
    return tarballs


def _read_emoji_tarball(path: Path, vendor: str) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """Stream one vendor tarball: (entries of package/emoji.json, {image name: 64px PNG bytes})."""
    prefix = f"package/img/{vendor}/64/"
    entries = None
    images: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.name == "package/emoji.json":
                    entries = json.load(tar.extractfile(member))
                elif member.name.startswith(prefix) and "/" not in member.name[len(prefix) :]:
                    images[member.name[len(prefix) :]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read emoji tarball {path} ({e}); delete it and fetch it again") from e
    if entries is None:
        raise ValueError(f"{path} has no package/emoji.json; is it an {emoji_package(vendor)} tarball?")
    return entries, images


def _emoji_classes(data: dict, by_unified: dict, report: ConversionReport) -> list[dict]:
    """The emoji entries that become classes (drawn by every vendor, no skin-tone modifiers),
    in sort order; the others are counted in ``report``."""

    def has(vendor: str, unified: str) -> bool:
        entry = by_unified[vendor].get(unified)
        return bool(entry and entry.get(f"has_img_{vendor}") and entry.get("image") in data[vendor][1])

    kept = []
    seen_names: dict[str, str] = {}
    for entry in data[EMOJI_VENDORS[0]][0]:
        unified = entry["unified"]
        present = [v for v in EMOJI_VENDORS if has(v, unified)]
        if unified.upper() in SKIN_TONE_MODIFIERS:
            for v in present:
                report.skip("skin-tone modifier", f"{v}/{by_unified[v][unified]['image']}")
            continue
        if len(present) < len(EMOJI_VENDORS):
            for v in present:
                report.skip("emoji not drawn by all four vendors", f"{v}/{by_unified[v][unified]['image']}")
            continue
        short_name = entry["short_name"]
        if short_name in seen_names:
            raise ValueError(f"short_name {short_name!r} is used by {seen_names[short_name]} and {unified}")
        seen_names[short_name] = unified
        kept.append(entry)
    kept.sort(key=lambda e: (e.get("sort_order", 0), e["unified"]))
    return kept


def convert_emoji(
    tarballs: Mapping[str, str | os.PathLike],
    dst: str | os.PathLike,
    *,
    name: str = "emoji",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    overwrite: bool = False,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Convert the four vendor tarballs into the emoji dataset at ``dst``.

    Classes are the top-level emoji present in all four vendors (flag set and
    64px image present), without skin-tone variants or modifiers; domain = vendor,
    class_name = short_name. Sorted by sort_order, even positions go to train and
    odd ones to test; then ``val_fraction`` of the train classes moves to val.
    """
    missing = [v for v in EMOJI_VENDORS if v not in tarballs]
    if missing:
        raise ValueError(f"tarballs for vendor(s) {missing} are missing; need {list(EMOJI_VENDORS)}")
    report = ConversionReport()
    data = {v: _read_emoji_tarball(Path(tarballs[v]), v) for v in EMOJI_VENDORS}
    by_unified = {v: {e["unified"]: e for e in entries} for v, (entries, _) in data.items()}
    kept = _emoji_classes(data, by_unified, report)

    items = []
    for position, entry in enumerate(kept):
        split = "train" if position % 2 == 0 else "test"
        for vendor in EMOJI_VENDORS:
            image = by_unified[vendor][entry["unified"]]["image"]
            png = data[vendor][1][image]
            items.append(
                SourceImage(
                    id=f"{vendor}/{image}",
                    class_name=entry["short_name"],
                    domain=vendor,
                    split=split,
                    source=f"{Path(tarballs[vendor]).name}:package/img/{vendor}/64/{image}",
                    load=lambda png=png: png,
                )
            )
    return convert_items(
        items,
        dst,
        name=name,
        class_order=[e["short_name"] for e in kept],
        source={
            "converter": "emoji",
            "packages": [f"{emoji_package(v)}@{EMOJI_VERSION}" for v in EMOJI_VENDORS],
            "image_size": 64,
        },
        report=report,
        val_fraction=val_fraction,
        overwrite=overwrite,
        num_workers=num_workers,
    )


# ------------------------------------------------------------------- fashion-mnist


def fetch_fashion_mnist_files(downloads: str | os.PathLike, extract_dir: str | os.PathLike) -> Path:
    """Download the Debian package (once) and extract it; returns the folder with the idx files."""
    downloads = _mkdir(Path(downloads))
    debs = sorted(downloads.glob(f"{FASHION_MNIST_PACKAGE}_*.deb"))
    if not debs:
        apt_get = shutil.which("apt-get")
        if apt_get is None:
            raise MissingToolError(
                f"apt-get is not available, so {FASHION_MNIST_PACKAGE} cannot be downloaded; on a Debian/"
                f"Ubuntu machine run `apt-get download {FASHION_MNIST_PACKAGE}` and put the .deb in {downloads}"
            )
        with tempfile.TemporaryDirectory(dir=downloads, prefix="apt-") as tmp:
            _run([apt_get, "download", FASHION_MNIST_PACKAGE], Path(tmp), f"downloading {FASHION_MNIST_PACKAGE} (try `apt-get update`)")
            fetched = sorted(Path(tmp).glob(f"{FASHION_MNIST_PACKAGE}_*.deb"))
            if not fetched:
                raise DatasetFetchError(f"apt-get download {FASHION_MNIST_PACKAGE} produced no .deb")
            os.replace(fetched[-1], downloads / fetched[-1].name)
            debs = [downloads / fetched[-1].name]
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        raise MissingToolError(f"dpkg-deb is not available; it is needed to unpack {debs[-1]}")
    extract_dir = Path(extract_dir)
    _run([dpkg_deb, "-x", str(debs[-1]), str(extract_dir)], extract_dir, f"unpacking {debs[-1]}")
    found = sorted(extract_dir.rglob("train-labels-idx1-ubyte*"))
    if not found:
        raise DatasetFetchError(f"{debs[-1]} holds no train-labels-idx1-ubyte file")
    return found[0].parent


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an (optionally gzipped) idx file of unsigned bytes, as used by (Fashion-)MNIST."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4:
        raise ValueError(f"{path} is too short to be an idx file")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} holds {data.size} values, header says {dims}")
    return data.reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def convert_fashion_mnist(
    idx_dir: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    name: str = "fashion-mnist",
    per_class: int = DEFAULT_PER_CLASS,
    val_fraction: float = FASHION_MNIST_VAL_FRACTION,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert Fashion-MNIST idx files: labels 0-4 train, 5-9 test, ``per_class`` images each;
    ``val_fraction`` of the training classes (by default 2 of 5) become the validation split.

    Images come from the original train file first, then t10k, in file order.
    """
    idx_dir = Path(idx_dir)
    sources = []
    for part in ("train", "t10k"):
        images_path = _idx_file(idx_dir, f"{part}-images-idx3-ubyte")
        labels_path = _idx_file(idx_dir, f"{part}-labels-idx1-ubyte")
        if images_path and labels_path:
            images, labels = read_idx(images_path), read_idx(labels_path)
            if len(images) != len(labels):
                raise ValueError(f"{images_path} has {len(images)} images but {labels_path} {len(labels)} labels")
            sources.append((part, images, labels))
    if not sources:
        raise FileNotFoundError(f"no Fashion-MNIST idx files (train-images-idx3-ubyte[.gz], ...) in {idx_dir}")

    def png(array: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(array).save(out, format="PNG")
        return out.getvalue()

    items = []
    for label, class_name in enumerate(FASHION_MNIST_CLASSES):
        taken = 0
        for part, images, labels in sources:
            for index in np.flatnonzero(labels == label)[: per_class - taken]:
                items.append(
                    SourceImage(
                        id=f"{part}/{index:05d}",
                        class_name=class_name,
                        domain="default",
                        split="train" if label < 5 else "test",
                        source=f"{part}-images-idx3-ubyte[{index}]",
                        load=lambda a=images[index]: png(a),
                    )
                )
                taken += 1
    return convert_items(
        items,
        dst,
        name=name,
        class_order=list(FASHION_MNIST_CLASSES),
        source={"converter": "fashion-mnist", "package": FASHION_MNIST_PACKAGE, "per_class": per_class},
        report=ConversionReport(),
        val_fraction=val_fraction,
        overwrite=overwrite,
    )
