"""Converters from common image-dataset layouts to the idml format (see ``format.py``).

A layout is a *lister* (``list_cub``, ...: which images, which classes, which split) in the
``CONVERTERS`` table (``layouts.py``; what listers share is ``listing.py``); ``convert(layout, src,
dst)`` writes any of them through one pipeline (``pipeline.convert_items``, also used by the
built-in datasets):

0. The output path is checked first (``check_destination``): nothing is read only to be
   refused at the end. Listers read only files inside the source folder (``SourceFolder``):
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

import inspect
import os
from pathlib import Path
from typing import Any

from idml.data.boundary import within
from idml.errors import InputError

from .layouts import CONVERTERS
from .listing import IMAGE_SUFFIXES, Converter, Listing, SourceImage
from .pipeline import DEFAULT_VAL_FRACTION, MIN_VAL_CLASSES, convert_items, select_test_classes, select_val_classes

__all__ = ["CONVERTERS", "DEFAULT_VAL_FRACTION", "IMAGE_SUFFIXES", "MIN_VAL_CLASSES", "Converter", "Listing", "SourceImage",
           "convert", "convert_items", "select_test_classes", "select_val_classes"]


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
