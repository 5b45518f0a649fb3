"""Lossy codes re-scored by exact cosine from memory-mapped vector files, and IVF shard files
written without the coarse quantizer that trained.faiss holds (issue 12). Synthetic vectors
through the library's build (no images, no Ray)."""

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from idml.files import file_sha256
from idml.errors import DamagedFileError, InputError
from idml.faiss_import import faiss
from idml.index import BuildRequest, IndexSearcher, IndexStore, StagedBuild, verify_index
from idml.index.combined import combine, merge_ondisk
from idml.index.factory import check_factory
from idml.index.faiss_io import read_index, write_index_atomic
from idml.index.shards import build_shard, train_index
from idml.index.spec import DEFAULT_REFINE, IndexSpec, resolve_spec
from idml.index.embed import embedded_batch
from idml.index.partitions import read_vectors


def loose_clusters(n, d, seed, clusters=2000, spread=1.5):
    """Many loose clusters (neighbours scatter over IVF lists), as benchmarks/index_scale.py's
    ``loose`` distribution; the centres are the same for every seed."""
    centers = np.random.default_rng(0).standard_normal((clusters, d)).astype(np.float32)
    faiss.normalize_L2(centers)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, d), dtype=np.float32) * np.float32(spread / np.sqrt(d))
    x = centers[rng.integers(0, clusters, n)] + noise
    faiss.normalize_L2(x)
    return x


def ids_of(start, n):
    return [f"v{i:06d}" for i in range(start, start + n)]


def build_synthetic(index_dir, x, first_id=0, kind="build", **options):
    """``idml index build``/``update`` without the embedding: ``x`` are the vectors of ids
    ``first_id``...; the corpus is everything from v000000 to the last of them."""
    n_total, d = first_id + len(x), x.shape[1]
    checkpoint = {"path": "synthetic", "sha256": "synthetic", "embedding_dim": d, "uncertainty_weight": 0.0}
    corpus = {"uri": "synthetic", "kind": "synthetic", "splits": [], "num_rows": n_total, "fingerprint": str(n_total)}
    with StagedBuild(IndexStore(index_dir), BuildRequest(kind, d, checkpoint, corpus, **options)) as staged:
        sink = staged.sink()
        ids = ids_of(first_id, len(x))
        sink.add(embedded_batch(ids, [f"h{i}" for i in ids], x, np.full_like(x, 0.01)))
        sink.close()
        all_ids = ids_of(0, n_total)
        return staged.finish(pa.table({"id": all_ids, "content_hash": [f"h{i}" for i in all_ids]}))


def recall_vs_exact(searcher, queries, exact_ids, k=10):
    results = searcher.search(queries, np.zeros(len(queries), np.float32), k)
    return float(np.mean([len({h.id for h in r.hits} & set(e)) / k for r, e in zip(results, exact_ids)])), results


# -- re-scoring ------------------------------------------------------------------------------------
def test_lossy_candidates_are_rescored_by_exact_cosine_in_search_and_in_the_measured_recall(tmp_path):
    n, d = 20_000, 64
    x = loose_clusters(n, d, seed=1)
    m = build_synthetic(tmp_path / "idx", x, index_type="IVF64,PQ8", shards=2, recall_sample=200)
    spec = m["faiss"]
    assert spec["refine"] == DEFAULT_REFINE and m["recall"]["refine"] == DEFAULT_REFINE
    for entry in m["shards"]:
        assert entry["vectors"] == entry["index"].replace(".faiss", ".vectors.npy") and entry["vectors"] in m["files"]
    # The vectors are on disk, not in the index's memory: the estimate is the codes' alone.
    assert spec["estimated_bytes"] == check_factory("IVF64,PQ8", d).estimated_bytes(n, 2)
    assert n * d * 4 < m["metrics"]["exact_vector_bytes"] < n * d * 4 + 1024
    assert verify_index(tmp_path / "idx") == []

    queries = loose_clusters(200, d, seed=2)
    _, exact = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    exact_ids = [[f"v{i:06d}" for i in row] for row in exact]
    every_list = spec["nlist"]  # all lists probed: what is left is the codes' error
    rescored, hits = recall_vs_exact(IndexSearcher(tmp_path / "idx", nprobe=every_list), queries, exact_ids)
    plain_searcher = IndexSearcher(tmp_path / "idx", nprobe=every_list, refine=0)
    plain, plain_hits = recall_vs_exact(plain_searcher, queries, exact_ids)
    assert rescored >= 0.5 and rescored >= plain + 0.25, (rescored, plain)  # measured: 0.63 vs 0.22

    # Reported cosines are exact once re-scored, the codes' approximations otherwise.
    def cosine_error(results):
        return max(abs(h.cosine - float(q @ x[int(h.id[1:])])) for q, r in zip(queries, results) for h in r.hits)

    assert cosine_error(hits) < 1e-5 and cosine_error(plain_hits) > 1e-2

    # The build measured (and tuned nprobe for) the recall the searcher delivers: re-scored.
    assert m["recall"]["recall"] >= plain + 0.2 and abs(m["recall"]["recall"] - rescored) < 0.15


def test_query_refine_flag_update_and_damaged_vector_files(tmp_path, capsys):
    from pipelines.index_cli import main

    d, idx = 32, tmp_path / "idx"
    x = loose_clusters(4000, d, seed=3)
    build_synthetic(idx, x, index_type="IVF16,PQ8", shards=2)
    # IVF shard files are stored without their coarse quantizer (trained.faiss has it).
    shard_file = faiss.read_index(str(idx / "versions/v000001/shards/shard-000000.faiss"))
    assert faiss.extract_index_ivf(shard_file).quantizer.ntotal == 0

    def query_cosines(*flags):
        out = tmp_path / "hits.json"
        assert main(["query", "--index-dir", str(idx), "--ids", "v000007", "--k", "5", "--json", str(out), *flags]) == 0
        hits = json.loads(out.read_text())["results"][0]["hits"]
        return np.array([h["cosine"] for h in hits]), np.array([x[int(h["id"][1:])] @ x[7] for h in hits])

    reported, exact = query_cosines()
    np.testing.assert_allclose(reported, exact, atol=1e-5)
    reported, exact = query_cosines("--refine", "0")
    assert np.abs(reported - exact).max() > 1e-3  # the codes' approximations
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["query", "--index-dir", str(idx), "--ids", "v000007", "--refine", "-1"])
    assert exit_.value.code == 2 and "--refine" in capsys.readouterr().err

    # An update reuses the unchanged shards' vector files (hard links) and writes the new shard's.
    m2 = build_synthetic(idx, loose_clusters(300, d, seed=4), first_id=4000, kind="update")
    v1, v2 = idx / "versions/v000001/shards", idx / "versions/v000002/shards"
    assert [s["source"] for s in m2["shards"]] == ["reused", "reused", "new"]
    assert all("vectors" in s for s in m2["shards"])
    assert os.path.samefile(v1 / "shard-000000.vectors.npy", v2 / "shard-000000.vectors.npy")
    assert verify_index(idx) == [] and m2["recall"]["refine"] == DEFAULT_REFINE

    # A damaged vector file is refused (never used to re-score), a missing one too.
    damaged = v2 / "shard-000002.vectors.npy"
    with open(damaged, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DamagedFileError, match="checksum mismatch for .*shard-000002.vectors.npy"):
        IndexSearcher(idx)
    assert any("shard-000002.vectors.npy" in p for p in verify_index(idx))
    assert main(["query", "--index-dir", str(idx), "--ids", "v000007"]) == 2
    assert "shard-000002.vectors.npy" in capsys.readouterr().err
    damaged.unlink()
    with pytest.raises(DamagedFileError, match="missing file .*shard-000002.vectors.npy"):
        IndexSearcher(idx)


def test_exact_indexes_store_no_vector_files(tmp_path):
    x = loose_clusters(2000, 16, seed=5)
    m = build_synthetic(tmp_path / "idx", x, index_type="IVF8,Flat")
    assert m["faiss"]["refine"] == 0 and not any(k.endswith(".vectors.npy") for k in m["files"])
    assert "exact_vector_bytes" in m["metrics"] and m["metrics"]["exact_vector_bytes"] == 0
    assert [check_factory(f, 16).lossy for f in ("Flat", "IVF8,Flat", "HNSW8", "IVF8,PQ4", "IVF8,SQ8", "PQ4")] == \
        [False, False, False, True, True, True]
    searcher = IndexSearcher(tmp_path / "idx", refine=4)  # nothing to re-score: no effect
    assert not searcher.index.rescores


def test_build_refine_sets_the_stored_and_measured_depth_and_an_update_keeps_it(tmp_path):
    from pipelines.index_cli import main

    d = 32
    x = loose_clusters(4000, d, seed=10)
    off, deep = tmp_path / "off", tmp_path / "deep"
    # Every list probed in both: the measured recalls differ by the re-scoring alone.
    m0 = build_synthetic(off, x, index_type="IVF16,PQ8", shards=2, nprobe=16, refine=0)
    m20 = build_synthetic(deep, x, index_type="IVF16,PQ8", shards=2, nprobe=16, refine=20)
    assert (m0["faiss"]["refine"], m0["recall"]["refine"], m20["faiss"]["refine"], m20["recall"]["refine"]) == (0, 0, 20, 20)
    assert m20["recall"]["recall"] >= m0["recall"]["recall"] + 0.2, (m20["recall"], m0["recall"])
    # --refine 0: no vector files at all, the codes' scores; a query works, a --refine has nothing to use.
    assert not any("vectors" in s for s in m0["shards"]) and m0["metrics"]["exact_vector_bytes"] == 0
    assert not list(off.rglob("*.vectors.npy")) and verify_index(off) == []
    assert main(["query", "--index-dir", str(off), "--ids", "v000007", "--k", "5"]) == 0
    assert not IndexSearcher(off, refine=20).index.rescores
    assert IndexSearcher(deep).spec.refine == 20 and IndexSearcher(deep).index.rescores

    # An update keeps the parent's depth: vector files for its new shard exactly when it re-scores.
    new = loose_clusters(300, d, seed=11)
    u0, u20 = (build_synthetic(idx, new, first_id=4000, kind="update") for idx in (off, deep))
    assert [s["source"] for s in u0["shards"]] == ["reused", "reused", "new"]
    assert u0["faiss"]["refine"] == u0["recall"]["refine"] == 0 and not list(off.rglob("*.vectors.npy"))
    assert u20["faiss"]["refine"] == u20["recall"]["refine"] == 20 and all("vectors" in s for s in u20["shards"])
    assert verify_index(off) == [] and verify_index(deep) == []
    with pytest.raises(ValueError, match="an update keeps the re-scoring depth"):
        build_synthetic(deep, new, first_id=4000, kind="update", refine=5)


def test_refine_is_refused_where_there_is_nothing_to_rescore(tmp_path, checkpoint, capsys):
    from support import make_index_dataset

    from pipelines.index_cli import main

    assert resolve_spec("IVF8,PQ4", 1000, 16, refine=1).refine == 0  # 1 re-scores nothing new: off
    assert resolve_spec("IVF8,PQ4", 1000, 16).refine == DEFAULT_REFINE
    assert resolve_spec("flat", 1000, 16, refine=0).refine == 0  # 0 asks for nothing: accepted
    with pytest.raises(InputError, match="must be >= 0"):
        resolve_spec("IVF8,PQ4", 1000, 16, refine=-1)

    ds = make_index_dataset(tmp_path / "ds", 8)
    build = ["build", "--checkpoint", checkpoint, "--corpus", ds, "--index-dir", str(tmp_path / "idx"), "--no-mlflow"]
    for index in ("auto", "IVF2,Flat", "HNSW8"):  # exact: Flat, IVF-Flat, HNSW over Flat
        assert main([*build, "--index", index, "--refine", "1"]) == 2  # refused before embedding
        err = capsys.readouterr().err
        assert "already exact" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "idx" / "versions").exists()
    with pytest.raises(SystemExit) as exit_:
        main([*build, "--index", "IVF2,PQ4", "--refine", "-1"])
    assert exit_.value.code == 2 and "--refine" in capsys.readouterr().err


# -- IVF shard files without the coarse quantizer --------------------------------------------------
@pytest.mark.parametrize("factory", ["IVF512,Flat", "IVF512,PQ8"])
def test_ivf_shard_files_leave_the_quantizer_to_trained_faiss_and_search_the_same(tmp_path, factory):
    x = loose_clusters(12_000, 64, seed=6)
    queries = loose_clusters(100, 64, seed=7)
    spec = resolve_spec(factory, len(x), 64, nprobe=16)
    trained = train_index(x[: spec.train_size], spec)
    write_index_atomic(trained, tmp_path / "trained.faiss")
    quantizer_bytes = len(faiss.serialize_index(faiss.extract_index_ivf(trained).quantizer))
    assert quantizer_bytes >= 512 * 64 * 4
    parts = np.array_split(np.arange(len(x)), 2)
    in_memory, old_paths, new_paths = [], [], []
    for s, rows in enumerate(parts):
        shard = build_shard(x[rows], s, spec, trained)
        in_memory.append(shard)
        old_paths.append(tmp_path / f"old-{s}.faiss")
        new_paths.append(tmp_path / f"new-{s}.faiss")
        write_index_atomic(shard, old_paths[-1])  # as shard files were written before
        spec.kind.write_shard(shard, new_paths[-1])
        assert faiss.extract_index_ivf(shard).quantizer.ntotal == 512  # the shard in memory keeps it
        saved = old_paths[-1].stat().st_size - new_paths[-1].stat().st_size
        assert abs(saved - quantizer_bytes) < 200, (saved, quantizer_bytes)

    expected = combine(in_memory, spec, trained).search(queries, 10)
    on_disk = read_index(tmp_path / "trained.faiss")
    for paths in (new_paths, old_paths):  # old shard files, quantizer included, keep working
        shards = [spec.kind.open_shard(p, on_disk) for p in paths]
        found = combine(shards, spec, on_disk).search(queries, 10)
        np.testing.assert_array_equal(found[1], expected[1])
        np.testing.assert_array_equal(found[0], expected[0])
        alone = shards[0].search(queries, 10)  # one shard searched by itself needs the quantizer too
        np.testing.assert_array_equal(alone[1], in_memory[0].search(queries, 10)[1])
        merged = merge_ondisk(tmp_path / "trained.faiss", paths, tmp_path / f"merged-{paths[0].stem}", spec)
        np.testing.assert_array_equal(merged.search(queries, 10)[1], expected[1])
    with pytest.raises(ValueError, match="without its coarse quantizer"):
        spec.kind.open_shard(new_paths[0], None)


def test_the_index_estimate_counts_the_coarse_quantizer_once():
    check = check_factory("IVF1024,PQ8", 64)
    assert check.quantizer_bytes >= 1024 * 64 * 4 and check.fixed_bytes < check.quantizer_bytes
    # More shards add copies of the codebooks (and list headers), never of the centroids.
    assert check.estimated_bytes(10_000, 9) - check.estimated_bytes(10_000, 1) == 8 * check.fixed_bytes


def test_a_version_written_before_reads_and_updates_as_it_was(tmp_path):
    from idml.files import write_json_atomic

    x = loose_clusters(3000, 32, seed=8)
    idx = tmp_path / "idx"
    m = build_synthetic(idx, x, index_type="IVF16,PQ8", shards=2)
    vdir = idx / "versions/v000001"
    queries, no_uncertainty = x[:20], np.zeros(20, np.float32)
    before = [[h.id for h in r.hits] for r in IndexSearcher(idx, refine=0).search(queries, no_uncertainty, 5)]

    # What the previous format wrote: shard files holding their own quantizer, no exact vectors.
    spec, trained = IndexSpec.from_dict(m["faiss"]), read_index(vdir / "trained.faiss")
    for entry in m["shards"]:
        shard = build_shard(read_vectors(vdir / entry["embeddings"]), entry["shard"], spec, trained)
        write_index_atomic(shard, vdir / entry["index"])
        (vdir / entry["vectors"]).unlink()
        del m["files"][entry.pop("vectors")]
        m["files"][entry["index"]] = {"sha256": file_sha256(vdir / entry["index"]),
                                      "bytes": (vdir / entry["index"]).stat().st_size}
    del m["faiss"]["refine"], m["recall"]["refine"]
    write_json_atomic(vdir / "manifest.json", {**m, "format_version": 1})
    # The version is sound; its merged cache was merged from the shard files replaced above.
    assert verify_index(idx) == [f"{idx / 'cache/v000001'} was made from other sources than these (built_from "
                                 "differs) (a derived file: merged again from the version's shards at the next query)"]

    searcher = IndexSearcher(idx)
    assert not searcher.index.rescores  # nothing to re-score with: the codes' scores, as before
    assert [[h.id for h in r.hits] for r in searcher.search(queries, no_uncertainty, 5)] == before
    m2 = build_synthetic(idx, loose_clusters(200, 32, seed=9), first_id=3000, kind="update")
    assert m2["format_version"] == 2 and [s["source"] for s in m2["shards"]] == ["reused", "reused", "new"]
    assert not any("vectors" in s for s in m2["shards"]) and verify_index(idx) == []
    shard_files = [faiss.read_index(str(idx / "versions/v000002" / s["index"])) for s in m2["shards"]]
    assert [faiss.extract_index_ivf(s).quantizer.ntotal for s in shard_files] == [16, 16, 0]  # old, old, new
    mu, u = IndexSearcher(idx).lookup(["v003005"])
    assert IndexSearcher(idx).search(mu, u, 1)[0].hits[0].id == "v003005"

    write_json_atomic(vdir / "manifest.json", {**m, "format_version": 99})
    with pytest.raises(ValueError, match="is not an idml-index v1/v2 manifest"):
        IndexSearcher(idx, "v000001")
