"""Bad input and damaged state on the `idml index` side (issue 11): each case ends in one clear
line and exit code 2, or in a counted skip, and leaves every valid version as it was."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from support import build_in_process, edit_manifest, make_checkpoint, make_image_folder, make_index_dataset, shape_image

from idml.index import BuildRequest, IndexStore, StagedBuild, resolve_corpus
from idml.index.embed import describe_checkpoint
from idml.index.store import RACY_SECONDS
from pipelines.index_cli import UP_TO_DATE, main

BAD_INPUT = 2


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a command writes by default stays in the test's folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, checkpoint):
    """v000001 (3 shards) and v000002 (an update: the same 3 shards hard-linked, plus shard 3)."""
    root = tmp_path_factory.mktemp("two-versions")
    ds = make_index_dataset(root / "ds", 40)
    build_in_process(root / "idx", ds, checkpoint, shards=3)
    make_index_dataset(root / "ds", 40, extra=3)
    assert build_in_process(root / "idx", ds, checkpoint, kind="update")["version"] == "v000002"
    return root


@pytest.fixture
def index_copy(two_versions, tmp_path):
    """A private copy of ``two_versions``; ``cp -a`` keeps the hard links between its versions."""
    subprocess.run(["cp", "-a", str(two_versions), str(tmp_path / "copy")], check=True)
    return tmp_path / "copy" / "idx", str(tmp_path / "copy" / "ds")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "flipped":  # same size; the mtime is put back, as a careless restore would
        before = path.stat()
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:
        path.unlink()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("idml index: error: ")
    return err[0]


def _wait_until_not_racy(folder: Path) -> None:
    """Files younger than RACY_SECONDS are hashed at every open; older ones are remembered."""
    newest = max(p.stat().st_ctime for p in folder.rglob("*") if p.is_file())
    time.sleep(max(0.0, newest + RACY_SECONDS + 0.1 - time.time()))


# -- item 1: a damaged shard is refused by query and update, and never reaches a new version ------------
@pytest.mark.parametrize("how", ["truncated", "flipped", "missing"])
def test_query_refuses_a_damaged_shard_and_names_the_last_sound_version(index_copy, capsys, how):
    idx, _ = index_copy
    store = IndexStore(idx)
    if how == "flipped":
        # A sound open first, so the files are remembered by their stat: the damage must still be seen.
        _wait_until_not_racy(idx / "versions")
        assert main(["query", "--index-dir", str(idx), "--ids", "img-000", "--k", "2"]) == 0
        assert "shards/shard-000003.faiss" in json.loads((store.cache_dir / "v000002.checked.json").read_text())
        capsys.readouterr()
    damaged = store.version_dir("v000002") / "shards" / "shard-000003.faiss"  # only v000002 holds it
    _damage(damaged, how)

    assert main(["query", "--index-dir", str(idx), "--ids", "img-000", "--k", "2"]) == BAD_INPUT
    line = _error_line(capsys)
    assert "index version v000002 is damaged" in line and str(damaged) in line
    assert {"truncated": "the manifest says", "flipped": "checksum mismatch", "missing": "missing file"}[how] in line
    assert "the newest sound version is v000001" in line and "--version v000001" in line
    assert capsys.readouterr().out == ""  # no similarities computed from the damaged shard

    # Nothing valid is lost: v000001 still answers, and the pointer was not touched.
    assert main(["query", "--index-dir", str(idx), "--version", "v000001", "--ids", "img-000", "--k", "2"]) == 0
    assert "img-000" in capsys.readouterr().out and store.current_version() == "v000002"


def test_a_shard_shared_by_every_version_leaves_no_sound_version(index_copy, capsys):
    idx, _ = index_copy
    store = IndexStore(idx)
    shared = store.version_dir("v000002") / "shards" / "shard-000000.parquet"
    assert shared.stat().st_nlink == 2  # the same file in v000001
    _damage(shared, "flipped")
    assert main(["query", "--index-dir", str(idx), "--ids", "img-000"]) == BAD_INPUT
    line = _error_line(capsys)
    assert str(shared) in line and "no other version is sound" in line and "idml index build" in line


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing"])
def test_update_refuses_a_damaged_parent_and_publishes_nothing(index_copy, checkpoint, capsys, how):
    idx, ds = index_copy
    store = IndexStore(idx)
    damaged = store.version_dir("v000002") / "shards" / "shard-000001.faiss"  # shared with v000001
    sound = store.version_dir("v000002") / "shards" / "shard-000002.faiss"
    _damage(damaged, how)
    make_index_dataset(Path(ds), 40, extra=5)  # two new images to index

    assert main(["update", "--index-dir", str(idx), "--corpus", ds, "--no-mlflow"]) == BAD_INPUT
    line = _error_line(capsys)
    assert "cannot update index version v000002: it is damaged" in line and str(damaged) in line
    assert "carry the damage into the next version" in line and "idml index build" in line
    # A damaged file is v000001's too (one file, two links); a deleted link leaves v000001's.
    assert ("the newest sound version is v000001" if how == "missing" else "no other version is sound") in line
    # Nothing published, nothing staged, no further hard link to the sound files.
    assert store.versions() == ["v000001", "v000002"] and store.current_version() == "v000002"
    assert not store.staging_dir.exists() and sound.stat().st_nlink == 2
    assert main(["query", "--index-dir", str(idx), "--version", "v000001", "--ids", "img-000"]) == (
        0 if how == "missing" else BAD_INPUT)


def test_update_refuses_a_damaged_shard_only_the_parent_holds(index_copy, capsys):
    idx, ds = index_copy
    store = IndexStore(idx)
    damaged = store.version_dir("v000002") / "shards" / "shard-000003.parquet"
    _damage(damaged, "truncated")
    make_index_dataset(Path(ds), 40, extra=5)
    assert main(["update", "--index-dir", str(idx), "--corpus", ds, "--no-mlflow"]) == BAD_INPUT
    line = _error_line(capsys)
    assert str(damaged) in line and "the newest sound version is v000001" in line
    assert store.versions() == ["v000001", "v000002"] and store.current_version() == "v000002"


# -- item 2: the summary counts what a rerun reused ---------------------------------------------------------
def test_an_update_of_an_unchanged_corpus_says_what_it_reused(ray_local, tmp_path, checkpoint, capsys):
    ds = make_index_dataset(tmp_path / "ds", 20, corrupt=(3,))
    idx = tmp_path / "idx"
    assert main(["build", "--index-dir", str(idx), "--checkpoint", checkpoint, "--corpus", ds, "--threads", "1",
                 "--no-mlflow"]) == 0
    capsys.readouterr()
    assert main(["update", "--index-dir", str(idx), "--threads", "1", "--no-mlflow"]) == UP_TO_DATE
    out = capsys.readouterr().out
    assert "index v000001 unchanged (up to date)" in out
    assert "nothing changed in the corpus: reused all 19 vectors; corrupt 1 (exit 3: nothing published)" in out
    assert IndexStore(idx).versions() == ["v000001"]


def test_a_resumed_build_counts_the_images_it_reused(ray_local, tmp_path, checkpoint, capsys):
    from idml.index.corpus import read_ids_and_images
    from idml.index.embed import BatchEmbedder
    import pyarrow as pa

    ds = make_index_dataset(tmp_path / "ds", 40)
    idx = tmp_path / "idx"
    # An interrupted `idml index build --shards 4`: the same request the command makes, one partition done.
    corpus = resolve_corpus(ds)
    request = BuildRequest("build", 32, describe_checkpoint(checkpoint), corpus.describe(), shards=4)
    with StagedBuild(IndexStore(idx), request) as staged:
        sink = staged.sink()
        table = pa.concat_tables([read_ids_and_images(corpus, f) for f in corpus.files])
        sink.add(BatchEmbedder(checkpoint, threads=1)(table.slice(0, 10)))
    assert [p.rows for p in sink.finished] == [10]

    assert main(["build", "--index-dir", str(idx), "--checkpoint", checkpoint, "--corpus", ds, "--shards", "4",
                 "--threads", "1", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "resuming an interrupted build: 1 finished partition(s), 10 images" in out
    assert "images embedded 30 (this run); reused 10 (10 from the interrupted run)" in out
    counts = IndexStore(idx).read_manifest()["counts"]
    assert (counts["vectors"], counts["resumed"], counts["reused"]) == (40, 10, 0)


# -- item 3: images linked from outside the corpus folder ---------------------------------------------------
def _corpus_with_outside_links(tmp_path: Path) -> Path:
    folder = Path(make_image_folder(tmp_path / "imgs", 12))
    outside = tmp_path / "elsewhere"
    (outside / "more").mkdir(parents=True)
    (outside / "secret.png").write_bytes(shape_image(500))
    (outside / "more" / "other.png").write_bytes(shape_image(501))
    (folder / "group0" / "linked.png").symlink_to(outside / "secret.png")  # a linked file
    (folder / "linked-folder").symlink_to(outside / "more")  # a linked folder
    (folder / "group1" / "alias.png").symlink_to(folder / "group0" / "pic-00.png")  # inside: kept
    return folder


def test_images_linked_from_outside_the_corpus_are_skipped_and_counted(ray_local, tmp_path, checkpoint, capsys):
    folder = _corpus_with_outside_links(tmp_path)
    idx = tmp_path / "idx"
    assert main(["build", "--index-dir", str(idx), "--checkpoint", checkpoint, "--corpus", str(folder),
                 "--threads", "1", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 image file(s) outside the corpus folder" in out and "--follow-links" in out
    assert "group0/linked.png" in out and "linked-folder/other.png" in out
    manifest = IndexStore(idx).read_manifest()
    assert manifest["counts"]["vectors"] == 13 and manifest["corpus"]["outside"] == 2  # 12 + the inside alias
    assert manifest["corpus"]["follow_links"] is False

    followed = tmp_path / "idx-followed"
    assert main(["build", "--index-dir", str(followed), "--checkpoint", checkpoint, "--corpus", str(folder),
                 "--follow-links", "--threads", "1", "--no-mlflow"]) == 0
    assert "skipped" not in capsys.readouterr().out
    manifest = IndexStore(followed).read_manifest()
    assert manifest["counts"]["vectors"] == 15 and manifest["corpus"]["follow_links"] is True


def test_a_corpus_whose_images_all_lie_outside_is_refused(tmp_path, checkpoint, capsys):
    folder = tmp_path / "links-only"
    folder.mkdir()
    (tmp_path / "real.png").write_bytes(shape_image(1))
    (folder / "a.png").symlink_to(tmp_path / "real.png")
    assert main(["build", "--index-dir", str(tmp_path / "idx"), "--checkpoint", checkpoint, "--corpus", str(folder),
                 "--no-mlflow"]) == BAD_INPUT
    line = _error_line(capsys)
    assert "holds no images" in line and "1 lie outside the corpus folder" in line and "--follow-links" in line


# -- item 4: a damaged checkpoint ---------------------------------------------------------------------------
@pytest.mark.parametrize("content", [os.urandom(4096), b""], ids=["random-bytes", "empty"])
def test_build_refuses_a_damaged_checkpoint(tmp_path, capsys, content):
    bad = tmp_path / "best.pt"
    bad.write_bytes(content)
    ds = make_index_dataset(tmp_path / "ds", 6)
    idx = tmp_path / "idx"
    assert main(["build", "--index-dir", str(idx), "--checkpoint", str(bad), "--corpus", ds, "--no-mlflow"]) == BAD_INPUT
    line = _error_line(capsys)
    assert str(bad) in line
    assert not idx.exists()  # refused before anything was written


# -- other first-day mistakes -------------------------------------------------------------------------------
def test_query_of_a_folder_that_is_not_an_index(tmp_path, capsys):
    assert main(["query", "--index-dir", str(tmp_path / "nowhere"), "--ids", "x"]) == BAD_INPUT
    line = _error_line(capsys)
    assert "index folder" in line and "does not exist" in line and "idml index build" in line


@pytest.mark.parametrize("flag,value", [("--k", "0"), ("--k", "-3"), ("--rerank-k", "0"), ("--k", "ten")])
def test_query_counts_must_be_positive(index_copy, capsys, flag, value):
    idx, _ = index_copy
    with pytest.raises(SystemExit) as exit_:
        main(["query", "--index-dir", str(idx), "--ids", "img-000", "--rerank", flag, value])
    assert exit_.value.code == BAD_INPUT
    assert f"argument {flag}: " in capsys.readouterr().err


@pytest.mark.parametrize("what", ["not-an-image", "missing", "folder"])
def test_query_image_that_cannot_be_used(index_copy, tmp_path, capsys, what):
    idx, _ = index_copy
    image = {"not-an-image": tmp_path / "notes.png", "missing": tmp_path / "nope.png", "folder": tmp_path}[what]
    if what == "not-an-image":
        image.write_text("just text")
    assert main(["query", "--index-dir", str(idx), "--images", str(image)]) == BAD_INPUT
    line = _error_line(capsys)
    assert f"query image {image}" in line
    assert {"not-an-image": "is not a usable image", "missing": "does not exist", "folder": "is a folder"}[what] in line


def test_build_of_a_folder_without_images(tmp_path, checkpoint, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("no pictures here")
    assert main(["build", "--index-dir", str(tmp_path / "idx"), "--checkpoint", checkpoint, "--corpus", str(folder),
                 "--no-mlflow"]) == BAD_INPUT
    assert "holds no images" in _error_line(capsys)


def test_build_refuses_a_damaged_dataset_corpus(tmp_path, checkpoint, capsys):
    ds = Path(make_index_dataset(tmp_path / "ds", 12))
    split = next(iter(json.loads((ds / "manifest.json").read_text())["splits"]))
    # The manifest no longer matches its shards.
    edit_manifest(ds, lambda m: m["splits"][split].update(num_images=m["splits"][split]["num_images"] + 5))
    idx = tmp_path / "idx"
    assert main(["build", "--index-dir", str(idx), "--checkpoint", checkpoint, "--corpus", str(ds), "--no-mlflow"]) == BAD_INPUT
    assert split in _error_line(capsys)
    assert not idx.exists()  # refused before anything was embedded or written


# -- issue 12: version commands, pool sizes, GPU search without a GPU ---------------------------------------
@pytest.mark.parametrize("actors", ["8-1", "many", "0-3"])
def test_build_refuses_an_actor_range_that_is_not_one(tmp_path, checkpoint, capsys, actors):
    ds = make_index_dataset(tmp_path / "ds", 6)
    assert main(["build", "--index-dir", str(tmp_path / "idx"), "--checkpoint", checkpoint, "--corpus", ds,
                 "--actors", actors, "--no-mlflow"]) == BAD_INPUT
    assert f"--actors {actors!r}" in _error_line(capsys)
    assert not (tmp_path / "idx").exists()


def test_publish_of_a_version_that_is_not_there(index_copy, capsys):
    idx, _ = index_copy
    assert main(["publish", "v000007", "--index-dir", str(idx)]) == BAD_INPUT
    assert "index version v000007 does not exist" in _error_line(capsys)
    assert main(["publish", "latest", "--index-dir", str(idx)]) == BAD_INPUT
    assert "'latest' is not a version name" in _error_line(capsys)
    assert IndexStore(idx).current_version() == "v000002"


def test_prune_must_keep_at_least_one(index_copy, capsys):
    idx, _ = index_copy
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--index-dir", str(idx), "--keep", "0"])
    assert exit_.value.code == BAD_INPUT and "argument --keep: must be >= 1" in capsys.readouterr().err


def test_query_on_gpu_without_faiss_gpu(index_copy, capsys):
    from idml.index.gpu import gpu_count

    if gpu_count():
        pytest.skip("faiss sees a GPU here")
    idx, _ = index_copy
    assert main(["query", "--index-dir", str(idx), "--ids", "img-000", "--gpu"]) == BAD_INPUT
    assert "faiss sees no GPU" in _error_line(capsys)
