"""Cheap change detection for updates: files are compared by size and mtime (and a dataset
shard's checksum) with the parent version's record; only files that differ are read, and a
file whose bytes did not change is hashed again but not embedded again."""

import os
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
from support import build_in_process, make_image_folder, make_index_dataset, shape_image

from idml.index import IndexStore, verify_index
from idml.index.reads import CORPUS_RECORD
from idml.files import write_json_atomic
from idml.index.store import MANIFEST_NAME


def _age(folder: Path, seconds: float = 3600) -> None:
    """Files as if written an hour ago: a file modified just now is 'racy' and read again anyway."""
    past = time.time() - seconds
    for path in Path(folder).rglob("*"):
        if path.is_file():
            os.utime(path, (past, past))


def test_an_update_reads_only_the_changed_file(tmp_path, checkpoint, planned_build):
    folder = Path(make_image_folder(tmp_path / "imgs", 10, corrupt=(5,)))
    _age(folder)
    idx = tmp_path / "idx"
    v1, plan, counts, _ = planned_build(idx, str(folder), checkpoint)
    assert len(plan.files) == 10 and plan.unchanged == 0 and counts["embedded"] == 9
    assert v1["counts"]["files_read"] == 10 and CORPUS_RECORD in v1["files"]

    (folder / "group0" / "pic-02.png").write_bytes(shape_image(555))
    v2, plan, counts, published = planned_build(idx, str(folder), checkpoint, kind="update")
    assert plan.files == [str(folder / "group0" / "pic-02.png")] and plan.unchanged == 9
    assert counts == {"embedded": 1, "corrupt": 0, "known": 0}
    assert published and v2["counts"]["changed"] == 1 and v2["counts"]["vectors"] == 9
    assert (v2["counts"]["files_read"], v2["counts"]["files_unchanged"]) == (1, 9)
    assert [c["id"] for c in v2["corrupt"]] == ["group1/pic-05.png"]  # the skipped corrupt file stays known as corrupt
    assert verify_index(idx) == []
    record = pq.read_table(IndexStore(idx).version_dir("v000002") / CORPUS_RECORD).to_pylist()
    assert sorted(r["id"] for r in record) == sorted(r["file"] for r in record) and len(record) == 10


def test_a_file_rewritten_with_the_same_bytes_is_hashed_not_embedded(tmp_path, checkpoint, planned_build):
    folder = Path(make_image_folder(tmp_path / "imgs", 6))
    _age(folder)
    idx = tmp_path / "idx"
    planned_build(idx, str(folder), checkpoint)
    same = folder / "group1" / "pic-03.png"
    same.write_bytes(same.read_bytes())  # new mtime, same content
    manifest, plan, counts, published = planned_build(idx, str(folder), checkpoint, kind="update")
    assert plan.files == [str(same)]
    assert counts == {"embedded": 0, "corrupt": 0, "known": 1}
    assert not published and manifest["version"] == "v000001" and IndexStore(idx).versions() == ["v000001"]


def test_new_and_removed_files_without_reading_the_rest(tmp_path, checkpoint, planned_build):
    folder = Path(make_image_folder(tmp_path / "imgs", 8))
    _age(folder)
    idx = tmp_path / "idx"
    planned_build(idx, str(folder), checkpoint)
    (folder / "group0" / "pic-00.png").unlink()
    (folder / "group1" / "new.png").write_bytes(shape_image(700))
    manifest, plan, counts, _ = planned_build(idx, str(folder), checkpoint, kind="update")
    assert plan.files == [str(folder / "group1" / "new.png")] and plan.unchanged == 7
    c = manifest["counts"]
    assert (c["added"], c["removed"], c["changed"], c["vectors"]) == (1, 1, 0, 8)
    assert verify_index(idx) == []


def test_a_file_listed_right_after_a_change_is_read_again(tmp_path, checkpoint, planned_build):
    folder = Path(make_image_folder(tmp_path / "imgs", 4))  # written just now: mtimes not trusted yet
    idx = tmp_path / "idx"
    v1, _, _, _ = planned_build(idx, str(folder), checkpoint)
    record = pq.read_table(IndexStore(idx).version_dir("v000001") / CORPUS_RECORD)
    assert set(record.column("mtime_ns").to_pylist()) == {-1}
    _, plan, counts, published = planned_build(idx, str(folder), checkpoint, kind="update")
    assert len(plan.files) == 4 and counts["known"] == 4 and counts["embedded"] == 0 and not published


def test_a_dataset_update_skips_shards_whose_stats_and_checksum_match(tmp_path, checkpoint, planned_build):
    ds = tmp_path / "ds"
    make_index_dataset(ds, 40)
    _age(ds)
    idx = tmp_path / "idx"
    planned_build(idx, str(ds), checkpoint, shards=2)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in ds.rglob("*.parquet")}
    make_index_dataset(ds, 40, changed={5: 999})  # rewrites every shard, one with other bytes
    for path, (data, mtime) in before.items():  # as rsync would: untouched files keep their mtime
        if path.exists() and path.read_bytes() == data:
            os.utime(path, ns=(mtime, mtime))
    changed = [str(p) for p in sorted(ds.rglob("*.parquet")) if p not in before or p.read_bytes() != before[p][0]]
    manifest, plan, counts, published = planned_build(idx, str(ds), checkpoint, kind="update")
    assert sorted(plan.files) == changed and 0 < len(changed) < len(before)
    assert counts["embedded"] == 1 and published and manifest["counts"]["changed"] == 1
    assert verify_index(idx) == []


def _drop_record(store: IndexStore, manifest: dict) -> None:
    version_dir = store.version_dir(manifest["version"])
    (version_dir / CORPUS_RECORD).unlink()
    del manifest["files"][CORPUS_RECORD]
    write_json_atomic(version_dir / MANIFEST_NAME, manifest)


def test_a_version_without_a_record_or_another_corpus_reads_every_file(tmp_path, checkpoint, planned_build):
    folder = Path(make_image_folder(tmp_path / "imgs", 4))
    _age(folder)
    idx = tmp_path / "idx"
    v1 = build_in_process(idx, str(folder), checkpoint)
    _drop_record(IndexStore(idx), v1)  # as a version built before records were kept
    _, plan, counts, _ = planned_build(idx, str(folder), checkpoint, kind="update")
    assert len(plan.files) == 4 and "records no file sizes" in plan.note and counts["embedded"] == 0

    copy = shutil.copytree(folder, tmp_path / "copy")  # same names, sizes and mtimes, another folder
    _, plan, counts, _ = planned_build(idx, str(copy), checkpoint, kind="update")
    assert len(plan.files) == 4 and "another corpus" in plan.note
