"""idml data layer: one on-disk format (sharded Parquet + manifest), converters, built-ins.

``ImageShardDataset`` (needs torch) is imported lazily so that readers of the
format alone do not pay for importing torch.
"""

from idml.data.builtin import (
    BUILTIN_DATASETS,
    DatasetFetchError,
    MissingToolError,
    builtin_root,
    convert_emoji,
    convert_fashion_mnist,
    default_cache_dir,
    fetch_dataset,
    resolve_dataset,
)
from idml.data.converters import (
    CONVERTERS,
    IMAGE_SUFFIXES,
    Converter,
    Listing,
    SourceImage,
    convert,
    convert_items,
    select_val_classes,
)
from idml.data.format import DATASET_SCHEMA, SPLITS, ImageRecord, read_split, split_files, write_dataset
from idml.data.images import InvalidImageError, decode_image, normalize_image_bytes
from idml.data.source import (
    DatasetSource,
    contiguous_targets,
    filesystem_for,
    open_dataset,
    read_manifest,
)
from idml.data.summary import save_sample_grid, summarize
from idml.data.conversion_report import ConversionReport
from idml.data.verify import verify_dataset

__all__ = [
    "BUILTIN_DATASETS",
    "CONVERTERS",
    "Converter",
    "DATASET_SCHEMA",
    "SPLITS",
    "ConversionReport",
    "DatasetFetchError",
    "DatasetSource",
    "ImageRecord",
    "ImageShardDataset",
    "IMAGE_SUFFIXES",
    "InvalidImageError",
    "Listing",
    "MissingToolError",
    "SourceImage",
    "builtin_root",
    "contiguous_targets",
    "convert",
    "convert_emoji",
    "convert_fashion_mnist",
    "convert_items",
    "decode_image",
    "default_cache_dir",
    "fetch_dataset",
    "filesystem_for",
    "normalize_image_bytes",
    "open_dataset",
    "read_manifest",
    "read_split",
    "resolve_dataset",
    "save_sample_grid",
    "select_val_classes",
    "split_files",
    "summarize",
    "verify_dataset",
    "write_dataset",
]


def __getattr__(name: str):
    if name == "ImageShardDataset":
        from idml.data.torch_dataset import ImageShardDataset

        return ImageShardDataset
    raise AttributeError(f"module 'idml.data' has no attribute {name!r}")
