"""The built-in ``fashion-mnist`` dataset: a tiny class-split subset of Fashion-MNIST from the
Debian package ``dataset-fashion-mnist``, for smoke tests."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from idml.data.conversion_report import ConversionReport
from idml.data.converters import SourceImage, convert_items

from .tools import DatasetFetchError, MissingToolError, mkdir, run

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


def fetch_fashion_mnist_files(downloads: str | os.PathLike, extract_dir: str | os.PathLike) -> Path:
    """Download the Debian package (once) and extract it; returns the folder with the idx files."""
    downloads = mkdir(Path(downloads))
    debs = sorted(downloads.glob(f"{FASHION_MNIST_PACKAGE}_*.deb"))
    if not debs:
        apt_get = shutil.which("apt-get")
        if apt_get is None:
            raise MissingToolError(
                f"apt-get is not available, so {FASHION_MNIST_PACKAGE} cannot be downloaded; on a Debian/"
                f"Ubuntu machine run `apt-get download {FASHION_MNIST_PACKAGE}` and put the .deb in {downloads}"
            )
        with tempfile.TemporaryDirectory(dir=downloads, prefix="apt-") as tmp:
            run([apt_get, "download", FASHION_MNIST_PACKAGE], Path(tmp), f"downloading {FASHION_MNIST_PACKAGE} (try `apt-get update`)")
            fetched = sorted(Path(tmp).glob(f"{FASHION_MNIST_PACKAGE}_*.deb"))
            if not fetched:
                raise DatasetFetchError(f"apt-get download {FASHION_MNIST_PACKAGE} produced no .deb")
            os.replace(fetched[-1], downloads / fetched[-1].name)
            debs = [downloads / fetched[-1].name]
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        raise MissingToolError(f"dpkg-deb is not available; it is needed to unpack {debs[-1]}")
    extract_dir = Path(extract_dir)
    run([dpkg_deb, "-x", str(debs[-1]), str(extract_dir)], extract_dir, f"unpacking {debs[-1]}")
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
