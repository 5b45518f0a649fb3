"""The one dataset opener: built-in names, local folders, pyarrow URIs and fsspec-only schemes."""

import json
from pathlib import Path

import pytest
from support import make_records

from idml.data import open_dataset, write_dataset
from idml.files import file_sha256
from idml.data.source import read_manifest


@pytest.fixture
def dataset(tmp_path):
    write_dataset(make_records(), tmp_path / "ds", name="tiny", shard_bytes=200)
    return tmp_path / "ds"


def test_local_folder_and_file_uri_are_the_same_dataset(dataset):
    local, uri = open_dataset(dataset), open_dataset(dataset.as_uri())
    assert local.is_local and local.manifest == uri.manifest == read_manifest(dataset)
    assert local.paths("train") == uri.paths("train") and len(local.paths("train")) > 1
    assert local.num_images("train") == 6 and local.label_to_target("test") == {2: 0, 3: 1}
    assert local.has_split("test") and not local.has_split("val")


def test_a_scheme_pyarrow_lacks_goes_through_fsspec(dataset):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    for path in dataset.rglob("*"):
        if path.is_file():
            memory.pipe(f"/ds/{path.relative_to(dataset).as_posix()}", path.read_bytes())
    source = open_dataset("memory://ds")
    assert not source.is_local and source.manifest == read_manifest(dataset)
    with source.filesystem.open_input_file(source.paths("train")[0]) as f:
        assert f.read(4) == b"PAR1"
    with pytest.raises(ValueError, match="not on the local disk"):
        source.check_local()


def test_missing_datasets_fail_clearly(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset((tmp_path / "nope").as_uri())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        open_dataset((tmp_path / "empty").as_uri())
    manifest = json.loads((dataset / "manifest.json").read_text())
    (dataset / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        open_dataset(dataset.as_uri())


def test_shard_checksums_use_the_one_sha256_helper(dataset):
    shard = read_manifest(dataset)["splits"]["train"]["shards"][0]
    assert file_sha256(Path(dataset) / shard["path"]) == shard["sha256"]


def test_check_shards_reads_only_metadata_wherever_the_dataset_is(dataset):
    from idml.errors import DamagedFileError

    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    for path in dataset.rglob("*"):
        if path.is_file():
            memory.pipe(f"/checked/{path.relative_to(dataset).as_posix()}", path.read_bytes())
    for uri in (str(dataset), dataset.as_uri(), "memory://checked"):
        open_dataset(uri).check_shards()
    shard = read_manifest(dataset)["splits"]["test"]["shards"][0]["path"]
    memory.rm(f"/checked/{shard}")
    with pytest.raises(DamagedFileError, match=f"dataset memory://checked is damaged: test: missing shard .*{shard}"):
        open_dataset("memory://checked").check_shards()
    open_dataset("memory://checked").check_shards(["train"])  # only the splits asked for
