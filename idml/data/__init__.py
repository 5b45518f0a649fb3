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
    IMAGE_SUFFIXES,
    convert_cars196,
    convert_cub,
    convert_image_folder,
    SourceImage,
    convert_items,
    convert_sop,
    select_val_classes,
)
from idml.data.format import (
    DATASET_SCHEMA,
    SPLITS,
    ImageRecord,
    contiguous_targets,
    read_manifest,
    read_split,
    split_files,
    verify_dataset,
    write_dataset,
)
from idml.data.images import InvalidImageError, decode_image, normalize_image_bytes
from idml.data.summary import save_sample_grid, summarize
from idml.data.conversion_report import ConversionReport

__all__ = [
    "BUILTIN_DATASETS",
    "DATASET_SCHEMA",
    "SPLITS",
    "ConversionReport",
    "DatasetFetchError",
    "ImageRecord",
    "ImageShardDataset",
    "IMAGE_SUFFIXES",
    "InvalidImageError",
    "MissingToolError",
    "SourceImage",
    "builtin_root",
    "contiguous_targets",
    "convert_cars196",
    "convert_cub",
    "convert_emoji",
    "convert_fashion_mnist",
    "convert_image_folder",
    "convert_items",
    "convert_sop",
    "decode_image",
    "default_cache_dir",
    "fetch_dataset",
    "normalize_image_bytes",
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
