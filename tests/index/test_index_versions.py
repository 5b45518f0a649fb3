"""Version management in the library: listing, publishing an existing version (rollback),
pruning old versions without touching the published one or files kept versions share."""

import os
import threading
import time

import pytest
from support import build_in_process, make_index_dataset

from idml.errors import DamagedFileError
from idml.index import IndexSearcher, IndexStore, verify_index
from idml.index.store import IndexLockedError
from idml.index.versions import list_versions, prune_versions, publish_version


@pytest.fixture
def three_versions(tmp_path, checkpoint):
    """v000001 (3 shards); v000002 adds img-040..041; v000003 drops img-001 (rewrites its shard)."""
    ds = make_index_dataset(tmp_path / "ds", 40)
    store = IndexStore(tmp_path / "idx")
    build_in_process(store.root, ds, checkpoint, shards=3)
    make_index_dataset(tmp_path / "ds", 40, extra=2)
    build_in_process(store.root, ds, checkpoint, kind="update")
    make_index_dataset(tmp_path / "ds", 40, extra=2, drop=(1,))
    build_in_process(store.root, ds, checkpoint, kind="update")
    assert store.versions() == ["v000001", "v000002", "v000003"] and store.current_version() == "v000003"
    return store


def test_versions_lists_created_vectors_model_parent_and_current(three_versions, checkpoint):
    rows = list_versions(three_versions)
    assert [(r.version, r.kind, r.vectors, r.parent, r.current) for r in rows] == [
        ("v000001", "build", 40, None, False), ("v000002", "update", 42, "v000001", False),
        ("v000003", "update", 41, "v000002", True)]
    assert all(r.created_at and r.model == str(os.path.realpath(checkpoint)) and r.problem is None for r in rows)


def test_rollback_then_query_reads_the_published_old_version(three_versions):
    store = three_versions
    assert publish_version(store, "v000001") == "v000003"
    assert store.current_version() == "v000001"
    searcher = IndexSearcher(store.root)
    assert searcher.version == "v000001" and len(searcher) == 40
    mu, u = searcher.lookup(["img-001"])  # removed in v000003, there again in v000001
    assert searcher.search(mu, u, 1)[0].hits[0].id == "img-001"
    with pytest.raises(ValueError, match="not in index"):
        searcher.lookup(["img-040"])  # added by v000002
    # ... and forward again; publishing the published version changes nothing.
    assert publish_version(store, "v000003") == "v000001"
    assert publish_version(store, "v000003") == "v000003"
    assert verify_index(store.root) == []


def test_publish_refuses_a_damaged_or_unknown_version(three_versions):
    store = three_versions
    (store.version_dir("v000002") / "recall_sample.npz").write_bytes(b"damaged")
    with pytest.raises(DamagedFileError, match="cannot publish index version v000002: it is damaged.*v000003"):
        publish_version(store, "v000002")
    with pytest.raises(FileNotFoundError, match="v000009 does not exist"):
        publish_version(store, "v000009")
    with pytest.raises(ValueError, match="not a version name"):
        publish_version(store, "latest")
    assert store.current_version() == "v000003"


def test_publish_repairs_a_damaged_pointer(three_versions):
    store = three_versions
    store.current_path.write_text("{broken")
    assert publish_version(store, "v000002") is None
    assert store.current_version() == "v000002"


def test_prune_keeps_current_and_the_files_kept_versions_share(three_versions):
    store = three_versions
    shared = store.version_dir("v000003") / "shards" / "shard-000001.parquet"  # reused since v000001
    assert os.stat(shared).st_nlink == 3
    publish_version(store, "v000002")  # a rollback: CURRENT is not the newest
    dry = prune_versions(store, 1, dry_run=True)
    assert (dry.removed, dry.kept) == (["v000001"], ["v000002", "v000003"]) and store.versions() == ["v000001", "v000002", "v000003"]
    for leftover in ("v000001/merged.index", "v000001.tmp-123/merged.ivfdata", "v000002/merged.index"):
        (store.cache_dir / leftover).parent.mkdir(parents=True, exist_ok=True)
        (store.cache_dir / leftover).write_text("x")
    for name in ("v000001.lock", "v000001.checked.json"):
        (store.cache_dir / name).write_text("{}")
    result = prune_versions(store, 1)
    assert result.removed == ["v000001"] and store.versions() == ["v000002", "v000003"]
    # The pruned version's merged index, a killed merge's leftovers, its lock and stamps go with it.
    assert sorted(p.name for p in store.cache_dir.iterdir() if p.name.startswith("v000001")) == []
    assert (store.cache_dir / "v000002" / "merged.index").exists()
    assert store.current_version() == "v000002"
    assert os.stat(shared).st_nlink == 2  # only v000001's name went
    # v000002's merged index above is a stand-in without checksums: verify names it, the version itself is sound.
    assert verify_index(store.root) == [f"{store.cache_dir / 'v000002' / 'checksums.json'} is missing or damaged: the "
                                        f"checksums of {store.cache_dir / 'v000002'} are unknown (a derived file: "
                                        "merged again from the version's shards at the next query)"]
    assert verify_index(store.root, "v000003") == []
    assert not (store.root / "trash").exists()
    # The published version survives any --keep.
    publish_version(store, "v000002")
    assert prune_versions(store, 1).removed == [] and store.versions() == ["v000002", "v000003"]
    with pytest.raises(ValueError, match="--keep must be >= 1"):
        prune_versions(store, 0)


def test_prune_frees_only_what_no_kept_version_links(three_versions):
    store = three_versions
    own = {p: p.stat() for p in store.version_dir("v000001").rglob("*") if p.is_file() and p.stat().st_nlink == 1}
    result = prune_versions(store, 2)
    assert result.removed == ["v000001"] and result.freed_bytes == sum(st.st_size for st in own.values())


def test_prune_and_publish_wait_for_the_writer(three_versions):
    store = three_versions
    with store.lock(holder="idml index update"):
        with pytest.raises(IndexLockedError, match=r"another writer holds .*idml index update \(pid"):
            prune_versions(store, 1)
        with pytest.raises(IndexLockedError, match="--wait"):
            publish_version(store, "v000001")
    assert store.versions() == ["v000001", "v000002", "v000003"]

    release = threading.Event()

    def hold():
        with store.lock():
            release.set()
            time.sleep(1.0)

    holder = threading.Thread(target=hold)
    holder.start()
    release.wait()
    start = time.monotonic()
    assert publish_version(store, "v000001", wait_s=30) == "v000003"  # waited for the holder, then published
    holder.join()
    assert time.monotonic() - start >= 0.5 and store.current_version() == "v000001"


# -- the command line (no Ray: these commands never start it) --------------------------------------------
def test_versions_publish_prune_commands(three_versions, capsys):
    from pipelines.index_cli import main

    idx = str(three_versions.root)
    assert main(["versions", "--index-dir", idx]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["VERSION", "CREATED", "KIND", "VECTORS", "PARENT", "MODEL"]
    assert table[3].startswith("* v000003") and table[3].endswith("CURRENT") and " 41 " in table[3]
    assert table[1].startswith("  v000001") and " build " in table[1]

    assert main(["publish", "v000001", "--index-dir", idx]) == 0
    assert "published v000001 (40 vectors); CURRENT was v000003" in capsys.readouterr().out
    assert main(["query", "--index-dir", idx, "--ids", "img-001", "--k", "2"]) == 0
    assert "index v000001: 40 vectors" in capsys.readouterr().out

    assert main(["prune", "--index-dir", idx, "--keep", "1", "--dry-run"]) == 0
    assert "would delete 1 version(s): v000002" in capsys.readouterr().out
    assert main(["prune", "--index-dir", idx, "--keep", "1"]) == 0
    out = capsys.readouterr().out
    assert "deleted 1 version(s): v000002" in out and "kept: v000001, v000003" in out
    assert main(["verify", "--index-dir", idx]) == 0 and main(["verify", "--index-dir", idx, "--version", "v000003"]) == 0

    import json

    capsys.readouterr()
    assert main(["versions", "--index-dir", idx, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["current"]) for r in rows] == [("v000001", True), ("v000003", False)]


def test_commands_refuse_a_damaged_version_and_a_held_lock(three_versions, capsys):
    from pipelines.index_cli import INDEX_BUSY, main

    idx = str(three_versions.root)
    (three_versions.version_dir("v000002") / "recall_sample.npz").write_bytes(b"x")
    assert main(["versions", "--index-dir", idx]) == 0
    assert "DAMAGED: " in capsys.readouterr().out
    assert main(["publish", "v000002", "--index-dir", idx]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot publish index version v000002: it is damaged" in err[0]
    with three_versions.lock(holder="idml index update"):
        assert main(["prune", "--index-dir", idx, "--keep", "1"]) == INDEX_BUSY
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another writer holds" in err[0] and "idml index update (pid" in err[0]
    assert three_versions.versions() == ["v000001", "v000002", "v000003"]


def test_an_update_after_a_rollback_builds_on_the_published_version(three_versions, checkpoint):
    store = three_versions
    publish_version(store, "v000001")
    ds = str(store.root.parent / "ds")
    make_index_dataset(store.root.parent / "ds", 40, extra=5)
    m = build_in_process(store.root, ds, checkpoint, kind="update")
    assert (m["version"], m["parent"], m["counts"]["added"], m["counts"]["vectors"]) == ("v000004", "v000001", 5, 45)
    assert verify_index(store.root) == []



def test_a_build_remembers_its_files_so_opening_and_updating_hash_none_again(tmp_path, checkpoint, monkeypatch):
    """A query's first open and the next update stat the files a build hashed itself (or linked
    unchanged from a checked parent) instead of hashing the whole version again."""
    import sys

    import idml.index.store as store_module

    checked: list[str] = []  # files hashed by a check (not by a build's own checksums)
    real_sha256 = store_module.file_sha256

    def counting_sha256(path):
        if sys._getframe(1).f_code.co_name == "file_problems":
            checked.append(os.path.relpath(path, store.version_dir(store.current_version())))
        return real_sha256(path)

    monkeypatch.setattr(store_module, "file_sha256", counting_sha256)
    ds = make_index_dataset(tmp_path / "ds", 40)
    store = IndexStore(tmp_path / "idx")
    monkeypatch.setattr(store_module, "RACY_SECONDS", 0.0)  # every file was written before the build hashed it
    build_in_process(store.root, ds, checkpoint, shards=3)
    IndexSearcher(store.root)
    assert checked == []

    # The update checks its parent (remembered: nothing hashed) and links its unchanged shards; only
    # those are remembered now: the files it wrote were hashed moments ago (racy).
    monkeypatch.setattr(store_module, "RACY_SECONDS", 1e9)
    make_index_dataset(tmp_path / "ds", 40, extra=2)
    manifest = build_in_process(store.root, ds, checkpoint, kind="update")
    assert checked == []
    reused = {f for e in manifest["shards"] if e["source"] == "reused" for f in (e["embeddings"], e["index"])}
    assert len(reused) == 6  # the three shards are unchanged; the new images make a fourth
    IndexSearcher(store.root)
    assert checked and not set(checked) & reused  # the new shard and the small files only
