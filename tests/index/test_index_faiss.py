import time

import faiss
import numpy as np
import pytest
from support import clustered_vectors

import idml.index.gpu as gpu_module
from idml.index.combined import combine, merge_ondisk
from idml.index.faiss_io import write_index_atomic
from idml.index.gpu import gpu_count, gpu_status
from idml.index.labels import labels_for, split_labels
from idml.index.recall import exact_topk
from idml.index.shards import build_shard, train_index
from idml.index.spec import FLAT_MAX_VECTORS, TRAIN_POINTS_PER_LIST, IndexSpec, resolve_spec


def test_auto_spec_is_flat_for_small_and_ivf_for_large_corpora():
    assert resolve_spec("auto", 1000, 64).index_type == "flat"
    assert resolve_spec("auto", FLAT_MAX_VECTORS, 64).index_type == "flat"
    big = resolve_spec("auto", 1_000_000, 512)
    assert big.index_type == "ivf" and big.nlist == 4096 and big.factory == "IVF4096,Flat"  # ~4 sqrt(n)
    assert big.train_size == TRAIN_POINTS_PER_LIST * 4096 and big.nprobe_auto
    assert resolve_spec("ivf", 5000, 8, nlist=16, nprobe=4).nprobe == 4
    with pytest.raises(ValueError, match="nprobe"):
        resolve_spec("ivf", 5000, 8, nlist=16, nprobe=17)
    with pytest.raises(ValueError, match="faiss cannot build it"):
        resolve_spec("hnsw", 5000, 8)
    with pytest.raises(ValueError, match="nothing to index"):
        resolve_spec("auto", 0, 8)


def test_labels_round_trip():
    labels = labels_for(7, 5)
    shard, row = split_labels(labels)
    assert (shard == 7).all() and row.tolist() == [0, 1, 2, 3, 4]


def test_ivf_shards_search_like_one_index_and_merge_on_disk(tmp_path):
    x = clustered_vectors(12000, clusters=50, noise=0.35)
    queries = clustered_vectors(200, clusters=50, noise=0.35, seed=1)
    spec = resolve_spec("ivf", len(x), 32, nlist=64)
    trained = train_index(x[: spec.train_size], spec)
    write_index_atomic(trained, tmp_path / "trained.faiss")
    parts = np.array_split(np.arange(len(x)), 3)
    shards, paths = [], []
    for s, rows in enumerate(parts):
        shard = build_shard(x[rows], s, spec, trained)
        write_index_atomic(shard, tmp_path / f"s{s}.faiss")
        shards.append(shard)
        paths.append(tmp_path / f"s{s}.faiss")
    combined = combine(shards, spec, trained)
    assert combined.ntotal == len(x)

    exact_d, exact_i = exact_topk(queries, [(x[r], labels_for(s, len(r))) for s, r in enumerate(parts)], 10)
    ref_d, _ = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_allclose(exact_d, ref_d, rtol=1e-5, atol=1e-5)

    _, found = combined.search(queries, 10, nprobe=16)
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact_i)])
    assert recall >= 0.95
    _, all_lists = combined.search(queries, 10, nprobe=spec.nlist)
    assert np.mean([len(set(f) & set(e)) / 10 for f, e in zip(all_lists, exact_i)]) > 0.999

    spec.nprobe = 16
    merged = merge_ondisk(tmp_path / "trained.faiss", paths, tmp_path / "merged", spec)
    _, merged_found = merged.search(queries, 10)
    assert (merged_found == found).mean() > 0.99  # same lists probed, same candidates
    again = merge_ondisk(tmp_path / "trained.faiss", paths, tmp_path / "merged", spec)  # reuses the cache
    assert again.ntotal == len(x)
    # No prefetch threads per search: they made searches over cached lists 1.4-1.6x slower.
    assert faiss.downcast_InvertedLists(faiss.extract_index_ivf(again.index).invlists).prefetch_nthread == 0


def test_processes_opening_one_version_at_once_merge_it_once(tmp_path, monkeypatch, capfd):
    from concurrent.futures import ThreadPoolExecutor

    import faiss.contrib.ondisk

    x = clustered_vectors(3000, clusters=20, noise=0.35)
    spec = resolve_spec("ivf", len(x), 32, nlist=16, nprobe=4)
    trained = train_index(x[: spec.train_size], spec)
    write_index_atomic(trained, tmp_path / "trained.faiss")
    paths = []
    for s, rows in enumerate(np.array_split(np.arange(len(x)), 2)):
        spec.kind.write_shard(build_shard(x[rows], s, spec, trained), tmp_path / f"s{s}.faiss")
        paths.append(tmp_path / f"s{s}.faiss")
    real, calls = faiss.contrib.ondisk.merge_ondisk, []

    def slow_merge(*args, **kwargs):  # long enough for the other openers to reach the lock
        calls.append(1)
        real(*args, **kwargs)
        time.sleep(0.3)

    monkeypatch.setattr(faiss.contrib.ondisk, "merge_ondisk", slow_merge)
    # flock locks open file descriptions, so threads exclude each other as processes do.
    with ThreadPoolExecutor(4) as pool:
        merged = list(pool.map(lambda _: merge_ondisk(tmp_path / "trained.faiss", paths, tmp_path / "m", spec),
                               range(4)))
    assert len(calls) == 1
    assert [m.ntotal for m in merged] == [len(x)] * 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("m")) == ["m", "m.lock"]  # no temporaries
    # faiss's C++ prints ("resizing ...", "updating ondisk filename") never reach stdout, where a
    # command's results go, and stdout is itself again afterwards.
    print("after")
    assert capfd.readouterr().out == "after\n"


def test_flat_shards_are_exact():
    x = clustered_vectors(3000, clusters=50, noise=0.35)
    spec = resolve_spec("flat", len(x), 32)
    shards = [build_shard(x[:1000], 0, spec, None), build_shard(x[1000:], 4, spec, None)]
    d, labels = combine(shards, spec, None).search(x[:50], 1)
    shard, row = split_labels(labels[:, 0])
    assert (shard == 0).all() and (row == np.arange(50)).all()
    np.testing.assert_allclose(d[:, 0], 1.0, atol=1e-5)


def test_without_faiss_the_import_names_the_extras():
    import subprocess
    import sys

    # sys.modules[name] = None makes `import name` fail as if the package were not installed.
    code = "import sys; sys.modules['faiss'] = None\ntry:\n    import idml.index\nexcept ImportError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    assert "pip install 'idml[cpu]'" in out and "pip install 'idml[gpu]'" in out and "not both" in out


def test_gpu_search_is_refused_without_a_gpu_or_for_ivf():
    import numpy as np
    import pytest

    spec = IndexSpec("flat", 4)
    shard = build_shard(np.eye(4, dtype=np.float32), 0, spec, None)
    if gpu_count():
        pytest.skip("this machine's faiss sees a GPU (benchmarks/gpu_check.sh covers that case)")
    with pytest.raises(ValueError, match="faiss sees no GPU.*idml\\[gpu\\]"):
        combine([shard], spec, None, gpu=True)


def test_gpus_whose_kernels_faiss_lacks_are_not_used(monkeypatch, caplog):
    """faiss-gpu from PyPI sees an H100/H200 but aborts the process at its first kernel there: the
    probe runs in a child process, so the parent falls back to the CPU with the reason."""
    import logging

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    aborts = ("import sys; sys.stderr.write(\"Faiss assertion 'err__ == cudaSuccess' failed in runL2Norm at L2Norm.cu:257; "
              "details: CUDA error 209 no kernel image is available for execution on the device\\n\"); sys.exit(134)")
    for probe, expected in ((aborts, 0), ("pass", 2)):
        monkeypatch.setattr(gpu_module, "_GPU_PROBE", probe)
        gpu_status.cache_clear()
        with caplog.at_level(logging.WARNING, logger="idml.index.gpu"):
            count, reason = gpu_status()
        assert gpu_count() == count == expected
        if expected == 0:
            assert reason.startswith("faiss sees 2 GPU(s) but cannot run its kernels on them (CUDA error 209 no kernel "
                                     "image is available for execution on the device); its GPU builds from PyPI lack")
            assert "Hopper" in reason and "conda-forge" in reason
            assert "using the CPU" in caplog.text
        else:
            assert reason == ""
    gpu_status.cache_clear()  # the real answer for the tests that follow
