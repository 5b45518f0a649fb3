"""Built-in datasets fetched and converted on first use into the idml cache.

Cache: ``$IDML_CACHE`` or ``~/.cache/idml``; datasets live in ``<cache>/datasets/<name>``
and fetched archives in ``<cache>/downloads``.

One module a dataset (``emoji.py``, ``fashion_mnist.py``: how to fetch and convert it); this
one holds the table of names (``BUILTIN_DATASETS``), the cache, and ``resolve_dataset``, the one
place an entry point turns a dataset name into something ``open_dataset`` reads.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from idml.data.source import MANIFEST_NAME
from idml.files import exclusive

from .emoji import convert_emoji, fetch_emoji_tarballs
from .fashion_mnist import convert_fashion_mnist, fetch_fashion_mnist_files
from .tools import DatasetFetchError, MissingToolError, mkdir

__all__ = ["BUILTIN_DATASETS", "DatasetFetchError", "MissingToolError", "builtin_root", "convert_emoji",
           "convert_fashion_mnist", "default_cache_dir", "fetch_dataset", "resolve_dataset"]

logger = logging.getLogger(__name__)

BUILTIN_DATASETS = {
    "emoji": "emoji drawn by google/twitter/facebook/apple (npm emoji-datasource-* 16.0.0)",
    "fashion-mnist": "small class-split Fashion-MNIST subset (Debian dataset-fashion-mnist), smoke tests",
}


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
            with tempfile.TemporaryDirectory(dir=mkdir(downloads), prefix="fashion-mnist-") as tmp:
                idx_dir = fetch_fashion_mnist_files(downloads, Path(tmp))
                convert_fashion_mnist(idx_dir, root, overwrite=overwrite)
    return str(root)

