"""Damage is never served: every file a command reads carries a checksum and is checked where it
is opened, and ``data inspect --verify`` checks everything reading relies on, the manifest's own
fields included. Each case ends in exit 2 and one line naming the file; none exits 0 with another
answer."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import TRAIN_OVERRIDES, class_image, edit_manifest, make_class_dataset, refused

from idml.data import ImageRecord, verify_dataset, write_dataset
from idml.integrity import STAMPS_NAME, file_sha256


def tiny(root: Path, *, rotate: bool = False) -> Path:
    """4 train, 2 val, 2 test classes of 4 images. ``rotate``: the same images with the training
    classes' labels rotated by one (its train shard has the same size, other labels)."""
    if not rotate:
        return Path(make_class_dataset(root, train_classes=4, val_classes=2, test_classes=2, per_class=4, size=16))
    records = []
    for label in range(8):
        split = "train" if label < 4 else "val" if label < 6 else "test"
        drawn = (label + 1) % 4 if label < 4 else label
        records += [ImageRecord(id=f"{label}/{i}", image=class_image(drawn, i, 16, i % 2), label=label,
                                class_name=f"class{label}", domain=("a", "b")[i % 2], split=split) for i in range(4)]
    write_dataset(records, root, name="tiny")
    return root


@pytest.fixture
def dataset(tmp_path) -> Path:
    return tiny(tmp_path / "ds")


def train_locally(idml, dataset: Path, out: Path):
    return idml("train", "--no-mlflow", "--output-dir", out, "--set", *TRAIN_OVERRIDES, f"data.dataset={dataset}",
                "data.image_size=16", "train.batch_size=4", "train.images_per_class=2", "train.epochs=1")


def rewrite_shard(dataset: Path, split: str, change) -> Path:
    """Replace ``split``'s shard with ``change(table)`` and record its new size and checksum, as
    a converter would have: only a comparison with the rows finds what changed."""
    shard = dataset / split / "part-00000.parquet"
    pq.write_table(change(pq.read_table(shard)), shard)

    def record(manifest):
        entry = manifest["splits"][split]["shards"][0]
        entry.update(bytes=shard.stat().st_size, sha256=file_sha256(shard))
    edit_manifest(dataset, record)
    return shard


# -- a training shard swapped for another dataset's shard of the same size ------------------------
def test_a_shard_swapped_for_one_of_the_same_size_is_refused(idml, tmp_path, dataset):
    other = tiny(tmp_path / "other", rotate=True)
    shard = dataset / "train" / "part-00000.parquet"
    replacement = other / "train" / "part-00000.parquet"
    assert replacement.stat().st_size == shard.stat().st_size and replacement.read_bytes() != shard.read_bytes()
    shard.write_bytes(replacement.read_bytes())
    refused(train_locally(idml, dataset, tmp_path / "run"), f"dataset {dataset} is damaged",
            f"checksum mismatch for {shard}", "replaced")
    assert not (tmp_path / "run").exists()  # refused before any work
    refused(idml("eval", "--frozen-backbone", "--set", f"data.dataset={dataset}", "model.backbone=resnet18",
                 "model.pretrained=false", "data.image_size=16", "--split", "train", "--output-dir", tmp_path / "eval"),
            f"checksum mismatch for {shard}")


def test_bytes_overwritten_in_place_are_refused_even_after_a_sound_check(idml, tmp_path, dataset, monkeypatch):
    import idml.integrity as integrity
    from idml.data import open_dataset

    monkeypatch.setattr(integrity, "RACY_SECONDS", -1.0)  # remember files however recently written
    assert open_dataset(dataset).check_shards() is None
    stamps = json.loads((dataset / STAMPS_NAME).read_text())
    assert "train/part-00000.parquet" in stamps  # found sound, remembered by its stat
    shard = dataset / "train" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x55  # image bytes: the Parquet footer still reads
    shard.write_bytes(bytes(data))
    refused(train_locally(idml, dataset, tmp_path / "run"), f"checksum mismatch for {shard}")


def test_a_sound_shard_is_hashed_once_until_its_stat_changes(dataset, monkeypatch):
    import idml.integrity as integrity
    from idml.data import open_dataset

    monkeypatch.setattr(integrity, "RACY_SECONDS", -1.0)
    hashed = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    open_dataset(dataset).check_shards()
    assert len(hashed) == 3  # train, val, test
    open_dataset(dataset).check_shards()
    assert len(hashed) == 3  # remembered: nothing hashed again
    os.utime(dataset / "val" / "part-00000.parquet")
    open_dataset(dataset).check_shards()
    assert len(hashed) == 4
    # The stamps file is part of a dataset folder: --overwrite still replaces it.
    from idml.data.format import check_destination

    check_destination(dataset, overwrite=True)


# -- data inspect --verify: the manifest's own fields ----------------------------------------------
def test_verify_refuses_a_manifest_without_splits(idml, dataset):
    edit_manifest(dataset, lambda m: m.update(splits={}))
    assert verify_dataset(dataset) == [f"{dataset} holds no images (the manifest lists no split with images)"]
    code, out, err = idml("data", "inspect", dataset, "--verify")
    assert "verify: OK" not in out
    refused((code, out, err), f"dataset {dataset} failed verification: 1 problem(s)")


def test_verify_refuses_edited_labels(idml, dataset):
    def edit(manifest):
        manifest["splits"]["train"]["labels"] = [0, 1, 2, 9]
    edit_manifest(dataset, edit)
    problems = verify_dataset(dataset)
    assert any("train: the manifest's labels [0, 1, 2, 9] are not the shards' [0, 1, 2, 3]" in p for p in problems)
    code, out, err = idml("data", "inspect", dataset, "--verify")
    assert "verify: FAILED" in out and "verify: OK" not in out
    refused((code, out, err), "failed verification")


def test_verify_refuses_duplicate_ids(idml, dataset):
    def duplicate(table: pa.Table) -> pa.Table:
        ids = table.column("id").to_pylist()
        ids[1] = "0/0"  # a training image's id
        return table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids, pa.string()))
    shard = rewrite_shard(dataset, "test", duplicate)
    problems = verify_dataset(dataset)
    assert problems == [f"duplicate image id '0/0' (in {dataset / 'train' / 'part-00000.parquet'} and {shard})"]
    refused(idml("data", "inspect", dataset, "--verify"), "failed verification")


def test_verify_refuses_a_class_name_changed_in_the_rows(dataset):
    def rename(table: pa.Table) -> pa.Table:
        names = ["zzz" if n == "class6" else n for n in table.column("class_name").to_pylist()]
        return table.set_column(table.schema.get_field_index("class_name"), "class_name", pa.array(names))
    rewrite_shard(dataset, "test", rename)
    problems = verify_dataset(dataset)
    assert "test: the manifest's images_per_class does not match the shards' rows" in problems
    assert "the manifest's classes (label, class_name, split) do not match the shards' rows" in problems


def test_verify_of_a_sound_dataset_is_ok(idml, dataset):
    code, out, err = idml("data", "inspect", dataset, "--verify")
    assert code == 0 and "verify: OK" in out, err


# -- manifests whose fields readers rely on are wrong ----------------------------------------------
def test_a_manifest_changed_after_it_was_written_is_refused(idml, tmp_path, dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["splits"]["train"]["labels"] = [0, 1, 2, 9]  # edited by hand: the checksum no longer matches
    (dataset / "manifest.json").write_text(json.dumps(manifest, indent=1))
    phrase = "its content does not match its checksum (manifest_sha256)"
    refused(train_locally(idml, dataset, tmp_path / "run"), f"{dataset}/manifest.json is damaged", phrase)
    refused(idml("data", "inspect", dataset, "--verify"), f"{dataset}/manifest.json is damaged", phrase)


def test_a_manifest_is_sealed_whitespace_and_key_order_aside(dataset):
    from idml.data import open_dataset

    manifest = json.loads((dataset / "manifest.json").read_text())
    assert len(manifest["manifest_sha256"]) == 64
    (dataset / "manifest.json").write_text(json.dumps(dict(reversed(list(manifest.items()))), indent=7))
    assert open_dataset(dataset).manifest == manifest


@pytest.mark.parametrize("edit, phrase", [
    (lambda m: m["splits"]["train"].update(shards="oops"), "splits.train.shards must be a list of shards, got str"),
    (lambda m: m["splits"]["train"]["shards"][0].update(path="../../outside.parquet"),
     "path '../../outside.parquet' is not a file inside the dataset folder"),
    (lambda m: m["splits"]["train"]["shards"][0].update(path="/etc/hostname"), "path '/etc/hostname' is not a file inside"),
    (lambda m: m["splits"]["train"]["shards"][0].pop("sha256"), "has no sha256 checksum"),
    (lambda m: m["splits"]["train"].update(num_images="16"), "splits.train.num_images must be a count, got '16'"),
    (lambda m: m.update(splits=[]), "'splits' must be a mapping of split names, got list"),
])
def test_a_manifest_with_wrong_fields_is_refused_before_any_file_is_opened(idml, tmp_path, dataset, edit, phrase,
                                                                          monkeypatch):
    edit_manifest(dataset, edit)
    opened = []
    real_open = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    refused(train_locally(idml, dataset, tmp_path / "run"), f"{dataset}/manifest.json is damaged", phrase)
    refused(idml("data", "inspect", dataset, "--verify"), f"{dataset}/manifest.json is damaged", phrase)
    assert opened == [] and not (tmp_path / "run").exists()


# -- checkpoints: damaged weights are refused by eval, export and resume ---------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from support import make_checkpoint

    return Path(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", embedding_dim=16))


def overwrite(path: Path, offset: int, count: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes((b + 1) % 256 for b in data[offset:offset + count])
    path.write_bytes(bytes(data))


@pytest.fixture
def damaged(checkpoint, tmp_path) -> Path:
    """``best.pt`` with 256 KB inside its weights overwritten (the issue's case: the zip's CRC fails)."""
    path = tmp_path / "best.pt"
    path.write_bytes(checkpoint.read_bytes())
    overwrite(path, path.stat().st_size // 3, 256 << 10)
    return path


def test_eval_refuses_a_checkpoint_with_damaged_weights(idml, damaged, dataset, tmp_path):
    refused(idml("eval", "--checkpoint", damaged, "--set", f"data.dataset={dataset}", "--output-dir", tmp_path / "eval"),
            f"checkpoint {damaged} is damaged", "fails its CRC-32 checksum")
    assert not (tmp_path / "eval").exists()


def test_export_refuses_a_checkpoint_with_damaged_weights(idml, damaged, tmp_path):
    refused(idml("export", "--checkpoint", damaged, "--format", "torchscript", "--output", tmp_path / "model.pt"),
            f"checkpoint {damaged} is damaged")
    assert not (tmp_path / "model.pt").exists()


def test_resume_refuses_a_last_pt_with_damaged_weights(tmp_path, checkpoint):
    from idml.checkpoint import load_checkpoint, resume_checkpoint, save_checkpoint
    from idml.config import load_config
    from idml.errors import DamagedFileError

    state = load_checkpoint(checkpoint)
    last = save_checkpoint(tmp_path / "last.pt", state)
    overwrite(last, last.stat().st_size // 2, 4096)
    with pytest.raises(DamagedFileError, match=f"cannot resume: checkpoint {last} is damaged"):
        resume_checkpoint(last, load_config(overrides=[]), start_over="start over")


def test_a_sound_checkpoint_still_loads(checkpoint):
    from idml.checkpoint import model_from_checkpoint

    model, cfg = model_from_checkpoint(checkpoint)
    assert cfg.model.embedding_dim == 16


@pytest.mark.parametrize("change, phrase", [
    ({"embedding_dim": 64}, "weight(s) of another shape, e.g. "),
    ({"backbone": "resnet50"}, "weight(s) of another shape, e.g. "),
])
def test_a_checkpoint_of_another_backbone_or_embedding_size_is_one_line(idml, checkpoint, dataset, tmp_path, change,
                                                                       phrase):
    import torch

    state = torch.load(checkpoint, weights_only=True)
    state["config"]["model"].update(change)
    path = tmp_path / "mixed.pt"
    torch.save(state, path)
    line = refused(idml("eval", "--checkpoint", path, "--set", f"data.dataset={dataset}", "--output-dir", tmp_path / "e"),
                   f"checkpoint {path} does not match its own config", phrase)
    assert "Error(s) in loading state_dict" not in line


def test_a_raw_pickle_checkpoint_is_one_line_without_torch_warnings(idml, dataset, tmp_path):
    import pickle

    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"model": {}, "config": {}, "epoch": 0}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that reached the user would fail the command here
        code, out, err = idml("eval", "--checkpoint", path, "--set", f"data.dataset={dataset}",
                              "--output-dir", tmp_path / "e")
    refused((code, out, err), f"checkpoint {path} is not a torch checkpoint file")
    assert err.count("\n") == 1 and "Warning" not in err
