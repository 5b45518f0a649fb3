import json

import pyarrow.parquet as pq
import pytest

from idml.data import (
    DATASET_SCHEMA,
    ConversionReport,
    ImageRecord,
    contiguous_targets,
    read_manifest,
    read_split,
    split_files,
    verify_dataset,
    write_dataset,
)

from support import edit_manifest, make_records, noise_png


def test_round_trip(tmp_path):
    records = make_records(n_classes=4, per_class=3, domains=("a", "b"))
    manifest = write_dataset(records, tmp_path / "ds", name="tiny", source={"converter": "test"})
    assert manifest == read_manifest(tmp_path / "ds")
    assert manifest["format_version"] == 1
    assert manifest["name"] == "tiny" and manifest["source"] == {"converter": "test"}

    table = read_split(tmp_path / "ds", "train")
    assert table.schema.names == ["id", "image", "label", "class_name", "domain", "split"]
    assert table.schema.equals(DATASET_SCHEMA)
    expected = [r for r in records if r.split == "train"]
    assert table.column("id").to_pylist() == [r.id for r in expected]
    assert table.column("image").to_pylist() == [r.image for r in expected]
    assert table.column("label").to_pylist() == [r.label for r in expected]
    assert set(table.column("split").to_pylist()) == {"train"}

    subset = read_split(tmp_path / "ds", "test", columns=["id", "label"])
    assert subset.column_names == ["id", "label"] and subset.num_rows == 12
    with pytest.raises(ValueError, match="unknown column"):
        read_split(tmp_path / "ds", "test", columns=["bbox"])


def test_manifest_counts_and_checksums(tmp_path):
    records = make_records(n_classes=4, per_class=3, domains=("a", "b"))
    records[0].id = "a/c0/first.png"
    manifest = write_dataset(records, tmp_path / "ds", name="tiny")
    assert set(manifest["splits"]) == {"train", "test"}
    train = manifest["splits"]["train"]
    assert train["num_images"] == 12 and train["num_classes"] == 2
    assert train["labels"] == [0, 1]
    assert train["images_per_class"] == {"class0": 6, "class1": 6}
    assert train["images_per_domain"] == {"a": 6, "b": 6}
    assert manifest["splits"]["test"]["labels"] == [2, 3]
    assert manifest["classes"] == [
        {"label": 0, "class_name": "class0", "split": "train"},
        {"label": 1, "class_name": "class1", "split": "train"},
        {"label": 2, "class_name": "class2", "split": "test"},
        {"label": 3, "class_name": "class3", "split": "test"},
    ]
    assert manifest["conversion_report"]["written"] == {"test": 12, "train": 12}
    for shard in train["shards"]:
        assert shard["path"].startswith("train/part-")
        path = tmp_path / "ds" / shard["path"]
        assert path.stat().st_size == shard["bytes"]
        assert len(shard["sha256"]) == 64
        assert pq.ParquetFile(path).metadata.num_rows == shard["num_rows"]
    assert verify_dataset(tmp_path / "ds") == []
    # The manifest on disk is plain JSON.
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["splits"]["train"]["num_images"] == 12


def test_shard_rollover_and_row_groups(tmp_path):
    records = [
        ImageRecord(f"img{i}", noise_png(i, size=(24, 24)), i % 3, f"c{i % 3}", "default", "train")
        for i in range(30)
    ]
    size = len(records[0].image)
    manifest = write_dataset(records, tmp_path / "ds", name="roll", shard_bytes=5 * size)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) >= 5
    assert sum(s["num_rows"] for s in shards) == 30
    assert [s["path"] for s in shards] == [f"train/part-{i:05d}.parquet" for i in range(len(shards))]
    files = split_files(tmp_path / "ds", "train")
    assert all(f.startswith(str((tmp_path / "ds").resolve())) for f in files)
    assert read_split(tmp_path / "ds", "train").column("id").to_pylist() == [f"img{i}" for i in range(30)]
    assert verify_dataset(tmp_path / "ds") == []


def test_row_groups_are_small(tmp_path):
    records = [ImageRecord(f"i{i}", b"\x89PNG-ish", 0, "c", "default", "train") for i in range(1200)]
    write_dataset(records, tmp_path / "ds", name="rg")
    meta = pq.ParquetFile(split_files(tmp_path / "ds", "train")[0]).metadata
    assert meta.num_row_groups == 3
    assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) <= 512


def test_verify_detects_problems(tmp_path):
    write_dataset(make_records(), tmp_path / "ds", name="tiny")
    train_shard = tmp_path / "ds" / "train" / "part-00000.parquet"
    data = bytearray(train_shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    train_shard.write_bytes(bytes(data))
    (tmp_path / "ds" / "test" / "part-00000.parquet").unlink()
    problems = verify_dataset(tmp_path / "ds")
    assert any("checksum mismatch" in p and "train" in p for p in problems)
    assert any("missing shard" in p and "test" in p for p in problems)


def test_verify_row_count_mismatch(tmp_path):
    write_dataset(make_records(), tmp_path / "ds", name="tiny")
    edit_manifest(tmp_path / "ds", lambda m: m["splits"]["train"]["shards"][0].update(num_rows=13))
    problems = verify_dataset(tmp_path / "ds")
    assert len(problems) == 1 and "rows" in problems[0]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def records():
        yield from make_records()[:5]
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        write_dataset(records(), tmp_path / "ds", name="tiny")
    assert not (tmp_path / "ds").exists()
    assert list(tmp_path.iterdir()) == []


def test_overwrite_rules(tmp_path):
    write_dataset(make_records(n_classes=2), tmp_path / "ds", name="first")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dataset(make_records(), tmp_path / "ds", name="second")
    assert read_manifest(tmp_path / "ds")["name"] == "first"
    # A failed overwrite keeps the old dataset intact.
    with pytest.raises(ValueError, match="duplicate"):
        write_dataset(make_records() * 2, tmp_path / "ds", name="broken", overwrite=True)
    assert read_manifest(tmp_path / "ds")["name"] == "first"
    write_dataset(make_records(), tmp_path / "ds", name="second", overwrite=True)
    assert read_manifest(tmp_path / "ds")["name"] == "second"
    assert verify_dataset(tmp_path / "ds") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a|without"):
        write_dataset(make_records(), tmp_path / "other", name="x", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_duplicate_id_names_it_and_sources(tmp_path):
    a = ImageRecord("dup.png", noise_png(1), 0, "c", "default", "train", source="/src/a/dup.png")
    b = ImageRecord("dup.png", noise_png(2), 0, "c", "default", "train", source="/src/b/dup.png")
    with pytest.raises(ValueError, match="duplicate image id 'dup.png'") as e:
        write_dataset([a, b], tmp_path / "ds", name="dup")
    assert "/src/a/dup.png" in str(e.value) and "/src/b/dup.png" in str(e.value)
    assert not (tmp_path / "ds").exists()


def test_bad_records_rejected(tmp_path):
    good = ImageRecord("x", noise_png(1), 0, "c", "default", "train")
    bad_cases = [
        (ImageRecord("x", noise_png(1), 0, "c", "default", "holdout"), "split"),
        (ImageRecord("x", b"", 0, "c", "default", "train"), "no encoded image"),
        (ImageRecord("x", noise_png(1), -1, "c", "default", "train"), "label"),
        (ImageRecord("y", noise_png(1), 0, "other", "default", "train"), "label 0"),
    ]
    for record, message in bad_cases:
        records = [record] if record.id == "x" else [good, record]
        with pytest.raises(ValueError, match=message):
            write_dataset(records, tmp_path / "ds", name="bad")
    with pytest.raises(ValueError, match="no records"):
        write_dataset([], tmp_path / "ds", name="empty")
    assert not (tmp_path / "ds").exists()


def test_contiguous_targets(tmp_path):
    records = [
        ImageRecord(f"{label}-{i}", noise_png(label * 10 + i), label, f"c{label}", "default", split)
        for label, split in [(7, "test"), (2, "train"), (9, "test"), (4, "train"), (3, "test")]
        for i in range(2)
    ]
    manifest = write_dataset(records, tmp_path / "ds", name="gaps")
    assert contiguous_targets(manifest, "train") == {2: 0, 4: 1}
    assert contiguous_targets(manifest, "test") == {3: 0, 7: 1, 9: 2}
    with pytest.raises(ValueError, match="available splits: train, test"):
        contiguous_targets(manifest, "val")


def test_missing_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="idml data convert") as e:
        read_manifest(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json.*idml data fetch"):
        read_manifest(tmp_path / "empty")
    write_dataset(make_records(), tmp_path / "ds", name="tiny")
    with pytest.raises(ValueError, match="'val'.*available splits: train, test"):
        split_files(tmp_path / "ds", "val")


def test_report_is_stored(tmp_path):
    report = ConversionReport()
    report.skip("truncated", "a.jpg")
    report.empty_classes.append("ghost")
    manifest = write_dataset(make_records(), tmp_path / "ds", name="tiny", report=report)
    stored = manifest["conversion_report"]
    assert stored["skipped"] == {"truncated": 1}
    assert stored["examples"] == {"truncated": ["a.jpg"]}
    assert stored["empty_classes"] == ["ghost"]
    assert ConversionReport.from_dict(stored).to_dict() == stored
