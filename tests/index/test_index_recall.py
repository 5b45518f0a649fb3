import faiss
import numpy as np

from idml.index.combined import combine
from idml.index.labels import split_labels
from idml.index.shards import build_shard
from idml.index.spec import resolve_spec
from idml.index.recall import GT_DEPTH, RecallSample


def _exact(queries, x, ids, k):
    d, i = faiss.knn(queries, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    return d, np.where(i >= 0, ids[np.maximum(i, 0)], "")


def test_incremental_ground_truth_matches_recomputing_it():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    faiss.normalize_L2(x)
    ids = np.array([f"id{i}" for i in range(len(x))])
    q = np.arange(0, 3000, 50)
    d, found = _exact(x[q], x, ids, GT_DEPTH + 1)
    sample = RecallSample.from_exact(ids[q], x[q], d, found, complete=False)

    removed = set(ids[rng.choice(3000, 300, replace=False)].tolist())
    new = rng.standard_normal((200, 16)).astype(np.float32)
    faiss.normalize_L2(new)
    new_ids = np.array([f"new{i}" for i in range(200)])
    d_new, f_new = _exact(x[q], new, new_ids, GT_DEPTH + 1)
    updated = sample.without(removed).merged(d_new, f_new)

    keep = ~np.isin(ids, list(removed))
    all_x, all_ids = np.concatenate([x[keep], new]), np.concatenate([ids[keep], new_ids])
    d_ref, f_ref = _exact(x[q], all_x, all_ids, 11)
    use = updated.usable(10)
    assert use.mean() > 0.9
    for row in np.flatnonzero(use):
        ref = [i for i in f_ref[row] if i != ids[q][row]][:10]
        assert updated.gt_ids[row, :10].tolist() == ref

    # A perfect search scores 1; the query itself is never counted.
    assert updated.recall(f_ref, 10)[0] == 1.0
    assert sample.recall(np.full((len(q), 11), ""), 10)[0] == 0.0


def test_labels_of_combined_shards_are_global():
    spec = resolve_spec("flat", 10, 4)
    a = build_shard(np.eye(4, dtype=np.float32), 3, spec, None)
    _, labels = combine([a], spec, None).search(np.eye(4, dtype=np.float32)[:1], 1)
    assert split_labels(labels)[0][0, 0] == 3
