"""Builds and updates through the library (no Ray): versions, reuse, resume, crash safety."""

import logging
import os
import shutil

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import build_in_process, embed_in_process, make_image_folder, make_index_dataset, shape_image

from idml.index import BuildRequest, IndexSearcher, IndexStore, StagedBuild, resolve_corpus, verify_index
import idml.index.search as search_module
from idml.index.embed import describe_checkpoint


def _embeddings(store, version):
    vdir = store.version_dir(version)
    out = {}
    for s in store.read_manifest(version)["shards"]:
        t = pq.read_table(vdir / s["embeddings"]).to_pydict()
        out.update({i: (h, np.asarray(m)) for i, h, m in zip(t["id"], t["content_hash"], t["mu"])})
    return out


def test_build_then_update_adds_changes_and_deletes(tmp_path, checkpoint):
    ds = make_index_dataset(tmp_path / "ds", 40, corrupt=(3,))
    store = IndexStore(tmp_path / "idx")
    v1 = build_in_process(store.root, ds, checkpoint, shards=3)
    assert v1["counts"]["vectors"] == 39 and v1["counts"]["shards"] == 3 and v1["counts"]["corrupt"] == 1
    assert verify_index(store.root) == []

    make_index_dataset(tmp_path / "ds", 40, corrupt=(3,), changed={5: 999}, drop=(7, 8), extra=4)
    v2 = build_in_process(store.root, ds, checkpoint, kind="update")
    c = v2["counts"]
    assert (c["added"], c["changed"], c["removed"], c["vectors"], c["corrupt"]) == (4, 1, 2, 41, 1)
    assert v2["metrics"]["images_embedded"] == 5 and v2["parent"] == v1["version"]
    sources = [s["source"] for s in v2["shards"]]
    assert "new" in sources and "rewritten" in sources  # shards that lost rows are rewritten
    assert verify_index(store.root) == []
    old, new = _embeddings(store, "v000001"), _embeddings(store, "v000002")
    assert not {"img-007", "img-008"} & set(new) and {"img-040", "img-043"} <= set(new)
    assert np.array_equal(old["img-000"][1], new["img-000"][1])  # reused, not re-embedded
    assert old["img-005"][0] != new["img-005"][0]
    # v000001 is untouched by the update (hard links are never written through).
    assert verify_index(store.root, "v000001") == []

    v3 = build_in_process(store.root, ds, checkpoint, kind="update")  # nothing changed
    assert v3["version"] == "v000002" and store.versions() == ["v000001", "v000002"]


def test_unchanged_shards_are_shared_between_versions(tmp_path, checkpoint):
    ds = make_index_dataset(tmp_path / "ds", 40)
    store = IndexStore(tmp_path / "idx")
    build_in_process(store.root, ds, checkpoint, shards=4)
    make_index_dataset(tmp_path / "ds", 40, extra=2)
    v2 = build_in_process(store.root, ds, checkpoint, kind="update")
    assert [s["source"] for s in v2["shards"]] == ["reused"] * 4 + ["new"]
    a = store.version_dir("v000001") / "shards" / "shard-000000.parquet"
    b = store.version_dir("v000002") / "shards" / "shard-000000.parquet"
    assert os.stat(a).st_ino == os.stat(b).st_ino


def test_an_interrupted_build_resumes_from_its_finished_partitions(tmp_path, checkpoint):
    ds = make_index_dataset(tmp_path / "ds", 40, corrupt=(3,))
    corpus = resolve_corpus(ds)
    ckpt = describe_checkpoint(checkpoint)
    request = BuildRequest("build", 32, ckpt, corpus.describe(), shards=4)
    store = IndexStore(tmp_path / "idx")

    from idml.index.corpus import read_ids_and_images
    from idml.index.embed import BatchEmbedder

    with StagedBuild(store, request) as staged:
        sink = staged.sink()
        embedder = BatchEmbedder(checkpoint, threads=1)
        table = pa.concat_tables([read_ids_and_images(corpus, f) for f in corpus.files])
        sink.add(embedder(table.slice(0, 13)))  # partition 0 (10 images) finishes, partition 1 is half written
        first = sink.finished[0]
        # ... and the process dies here: no close(), no finish().
    assert store.current_version() is None
    assert list((staged.partitions_dir).glob("*.tmp"))

    with StagedBuild(store, request) as again:
        assert again.key == staged.key and [p.index for p in again.resumed] == [0]
        assert not list(again.partitions_dir.glob("*.tmp"))  # the half-written partition is dropped
        known = set(again.known().column("id").to_pylist())
        assert len(known) == first.rows + len(first.corrupt)
        sink = again.sink()
        embed_in_process(corpus, checkpoint, sink, again.known())
        assert sink.counts["known"] == len(known)
        m = again.finish(sink.listing(), embedded_this_run=sink.counts["embedded"])
    assert m["counts"]["vectors"] == 39 and m["counts"]["embedded"] == 39
    assert m["metrics"]["images_embedded"] == 39 - first.rows
    assert verify_index(store.root) == [] and not store.staging_dir.exists()


def test_a_version_renamed_but_not_published_is_published_by_the_rerun(tmp_path, checkpoint, monkeypatch):
    ds = make_index_dataset(tmp_path / "ds", 20)
    store_cls_publish = IndexStore.publish

    def crash(self, version):
        raise KeyboardInterrupt("killed between rename and publish")

    monkeypatch.setattr(IndexStore, "publish", crash)
    with pytest.raises(KeyboardInterrupt):
        build_in_process(tmp_path / "idx", ds, checkpoint)
    store = IndexStore(tmp_path / "idx")
    assert store.current_version() is None and store.versions() == ["v000001"]
    monkeypatch.setattr(IndexStore, "publish", store_cls_publish)
    m = build_in_process(tmp_path / "idx", ds, checkpoint)
    assert m["version"] == "v000001" and store.current_version() == "v000001" and store.versions() == ["v000001"]


def test_ivf_index_tunes_nprobe_and_updates_with_the_same_quantizer(tmp_path, checkpoint):
    ds = make_index_dataset(tmp_path / "ds", 40)
    store = IndexStore(tmp_path / "idx")
    m = build_in_process(store.root, ds, checkpoint, index_type="ivf", nlist=4, shards=2)
    assert m["faiss"]["factory"] == "IVF4,Flat" and 1 <= m["faiss"]["nprobe"] <= 4
    assert m["recall"]["recall"] >= 0.95 and "trained.faiss" in m["files"]
    make_index_dataset(tmp_path / "ds", 40, drop=(1,), extra=3)
    m2 = build_in_process(store.root, ds, checkpoint, kind="update")
    assert m2["faiss"]["nlist"] == 4 and m2["counts"]["vectors"] == 42
    assert m2["files"]["trained.faiss"] == m["files"]["trained.faiss"]
    assert verify_index(store.root) == []
    # By default a sharded IVF version is searched as one merged index, cached per version.
    searcher = IndexSearcher(store.root, nprobe=4)
    assert (store.cache_dir / m2["version"] / "merged.index").is_file()
    assert isinstance(faiss.downcast_index(searcher.index.index), faiss.IndexIVFFlat)
    for combine in ("shards", "ondisk"):
        searcher = IndexSearcher(store.root, combine=combine, nprobe=4)
        mu, u = searcher.lookup(["img-041"])
        assert searcher.search(mu, u, 1)[0].hits[0].id == "img-041"


def test_searcher_falls_back_to_shards_when_the_merge_cannot_be_written(tmp_path, checkpoint, monkeypatch, caplog):
    ds = make_index_dataset(tmp_path / "ds", 40)
    root = tmp_path / "idx"
    build_in_process(root, ds, checkpoint, index_type="ivf", nlist=4, shards=2)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(root / "cache"))

    monkeypatch.setattr(search_module, "merge_ondisk", read_only)
    with caplog.at_level(logging.WARNING, logger="idml.index.search"):
        searcher = IndexSearcher(root, nprobe=4)
    assert "one by one (slower): cannot merge them" in caplog.text
    mu, u = searcher.lookup(["img-007"])
    assert searcher.search(mu, u, 1)[0].hits[0].id == "img-007"
    with pytest.raises(PermissionError):  # asked for explicitly: no silent fallback
        IndexSearcher(root, combine="ondisk")


def test_a_merged_copy_of_other_shards_is_merged_again(tmp_path, checkpoint, caplog):
    ds = make_index_dataset(tmp_path / "ds", 40)
    root = tmp_path / "idx"
    build_in_process(root, ds, checkpoint, index_type="ivf", nlist=4, shards=2)
    IndexSearcher(root)
    store = IndexStore(root)
    merged = store.merged_dir(store.current_version())
    other = build_in_process(tmp_path / "other", make_index_dataset(tmp_path / "ds2", 20), checkpoint,
                             index_type="ivf", nlist=4, shards=2)
    IndexSearcher(tmp_path / "other")
    # Another version's merged folder, its checksums included, in this version's cache (a stale copy).
    shutil.rmtree(merged)
    shutil.copytree(IndexStore(tmp_path / "other").merged_dir(other["version"]), merged)
    with caplog.at_level(logging.WARNING, logger="idml.index.combined"):
        searcher = IndexSearcher(root)
    assert f"{merged} was made from other sources than these" in caplog.text and "again" in caplog.text
    assert len(searcher) == 40 and searcher.index.files  # merged again, not searched shard by shard


def test_raw_image_folder_update(tmp_path, checkpoint):
    folder = make_image_folder(tmp_path / "imgs", 10, corrupt=(5,))
    store = IndexStore(tmp_path / "idx")
    m = build_in_process(store.root, folder, checkpoint)
    assert m["counts"]["vectors"] == 9 and [c["id"] for c in m["corrupt"]] == ["group1/pic-05.png"]
    (tmp_path / "imgs" / "group0" / "pic-00.png").unlink()
    (tmp_path / "imgs" / "group0" / "pic-02.png").write_bytes(shape_image(555))
    (tmp_path / "imgs" / "group1" / "new.png").write_bytes(shape_image(556))
    m = build_in_process(store.root, folder, checkpoint, kind="update")
    c = m["counts"]
    assert (c["added"], c["changed"], c["removed"], c["vectors"]) == (1, 1, 1, 9)
    assert m["metrics"]["images_embedded"] == 2 and m["counts"]["corrupt"] == 1  # the corrupt file is not retried


def test_update_refuses_another_checkpoint(tmp_path, checkpoint):
    from support import make_checkpoint

    ds = make_index_dataset(tmp_path / "ds", 12)
    build_in_process(tmp_path / "idx", ds, checkpoint)
    other = make_checkpoint(tmp_path / "other.pt", embedding_dim=16)
    with pytest.raises(ValueError, match="run `idml index build` instead"):
        build_in_process(tmp_path / "idx", ds, other, kind="update")
    with pytest.raises(FileNotFoundError, match="empty does not exist; run `idml index build"):
        build_in_process(tmp_path / "empty", ds, checkpoint, kind="update")


def test_duplicate_ids_are_rejected(tmp_path, checkpoint):
    folder = tmp_path / "imgs"
    folder.mkdir()
    ds = make_index_dataset(tmp_path / "ds", 6)
    corpus = resolve_corpus(ds)
    ckpt = describe_checkpoint(checkpoint)
    with StagedBuild(IndexStore(tmp_path / "idx"), BuildRequest("build", 32, ckpt, corpus.describe())) as staged:
        sink = staged.sink()
        embed_in_process(corpus, checkpoint, sink)
        embed_in_process(corpus, checkpoint, sink)  # every image twice
        with pytest.raises(ValueError, match="duplicate image ids"):
            staged.finish(sink.listing())
