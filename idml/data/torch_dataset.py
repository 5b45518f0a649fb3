"""Map-style torch Dataset over one split of an idml dataset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from torch.utils.data import Dataset

from idml.data.source import open_dataset
from idml.data.images import DEFAULT_MAX_PIXELS, InvalidImageError, decode_image


class ImageShardDataset(Dataset):
    """All rows of ``split`` with their encoded images held in memory, decoded on access.

    ``labels`` are dataset labels; ``targets`` are the contiguous 0..C-1 targets from
    ``contiguous_targets`` (what losses and samplers use). ``__getitem__`` returns
    ``(image, target)`` where image is an RGB PIL image or ``transform(image)``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.root = str(root)
        self.split = split
        self.transform = transform
        self.max_pixels = max_pixels
        source = open_dataset(root)
        source.check_local()
        # A damaged shard fails here, naming itself, rather than as a KeyError mid-read.
        source.check_shards([split])
        self.manifest = source.manifest
        self.shard_paths = source.paths(split)
        self.label_to_target = source.label_to_target(split)

        ids, images, labels, domains, class_names, shard_of_row = [], [], [], [], [], []
        for shard_index, path in enumerate(self.shard_paths):
            table = pq.read_table(path)
            ids.extend(table.column("id").to_pylist())
            images.extend(table.column("image").to_pylist())
            labels.extend(table.column("label").to_pylist())
            domains.extend(table.column("domain").to_pylist())
            class_names.extend(table.column("class_name").to_pylist())
            shard_of_row.extend([shard_index] * table.num_rows)

        self.ids = ids
        self._images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        try:
            self.targets = np.asarray([self.label_to_target[l] for l in labels], dtype=np.int64)
        except KeyError as e:
            raise ValueError(
                f"{self.root}: split {split!r} has label {e.args[0]} that its manifest does not list; "
                "the dataset is inconsistent, re-create it"
            ) from None
        self.domains = np.asarray(domains, dtype=object)
        self.class_names = np.asarray(class_names, dtype=object)
        self._shard_of_row = np.asarray(shard_of_row, dtype=np.int32)
        self.num_classes = len(self.label_to_target)
        # Class name of each contiguous target, e.g. for plots and reports.
        names = dict(zip(labels, class_names))
        self.target_names = [names.get(l, str(l)) for l in sorted(self.label_to_target)]

    def __len__(self) -> int:
        return len(self._images)

    def image(self, index: int) -> Image.Image:
        try:
            return decode_image(self._images[index], max_pixels=self.max_pixels)
        except InvalidImageError as e:
            shard = Path(self.shard_paths[self._shard_of_row[index]]).name
            raise InvalidImageError(
                e.reason, f"image {self.ids[index]!r} (row {index}, shard {shard} of {self.root}) cannot be decoded"
            ) from e

    def images(self, indices) -> dict[int, Image.Image]:
        """RGB images of rows ``indices`` (for figures), as ``{row: PIL image}``."""
        return {int(i): self.image(int(i)).convert("RGB") for i in indices}

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
