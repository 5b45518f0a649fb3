"""Queries (top-k, uncertainties, introspective re-ranking) and verification of a version."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from support import build_in_process, make_index_dataset

from idml.index import IndexSearcher, IndexStore, format_results, verify_index
from idml.index.partitions import read_vectors
from idml.index.query import QueryRequest, query_index
from idml.index.verify import VerifyRequest, verify_version
from idml.metric import introspective_distance


@pytest.fixture(scope="module")
def index(tmp_path_factory, checkpoint):
    root = tmp_path_factory.mktemp("search")
    ds = make_index_dataset(root / "ds", 40, corrupt=(3,))
    build_in_process(root / "idx", ds, checkpoint, shards=3)
    return root / "idx", ds


def _all_vectors(store):
    vdir = store.version_dir(store.current_version())
    ids, mus, us = [], [], []
    for s in store.read_manifest()["shards"]:
        t = pa.parquet.read_table(vdir / s["embeddings"], columns=["id", "uncertainty"])
        ids += t.column("id").to_pylist()
        us.append(t.column("uncertainty").to_numpy())
        mus.append(read_vectors(vdir / s["embeddings"]))
    return np.array(ids), np.concatenate(mus), np.concatenate(us)


def test_search_is_exact_and_reports_uncertainties(index):
    searcher = IndexSearcher(index[0])
    ids, mu, u = _all_vectors(searcher.store)
    q_mu, q_u = searcher.lookup(["img-010", "img-020"])
    res = searcher.search(q_mu, q_u, 5, exclude=["img-010", "img-020"], names=["img-010", "img-020"])
    for r, qi in zip(res, ["img-010", "img-020"]):
        cos = mu @ mu[ids == qi][0]
        cos[ids == qi] = -np.inf
        assert [h.id for h in r.hits] == ids[np.argsort(-cos)[:5]].tolist()
        assert r.uncertainty == pytest.approx(u[ids == qi][0])
        assert [h.uncertainty for h in r.hits] == pytest.approx([u[ids == h.id][0] for h in r.hits])
    assert "img-010" in format_results(res)
    with pytest.raises(ValueError, match="not in index"):
        searcher.lookup(["img-003"])  # corrupt, so not indexed


def test_rerank_orders_candidates_by_the_introspective_distance(index):
    searcher = IndexSearcher(index[0])
    ids, mu, u = _all_vectors(searcher.store)
    q_mu, q_u = searcher.lookup(["img-011"])
    lam = 5.0  # large, so the order visibly differs from cosine
    res = searcher.search(q_mu, q_u, 8, rerank=True, rerank_k=100, uncertainty_weight=lam, exclude=["img-011"])[0]
    cos = mu @ q_mu[0]
    alpha = torch.from_numpy(np.clip(2 - 2 * cos, 0, None).astype(np.float32))
    s = (1 - introspective_distance(alpha, torch.from_numpy((q_u[0] + u).astype(np.float32)), lam) / 2).numpy()
    s[ids == "img-011"] = -np.inf
    assert [h.id for h in res.hits] == ids[np.argsort(-s, kind="stable")[:8]].tolist()
    assert [h.similarity for h in res.hits] == pytest.approx(np.sort(s)[::-1][:8].tolist(), abs=1e-5)
    plain = searcher.search(q_mu, q_u, 8, exclude=["img-011"])[0]
    assert [h.id for h in plain.hits] != [h.id for h in res.hits]


def test_verify_finds_damage(index, tmp_path):
    import shutil

    idx = tmp_path / "idx"
    shutil.copytree(index[0], idx)
    assert verify_index(idx) == []
    store = IndexStore(idx)
    shard = store.version_dir("v000001") / "shards" / "shard-000001.faiss"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify_index(idx)
    assert len(problems) == 1 and "checksum mismatch" in problems[0]
    # Without checksums the deep check still sees the damaged id map.
    assert ["labels of shard 1" in p for p in verify_index(idx, checksums=False)] == [True]
    (store.version_dir("v000001") / "stray.bin").write_bytes(b"x")
    (store.version_dir("v000001") / "shards" / "shard-000000.parquet").unlink()
    problems = "\n".join(verify_index(idx))
    assert "missing file" in problems and "not listed" in problems


def test_query_by_ids_leaves_each_id_out_of_its_own_results(index):
    """``idml index query --ids``, as the library runs it."""
    idx, _ = index
    response = query_index(QueryRequest(idx, ids=["img-000", "img-001"], k=3))
    assert response.version == IndexStore(idx).current_version() and response.uncertainty_weight is None
    assert [r.query for r in response.results] == ["img-000", "img-001"]
    assert all(len(r.hits) == 3 and r.query not in {h.id for h in r.hits} for r in response.results)
    assert query_index(QueryRequest(idx, ids=["img-000"], rerank=True, uncertainty_weight=0.5)).uncertainty_weight == 0.5
    with pytest.raises(ValueError, match="one of the two"):
        query_index(QueryRequest(idx))


def test_verify_against_the_corpus(index, tmp_path):
    """``idml index verify --corpus``, as the library runs it (the corpus hashed in this process)."""
    idx, ds = index
    result = verify_version(VerifyRequest(idx, corpus=""))  # the corpus the version was built from
    assert result.problems == [] and result.version == IndexStore(idx).current_version()
    make_index_dataset(tmp_path / "ds2", 40, corrupt=(3,), changed={1: 77}, drop=(2,), extra=1)
    problems = "\n".join(verify_version(VerifyRequest(idx, corpus=str(tmp_path / "ds2"))).problems)
    assert "1 corpus images are not indexed" in problems and "img-040" in problems
    assert "no longer in the corpus" in problems and "img-002" in problems
    assert "changed since" in problems and "img-001" in problems


def test_opening_a_version_checks_its_files_and_remembers_the_sound_ones(index, tmp_path):
    import json
    import os
    import shutil
    import time

    from idml.errors import DamagedFileError
    from idml.index.store import RACY_SECONDS

    idx = tmp_path / "idx"
    shutil.copytree(index[0], idx)
    shutil.rmtree(idx / "cache", ignore_errors=True)  # what the build remembered (test_index_versions checks that)
    store = IndexStore(idx)
    files = store.read_manifest()["files"]
    stamps = store.cache_dir / "v000001.checked.json"
    store.checked_manifest()
    assert not stamps.exists()  # files changed moments ago are hashed again next time, not remembered
    time.sleep(RACY_SECONDS + 0.1)
    store.checked_manifest()
    assert set(json.loads(stamps.read_text())) == set(files)
    stamps.write_text("{damaged")  # the memory is only a shortcut: lost, everything is hashed again
    assert store.checked_manifest()[0] == "v000001" and set(json.loads(stamps.read_text())) == set(files)

    shard = store.version_dir("v000001") / "shards" / "shard-000002.parquet"
    before = shard.stat()
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime: only the ctime moved
    with pytest.raises(DamagedFileError, match="checksum mismatch for .*shard-000002.parquet; no other version"):
        store.checked_manifest()
    with pytest.raises(DamagedFileError, match="damaged"):
        IndexSearcher(idx)


def test_queries_carry_the_models_confidence_and_abstain_below_min_confidence(index, checkpoint, tmp_path):
    """The confidence a checkpoint carries (fitted on validation by training) is recorded with the
    version and answers every query: P(top-1 right) from the query's uncertainty and its top-1
    and top-2 cosines; ``min_confidence`` abstains below it."""
    from support import make_checkpoint

    from idml.checkpoint import load_checkpoint, save_checkpoint
    from idml.evaluation.confidence import Confidence

    idx, ds = index
    with pytest.raises(ValueError, match="has no confidence to abstain by"):
        query_index(QueryRequest(idx, ids=["img-000"], min_confidence=0.5))
    assert all(r.confidence is None for r in query_index(QueryRequest(idx, ids=["img-000"])).results)

    # a model whose confidence rises with the top-1 cosine alone
    confident = make_checkpoint(tmp_path / "confident.pt")
    state = load_checkpoint(confident)
    state["confidence"] = Confidence([0.0, 4.0, 0.0], 0.0, [0.0, 0.5, 0.0], [1.0, 0.1, 1.0]).to_dict()
    save_checkpoint(confident, state)
    build_in_process(tmp_path / "idx", ds, confident)
    ids = [f"img-{i:03d}" for i in (0, 1, 2, 4, 5, 6, 7, 8)]  # img-003 is the corrupt one
    results = query_index(QueryRequest(tmp_path / "idx", ids=ids, k=1)).results
    expected = Confidence.from_dict(state["confidence"])
    for r in results:
        assert len(r.hits) == 1 and not r.abstained
        assert r.confidence == pytest.approx(float(expected.predict([r.uncertainty], [r.hits[0].cosine], [0.0])[0]))
    threshold = float(np.median([r.confidence for r in results]))
    gated = query_index(QueryRequest(tmp_path / "idx", ids=ids, k=1, min_confidence=threshold)).results
    assert [g.abstained for g in gated] == [r.confidence < threshold for r in results]
    assert all(g.hits == [] for g in gated if g.abstained) and not all(g.abstained for g in gated)
    assert "abstained" in format_results(gated) and "confidence" in format_results(gated)
    with pytest.raises(ValueError, match="probability in"):
        query_index(QueryRequest(tmp_path / "idx", ids=ids, min_confidence=1.5))
