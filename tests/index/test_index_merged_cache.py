"""The merged on-disk IVF cache (``cache/<version>/``) is a derived file of the integrity rule:
its checksums are recorded when it is merged and checked at every open; a damaged one is logged,
merged again from the version's (checked) shards, and never searched (issue 22: vectors
overwritten inside ``merged.ivfdata`` were served as answers, random bytes ended in a KeyError)."""

import logging
import os
import subprocess

import numpy as np
import pytest
from support import build_in_process, make_index_dataset, overwrite_merged_vectors

import idml.integrity as integrity
from idml.index import IndexSearcher, IndexStore, verify_index
from idml.index.query import QueryRequest, query_index

QUERY_IDS = ["img-004", "img-017", "img-031"]


@pytest.fixture(scope="module")
def merged_index(tmp_path_factory, checkpoint):
    """An IVF version of 2 shards, searched through its merged cache."""
    root = tmp_path_factory.mktemp("merged")
    build_in_process(root / "idx", make_index_dataset(root / "ds", 40), checkpoint, index_type="ivf", nlist=4,
                     shards=2)
    return root / "idx"


@pytest.fixture
def index_dir(merged_index, tmp_path):
    """A private copy, merged once; ``answers`` of the undamaged cache are its queries' hits."""
    subprocess.run(["cp", "-a", str(merged_index), str(tmp_path / "idx")], check=True)
    assert answers(tmp_path / "idx")  # merges the cache
    return tmp_path / "idx"


def answers(index_dir) -> list[list[tuple[str, float]]]:
    response = query_index(QueryRequest(index_dir, ids=QUERY_IDS, k=5))
    return [[(h.id, round(h.cosine, 5)) for h in r.hits] for r in response.results]


def merged_file(index_dir, name: str):
    store = IndexStore(index_dir)
    return store.merged_dir(store.current_version()) / name


def overwrite_vectors(index_dir) -> None:
    overwrite_merged_vectors(merged_file(index_dir, "merged.ivfdata").parent)


def damage(path, how: str) -> None:
    size = path.stat().st_size
    if how == "vectors":
        overwrite_vectors(path.parent.parent.parent)
    elif how == "random":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: size // 2])
    else:  # deleted
        path.unlink()


@pytest.mark.parametrize("name, how", [("merged.ivfdata", "vectors"), ("merged.ivfdata", "random"),
                                       ("merged.ivfdata", "truncated"), ("merged.ivfdata", "deleted"),
                                       ("merged.index", "random"), ("merged.index", "truncated")])
def test_a_damaged_merged_cache_is_merged_again_and_answers_the_same(index_dir, caplog, name, how):
    before = answers(index_dir)
    path = merged_file(index_dir, name)
    damage(path, how)
    with caplog.at_level(logging.WARNING, logger="idml.index.combined"):
        assert answers(index_dir) == before
    assert str(path) in caplog.text and "again" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="idml.index.combined"):
        assert answers(index_dir) == before  # the merged copy is sound again: no second merge
    assert not caplog.records


def test_a_write_after_the_open_shows_in_changed_files(index_dir):
    """What a long-lived searcher (the service) asks before answering: the same damage written
    after the open changes its answers, and its stat tells."""
    before = answers(index_dir)
    searcher = IndexSearcher(index_dir)
    assert set(searcher.index.files) == {merged_file(index_dir, "merged.index"), merged_file(index_dir, "merged.ivfdata")}
    mu, u = searcher.lookup(QUERY_IDS)
    assert searcher.changed_files() == []
    overwrite_vectors(index_dir)
    assert searcher.changed_files() == [str(merged_file(index_dir, "merged.ivfdata"))]
    assert [[(h.id, round(h.cosine, 5)) for h in r.hits] for r in searcher.search(mu, u, 5)] != before


def test_a_cache_without_checksums_is_merged_again(index_dir, caplog):
    before = answers(index_dir)
    record = merged_file(index_dir, integrity.SEAL_NAME)
    record.unlink()  # as an older idml merged it
    with caplog.at_level(logging.WARNING, logger="idml.index.combined"):
        assert answers(index_dir) == before
    assert f"{record} is missing or damaged" in caplog.text and record.is_file()


def test_a_sound_merged_cache_is_hashed_once_until_its_stat_changes(index_dir, monkeypatch, caplog):
    monkeypatch.setattr(integrity, "RACY_SECONDS", -1e9)  # remember files however recently written
    hashed = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path: hashed.append(os.path.basename(path)) or real(path))
    before = answers(index_dir)
    hashed.clear()
    assert answers(index_dir) == before and "merged.ivfdata" not in hashed  # the stamp vouches for it
    path = merged_file(index_dir, "merged.ivfdata")
    st = path.stat()
    overwrite_vectors(index_dir)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime put back: the ctime still tells
    with caplog.at_level(logging.WARNING, logger="idml.index.combined"):
        assert answers(index_dir) == before
    assert "merged.ivfdata" in hashed and f"checksum mismatch for {path}" in caplog.text


def test_verify_reports_a_damaged_merged_cache(index_dir, capsys):
    from pipelines.index_cli import main

    assert verify_index(index_dir) == []
    path = merged_file(index_dir, "merged.ivfdata")
    overwrite_vectors(index_dir)
    problems = verify_index(index_dir)
    assert len(problems) == 1 and f"checksum mismatch for {path}" in problems[0]
    assert "merged again from the version's shards at the next query" in problems[0]
    capsys.readouterr()
    assert main(["verify", "--index-dir", str(index_dir)]) == 1  # it said OK over this damage
    assert capsys.readouterr().out.splitlines() == ["verify v000001: FAILED", f"  {problems[0]}"]
    answers(index_dir)
    assert verify_index(index_dir) == []
