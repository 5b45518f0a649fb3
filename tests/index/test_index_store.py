import json

import pytest

from idml.files import write_json_atomic
from idml.index.store import IndexLockedError, IndexStore


def _fake_version(store: IndexStore, version: str, key: str = "k") -> None:
    vdir = store.version_dir(version)
    vdir.mkdir(parents=True)
    write_json_atomic(vdir / "manifest.json", {"format": "idml-index", "format_version": 1, "version": version, "build_key": key})


def test_nothing_published_names_the_command_to_run(tmp_path):
    store = IndexStore(tmp_path / "idx")
    assert store.current_version() is None and store.versions() == [] and store.next_version_id() == "v000001"
    with pytest.raises(FileNotFoundError, match="idml index build"):
        store.read_manifest()


def test_publish_replaces_the_pointer_and_only_names_finished_versions(tmp_path):
    store = IndexStore(tmp_path / "idx")
    store.root.mkdir()
    with pytest.raises(FileNotFoundError):
        store.publish("v000001")  # no manifest: never published
    _fake_version(store, "v000001", key="a")
    _fake_version(store, "v000002", key="b")
    store.publish("v000001")
    assert store.current_version() == "v000001" and store.next_version_id() == "v000003"
    store.publish("v000002")
    assert json.loads(store.current_path.read_text()) == {"version": "v000002"}
    assert store.find_version_by_key("a") == "v000001" and store.find_version_by_key("zzz") is None
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".CURRENT")] == []  # no temp files left
    with pytest.raises(ValueError, match="version name"):
        store.version_dir("../etc")


def test_one_writer_at_a_time(tmp_path):
    store = IndexStore(tmp_path / "idx")
    with store.lock():
        with pytest.raises(IndexLockedError, match="another"):
            with IndexStore(tmp_path / "idx").lock():
                pass
    with store.lock():  # released when the holder is done
        pass


def test_damaged_pointer_is_reported(tmp_path):
    store = IndexStore(tmp_path / "idx")
    store.root.mkdir()
    store.current_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        store.current_version()
