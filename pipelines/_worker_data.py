"""Worker side of the training data: Ray Data rows back into torch tensors (training batches)
and a val/test stream in the shape ``idml.evaluation.evaluate_model`` expects. Kept apart from
``pipelines._data`` so the Ray Data operators load without torch."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
import torch.utils.data

from idml.data.images import decode_image
from idml.data.source import DatasetSource


def iter_train_batches(shard, image_size: int, skipped: list[str]) -> Iterator[tuple[Any, Any]]:
    """``(images uint8 NCHW, targets)`` torch batches from a worker's shard; ids of skipped
    corrupt images are appended to ``skipped``."""
    for batch in shard.iter_batches(batch_size=1, batch_format="pyarrow", prefetch_batches=2):
        for images, targets, skipped_ids in zip(batch.column("images").to_pylist(), batch.column("targets").to_pylist(),
                                                batch.column("skipped_ids").to_pylist()):
            n = len(targets)
            # copy: frombuffer views read-only bytes, and the loop scales the tensor in place
            array = np.frombuffer(images, dtype=np.uint8).reshape(n, 3, image_size, image_size).copy()
            skipped.extend(skipped_ids)
            yield torch.from_numpy(array), torch.as_tensor(targets, dtype=torch.long)


class StreamedSplit(torch.utils.data.IterableDataset):
    """A val/test split from Ray Data (decoded once, cached), shaped like ``ImageShardDataset`` for
    ``idml.evaluation.evaluate_model``: iterating yields ``(image, label)``, and ``labels``,
    ``domains``, ``ids`` describe the rows of the latest pass in the order they came
    (undecodable images are skipped and listed in ``skipped``). ``image(i)`` reads row ``i``'s
    picture back from the shards (for the retrieval grid).

    The iterator must preserve order (every pass yields the rows in the same order), and the
    torch DataLoader around it must use ``num_workers=0``.
    """

    def __init__(self, iterator, source: DatasetSource, split: str, batch_size: int):
        super().__init__()
        self.iterator = iterator
        self.source = source
        self.split = split
        self.batch_size = batch_size
        self.labels = np.zeros(0, dtype=np.int64)
        self.domains = np.zeros(0, dtype=object)
        self.ids: list[str] = []
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return self.source.num_images(self.split)

    def __iter__(self):
        labels, domains, ids, skipped = [], [], [], []
        for batch in self.iterator.iter_batches(batch_size=self.batch_size, batch_format="numpy", prefetch_batches=2):
            valid = batch["valid"]
            skipped += batch["id"][~valid].tolist()
            labels += batch["label"][valid].tolist()
            domains += batch["domain"][valid].tolist()
            ids += batch["id"][valid].tolist()
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][valid]))
            yield from zip(images, batch["label"][valid].tolist())  # evaluate_model reads labels, not these
        self.labels = np.asarray(labels, dtype=np.int64)
        self.domains = np.asarray(domains, dtype=object)
        self.ids, self.skipped = ids, skipped

    def image(self, index: int):
        return self.images([index])[index]

    def images(self, indices) -> dict[int, Any]:
        """RGB PIL images of rows ``indices`` of the latest pass, read back by id in one scan."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        wanted = {self.ids[i]: i for i in indices}
        table = pads.dataset(self.source.paths(self.split), filesystem=self.source.filesystem, format="parquet") \
            .to_table(columns=["id", "image"], filter=pc.field("id").isin(list(wanted)))
        found = {id_: data for id_, data in zip(table.column("id").to_pylist(), table.column("image").to_pylist())}
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise KeyError(f"images {missing[:5]} not found in split {self.split!r} of {self.source.uri}")
        return {wanted[id_]: decode_image(data) for id_, data in found.items()}
