"""Vector labels: every stored vector carries ``shard << 32 | row`` (its shard number and its row
in the shard's embedding file), so the label alone finds the id and the uncertainty, in sharded
and merged indexes alike, and a shard reused unchanged by a later version keeps its labels."""

from __future__ import annotations

import numpy as np

SHARD_BITS = 32
ROW_MASK = (1 << SHARD_BITS) - 1


def labels_for(shard: int, n: int) -> np.ndarray:
    return (np.int64(shard) << SHARD_BITS) | np.arange(n, dtype=np.int64)


def split_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, np.int64)
    return labels >> SHARD_BITS, labels & ROW_MASK
