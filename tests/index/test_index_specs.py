"""Index specs (issue 12): faiss factory strings, the choice under a memory budget, nprobe/efSearch
tuning for a recall target within a latency budget. Tiny data, no Ray."""

import numpy as np
import pytest
from support import build_in_process, clustered_vectors, make_index_dataset

from idml.errors import InputError
from idml.index import IndexSearcher, IndexStore, verify_index
from idml.index.combined import combine
from idml.index.factory import check_factory
from idml.index.kinds import EF_SEARCH_VALUES
from idml.index.labels import labels_for
from idml.index.recall import exact_topk
from idml.index.shards import build_shard, train_index
from idml.index.spec import (
    FLAT_MAX_VECTORS,
    TRAIN_POINTS_PER_LIST,
    choose_index,
    default_nlist,
    estimated_index_bytes,
    parse_bytes,
    pq_code_sizes,
    resolve_spec,
)
from idml.index.tuning import query_latency_ms, search_values, set_nprobe, tune_search


# -- factory strings -------------------------------------------------------------------------------
@pytest.mark.parametrize("factory, kind, nlist", [
    ("IVF16,PQ8", "ivf", 16), ("IVF16,PQ8x4fs", "ivf", 16), ("IVF16,SQ8", "ivf", 16), ("IVF16,Flat", "ivf", 16),
    ("HNSW16", "hnsw", 0), ("PQ8", "scan", 0), ("IDMap,Flat", "flat", 0), ("Flat", "flat", 0),
])
def test_factory_strings_that_search_by_inner_product_are_accepted(factory, kind, nlist):
    check = check_factory(factory, 32)
    assert (check.kind, check.nlist) == (kind, nlist)
    assert check.bytes_per_vector > 0 and check.estimated_bytes(1000) > check.estimated_bytes(10)


def test_checking_a_pq_factory_prints_no_faiss_clustering_warnings(capfd):
    check_factory("IVF32,PQ16", 64)  # 1,024 sample vectors for 16 codebooks of 256 centroids
    assert "WARNING clustering" not in capfd.readouterr().err


@pytest.mark.parametrize("factory, reason", [
    ("bogus", "could not parse index string bogus"),
    ("IVF16,PQ7", "should be a multiple of the number of subquantizers"),  # 32 % 7 != 0
    ("HNSW16,PQ8", "L2 metric only"),  # faiss ignores the inner-product metric for HNSW-PQ
    ("LSH", "metric == METRIC_L2"),
    ("OPQ8,IVF16,PQ8", "pre-transform .* is not supported"),
    ("IVF16,PQ8,RFlat", "refine stage .* is not supported"),
])
def test_bad_factory_strings_are_refused_with_the_reason_in_one_line(factory, reason):
    with pytest.raises(InputError, match=reason) as err:
        check_factory(factory, 32)
    assert "\n" not in str(err.value) and f"--index {factory!r}" in str(err.value)


def test_the_command_line_refuses_a_bad_factory_string_before_embedding(tmp_path, checkpoint, capsys):
    from pipelines.index_cli import main

    ds = make_index_dataset(tmp_path / "ds", 8)
    code = main(["build", "--checkpoint", checkpoint, "--corpus", ds, "--index-dir", str(tmp_path / "idx"),
                 "--index", "IVF16,PQ7", "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and "subquantizers" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "idx" / "versions").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["build", "--checkpoint", checkpoint, "--corpus", ds, "--index-dir", str(tmp_path / "idx"),
              "--max-index-memory", "8XB"])
    assert exit_.value.code == 2 and "8GB" in capsys.readouterr().err


def test_memory_sizes_parse_with_decimal_and_binary_units():
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5TB") == 1.5e12 and parse_bytes("4096") == 4096
    for bad in ("8XB", "-1GB", "", "GB", "0MB"):
        with pytest.raises(InputError, match="e.g. 8GB"):
            parse_bytes(bad)


# -- the choice under a memory budget --------------------------------------------------------------
def test_memory_budget_choice_at_its_boundaries():
    d, small, big = 512, FLAT_MAX_VECTORS, 1_000_000
    flat = estimated_index_bytes("Flat", small, d)
    assert choose_index(small, d, flat).factory == "Flat"  # exactly fits
    nlist_small = default_nlist(small)
    assert choose_index(small, d, flat - 1).factory == f"IVF{nlist_small},PQ256"  # IVF-Flat is bigger still
    # Above FLAT_MAX_VECTORS exact search is too slow, whatever the budget.
    assert choose_index(small + 1, d, 10**15).factory.endswith(",Flat")
    assert choose_index(small + 1, d, 10**15).factory.startswith("IVF")

    ivf_flat = estimated_index_bytes("IVF4096,Flat", big, d)
    assert choose_index(big, d, ivf_flat).factory == "IVF4096,Flat"
    assert choose_index(big, d, ivf_flat - 1).factory == "IVF4096,PQ256"  # the largest code that fits
    pq64 = estimated_index_bytes("IVF4096,PQ64", big, d)
    assert choose_index(big, d, pq64).factory == "IVF4096,PQ64"
    assert choose_index(big, d, pq64 - 1).factory == "IVF4096,PQ32"
    assert choose_index(big, d, pq64, nlist=16384).factory == "IVF16384,PQ32"  # more centroids, less room
    smallest = estimated_index_bytes("IVF4096,PQ1", big, d)
    assert choose_index(big, d, smallest).factory == "IVF4096,PQ1"
    with pytest.raises(InputError, match="raise the budget"):
        choose_index(big, d, smallest - 1)

    # The example: 100M x 512 needs ~200 GB as IVF-Flat; 8 GB gives IVF-PQ with 64-byte codes.
    choice = choose_index(100_000_000, d, parse_bytes("8GB"), shards=25)
    assert choice.factory == "IVF32768,PQ64" and choice.estimated_bytes <= 8e9 and "IVF-Flat needs 205" in choice.reason
    # Shard files are written without the 67 MB of coarse centroids (trained.faiss holds them
    # once); each carries only its copy of the 0.5 MB of PQ codebooks, so 400 shards (the default
    # 250k rows each) still fit 64-byte codes.
    many = choose_index(100_000_000, d, parse_bytes("8GB"), shards=400)
    assert many.factory == "IVF32768,PQ64" and many.estimated_bytes - choice.estimated_bytes == 375 * 256 * d * 4
    assert pq_code_sizes(512) == [256, 128, 64, 32, 16, 8, 4, 2, 1] and pq_code_sizes(48)[:3] == [24, 16, 12]


@pytest.mark.parametrize("factory", ["Flat", "IVF64,Flat", "IVF64,PQ8"])
@pytest.mark.parametrize("shards", [1, 3])
def test_the_memory_formula_matches_what_faiss_stores(factory, shards):
    n = 100_000
    measured = check_factory(factory, 32).estimated_bytes(n, shards)
    assert abs(estimated_index_bytes(factory, n, 32, shards) - measured) / measured < 0.01


def test_resolve_spec_records_the_choice_and_refuses_what_does_not_fit():
    spec = resolve_spec("auto", 1_000_000, 64, max_index_bytes=parse_bytes("100MB"), max_query_ms=5)
    assert (spec.index_type, spec.factory, spec.nlist) == ("ivf", "IVF4096,PQ32", 4096)
    assert spec.estimated_bytes <= 10**8 and "PQ code" in spec.choice and spec.max_query_ms == 5
    assert spec.train_size == TRAIN_POINTS_PER_LIST * 4096 and spec.nprobe_auto
    hnsw = resolve_spec("HNSW16", 5000, 32)
    assert (hnsw.index_type, hnsw.train_size, hnsw.search_param) == ("hnsw", 0, "efSearch")
    pq = resolve_spec("IVF16,PQ8", 5000, 32)
    assert pq.train_size == 5000  # codebooks want CODEC_TRAIN_POINTS; all there are
    with pytest.raises(InputError, match="over --max-index-memory"):
        resolve_spec("IVF16,Flat", 100_000, 32, max_index_bytes=10**6)
    with pytest.raises(InputError, match="write the lists into the factory string"):
        resolve_spec("IVF16,PQ8", 5000, 32, nlist=32)
    with pytest.raises(InputError, match="efSearch is tuned instead"):
        resolve_spec("HNSW16", 5000, 32, nprobe=4)
    with pytest.raises(InputError, match="4096 IVF lists for 1000 vectors"):
        resolve_spec("IVF4096,Flat", 1000, 32)


# -- tuning ----------------------------------------------------------------------------------------
def test_tuning_stops_at_the_target_or_at_the_latency_budget():
    def measure(v):
        return min(1.0, v / 16), 100

    def latency(v):
        return float(v)  # ms grow with the value

    reached = tune_search(measure, latency, [1, 2, 4, 8, 16, 32], 0.5)
    assert (reached.value, reached.recall, reached.reached) == (8, 0.5, True) and len(reached.tried) == 4
    capped = tune_search(measure, latency, [1, 2, 4, 8, 16, 32], 0.9, max_query_ms=4)
    assert (capped.value, capped.reached) == (4, False)  # the largest value within 4 ms
    assert capped.tried[-1]["value"] == 8  # measured, over budget, not taken
    none_fit = tune_search(measure, latency, [2, 4], 0.9, max_query_ms=1)
    assert none_fit.value == 2 and not none_fit.reached

    def capped_by_codes(v):  # lossy codes: recall stops rising at 0.6, short of the target
        return min(0.6, v / 16), 100

    plateau = tune_search(capped_by_codes, latency, [1, 2, 4, 8, 16, 32, 64, 128], 0.9)
    assert (plateau.value, plateau.recall, plateau.reached) == (16, 0.6, False)  # not 128: no better, 8x slower
    assert [t["value"] for t in plateau.tried] == [1, 2, 4, 8, 16, 32]


def test_nprobe_tuning_reaches_the_target_on_clustered_vectors():
    x = clustered_vectors(20_000, clusters=200, noise=1.0)  # loose: one IVF list holds ~70% of a query's neighbours
    queries = x[np.random.default_rng(3).choice(len(x), 100, replace=False)]
    spec = resolve_spec("ivf", len(x), 32, nlist=128, target_recall=0.9)
    trained = train_index(x[: spec.train_size], spec)
    parts = np.array_split(np.arange(len(x)), 2)
    combined = combine([build_shard(x[r], s, spec, trained) for s, r in enumerate(parts)], spec, trained)
    _, exact = exact_topk(queries, [(x[r], labels_for(s, len(r))) for s, r in enumerate(parts)], 10)

    def measure(nprobe):
        _, found = combined.search(queries, 10, nprobe=nprobe)
        return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])), len(queries)

    def latency(nprobe):
        set_nprobe(combined.index, nprobe)
        return query_latency_ms(combined.index, queries, 10)

    tuning = tune_search(measure, latency, search_values(spec), spec.target_recall)
    assert tuning.reached and tuning.recall >= 0.9 and 1 < tuning.value < spec.nlist and tuning.query_ms > 0
    recalls = [t["recall"] for t in tuning.tried]
    assert recalls == sorted(recalls) and recalls[0] < 0.9  # one list is not enough: the tuning did something
    assert search_values(spec) == [1, 2, 4, 8, 16, 32, 64, 128] and search_values(spec, 16)[0] == 16


# -- end to end through the in-process builder ----------------------------------------------------
def test_ivf_pq_build_update_and_query(tmp_path, checkpoint, capsys):
    ds = make_index_dataset(tmp_path / "ds", 40)
    store = IndexStore(tmp_path / "idx")
    # 4-bit codes: 16 centroids per sub-quantizer train on 40 vectors.
    m = build_in_process(store.root, ds, checkpoint, index_type="IVF2,PQ8x4", shards=2, max_query_ms=1000)
    spec, recall = m["faiss"], m["recall"]
    assert (spec["index_type"], spec["factory"], spec["nlist"]) == ("ivf", "IVF2,PQ8x4", 2)
    assert 1 <= spec["nprobe"] <= 2 and spec["estimated_bytes"] > 0 and spec["choice"] == "--index IVF2,PQ8x4"
    assert recall["queries"] > 0 and recall["query_ms"] > 0 and recall["tried"] and recall["max_query_ms"] == 1000
    assert 0 < recall["recall"] <= 1 and "trained.faiss" in m["files"] and m["metrics"]["estimated_index_bytes"] > 0
    assert verify_index(store.root) == []
    from idml.index.build import BuildIndexResult, format_build_summary

    summary = format_build_summary(BuildIndexResult(m, True, 40))
    assert f"IVF2,PQ8x4, nprobe {spec['nprobe']}" in summary and "index chosen: --index IVF2,PQ8x4; estimated memory" in summary
    assert "ms/query" in summary and "(target 0.95, within 1000 ms" in summary

    make_index_dataset(tmp_path / "ds", 40, drop=(1,), extra=3)
    m2 = build_in_process(store.root, ds, checkpoint, kind="update")
    assert m2["faiss"]["factory"] == "IVF2,PQ8x4" and m2["counts"]["vectors"] == 42
    assert m2["files"]["trained.faiss"] == m["files"]["trained.faiss"]  # the same codebooks and quantizer
    assert verify_index(store.root) == []
    for combine in ("shards", "ondisk"):
        searcher = IndexSearcher(store.root, combine=combine, nprobe=2)
        mu, u = searcher.lookup(["img-041"])
        assert "img-041" in [h.id for h in searcher.search(mu, u, 3)[0].hits]
    with pytest.raises(ValueError, match="an update keeps the index spec"):
        build_in_process(store.root, ds, checkpoint, kind="update", index_type="HNSW8")
    # A budget nothing fits is refused before anything is embedded or written.
    with pytest.raises(InputError, match="even IVF1,PQ1 needs about"):
        build_in_process(tmp_path / "idx2", ds, checkpoint, max_index_bytes=5000)
    assert not (tmp_path / "idx2").exists()


def test_hnsw_shards_each_get_a_graph_and_efsearch_is_tuned(tmp_path, checkpoint):
    ds = make_index_dataset(tmp_path / "ds", 40)
    store = IndexStore(tmp_path / "idx")
    m = build_in_process(store.root, ds, checkpoint, index_type="HNSW8", shards=2)
    spec = m["faiss"]
    assert (spec["index_type"], spec["factory"]) == ("hnsw", "HNSW8") and spec["ef_search"] in EF_SEARCH_VALUES
    assert m["recall"]["recall"] >= 0.95 and m["recall"]["ef_search"] == spec["ef_search"]
    assert verify_index(store.root) == []
    make_index_dataset(tmp_path / "ds", 40, extra=2)
    m2 = build_in_process(store.root, ds, checkpoint, kind="update")  # new shard: a copy of the same template
    assert m2["faiss"]["factory"] == "HNSW8" and [s["source"] for s in m2["shards"]] == ["reused", "reused", "new"]
    assert verify_index(store.root) == []
    searcher = IndexSearcher(store.root)
    for image in ("img-007", "img-041"):
        mu, u = searcher.lookup([image])
        assert searcher.search(mu, u, 1)[0].hits[0].id == image


def test_ivf_sq8_is_one_entry_of_the_kind_table():
    """``--index ivf-sq8`` was added as one line of kinds.NAMED_INDEXES: the spec, the training of
    its codes, the shards, their combined search and the re-scoring depth all follow from the
    factory string it names and the ``ivf`` kind faiss builds from it."""
    from idml.index.kinds import INDEX_SHORTHANDS
    from idml.index.spec import DEFAULT_REFINE

    x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # spread out: each vector's nearest is itself
    assert "ivf-sq8" in INDEX_SHORTHANDS
    assert resolve_spec("ivf-sq8", len(x), 16).factory == f"IVF{default_nlist(len(x))},SQ8"
    spec = resolve_spec("ivf-sq8", len(x), 16, nlist=16)
    assert (spec.index_type, spec.factory, spec.search_param, spec.refine) == ("ivf", "IVF16,SQ8", "nprobe", DEFAULT_REFINE)
    assert spec.train_size == len(x)  # SQ8 codes are trained too (CODEC_TRAIN_POINTS), capped by the corpus
    trained = train_index(x[:spec.train_size], spec)
    shards = [build_shard(x[:1500], 0, spec, trained), build_shard(x[1500:], 1, spec, trained)]
    _, labels = combine(shards, spec, trained).search(x[1495:1505], 1, nprobe=16)
    assert labels[:, 0].tolist() == [*labels_for(0, 1500)[1495:], *labels_for(1, 5)]
