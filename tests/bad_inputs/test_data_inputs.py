"""Bad input on the data side, through the real command line: every case ends in one clear line
and exit code 2, or in a counted skip, and nothing valid is lost (issue 11)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import CORRUPT_BYTES, TRAIN_OVERRIDES, edit_manifest, refused, class_image, make_class_dataset, make_cub, make_sop, write_file

from idml.data import read_manifest, read_split, select_val_classes, verify_dataset

BAD_INPUT = 2


def image_folder(root: Path, classes="abcdef", per_class: int = 3) -> Path:
    for label, name in enumerate(classes):
        for i in range(per_class):
            write_file(root / name / f"{i}.png", class_image(label, i, 16))
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what must survive a refused command."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def ids(root: Path) -> set[str]:
    return {i for split in read_manifest(root)["splits"] for i in read_split(root, split, ["id"]).column("id").to_pylist()}


# -- 1. converting into a folder that holds something ------------------------------------------
def test_convert_into_a_folder_with_other_files_is_refused(idml, tmp_path):
    src, dst = image_folder(tmp_path / "src"), tmp_path / "dst"
    write_file(dst / "thesis.tex", b"keep me")
    refused(idml("data", "convert", "image-folder", src, dst), str(dst), "other files (thesis.tex)",
            "not an idml dataset", "nothing was written")
    assert snapshot(dst) == {"thesis.tex": b"keep me"}
    # --overwrite never replaces what is not a dataset.
    refused(idml("data", "convert", "image-folder", src, dst, "--overwrite"), "not an idml dataset")
    assert snapshot(dst) == {"thesis.tex": b"keep me"}


def test_convert_over_a_previous_dataset_needs_overwrite(idml, tmp_path):
    src, dst = image_folder(tmp_path / "src"), tmp_path / "dst"
    assert idml("data", "convert", "image-folder", src, dst)[0] == 0
    before = snapshot(dst)
    refused(idml("data", "convert", "image-folder", src, dst), "already holds dataset 'src'", "--overwrite")
    assert snapshot(dst) == before and verify_dataset(dst) == []
    assert idml("data", "convert", "image-folder", src, dst, "--overwrite")[0] == 0
    assert verify_dataset(dst) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_overwrite_keeps_a_dataset_folder_that_holds_other_files(idml, tmp_path):
    src, dst = image_folder(tmp_path / "src"), tmp_path / "dst"
    assert idml("data", "convert", "image-folder", src, dst)[0] == 0
    write_file(dst / "notes.md", b"my notes on this dataset")
    before = snapshot(dst)
    refused(idml("data", "convert", "image-folder", src, dst, "--overwrite"), "other files (notes.md)",
            "move those files out first")
    assert snapshot(dst) == before


def test_overwrite_does_not_take_another_tools_manifest_for_a_dataset(idml, tmp_path):
    # A browser extension's folder has a manifest.json too.
    src, dst = image_folder(tmp_path / "src"), tmp_path / "extension"
    write_file(dst / "manifest.json", json.dumps({"manifest_version": 3, "name": "x"}).encode())
    write_file(dst / "background.js", b"//")
    before = snapshot(dst)
    refused(idml("data", "convert", "image-folder", src, dst, "--overwrite"), "not an idml dataset")
    assert snapshot(dst) == before


def test_convert_to_a_file_is_refused(idml, tmp_path):
    src = image_folder(tmp_path / "src")
    write_file(tmp_path / "out.parquet", b"precious")
    refused(idml("data", "convert", "image-folder", src, tmp_path / "out.parquet"), "is a file, not a folder")
    refused(idml("data", "convert", "image-folder", src, tmp_path / "out.parquet" / "ds"),
            f"{tmp_path / 'out.parquet'} is a file")
    assert (tmp_path / "out.parquet").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet", "src"]


def test_convert_into_the_source_folder_is_refused(idml, tmp_path):
    # The next conversion of src would read the dataset as a class of its own.
    src = image_folder(tmp_path / "src")
    before = snapshot(src)
    refused(idml("data", "convert", "image-folder", src, src / "parquet"), "inside the source folder")
    refused(idml("data", "convert", "image-folder", src, src), "inside the source folder")
    assert snapshot(src) == before


def test_leftovers_of_an_interrupted_conversion_are_reported_not_touched(idml, tmp_path, caplog):
    src, dst = image_folder(tmp_path / "src"), tmp_path / "dst"
    write_file(tmp_path / ".dst.tmp-0badc0de" / "train" / "part-00000.parquet", b"half written")
    with caplog.at_level(logging.WARNING):
        assert idml("data", "convert", "image-folder", src, dst)[0] == 0
    assert "interrupted conversion (.dst.tmp-0badc0de)" in caplog.text
    assert verify_dataset(dst) == [] and (tmp_path / ".dst.tmp-0badc0de" / "train" / "part-00000.parquet").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc refuses new folders on Linux")
def test_convert_where_nothing_can_be_written_is_refused(idml, tmp_path):
    refused(idml("data", "convert", "image-folder", image_folder(tmp_path / "src"), "/proc/idml-dataset"),
            "cannot write output folder /proc/idml-dataset")


def test_refusal_comes_before_reading_the_images(idml, tmp_path, monkeypatch):
    src, dst = image_folder(tmp_path / "src"), tmp_path / "dst"
    write_file(dst / "x.txt", b"x")
    import idml.data.converters.pipeline as converters

    monkeypatch.setattr(converters, "_validate", lambda *a, **k: pytest.fail("images were read before the refusal"))
    refused(idml("data", "convert", "image-folder", src, dst), "other files")


# -- convert: other bad arguments ------------------------------------------------------------------
@pytest.mark.parametrize("args, phrase", [
    (["--val-fraction", "1.5"], "val_fraction (--val-fraction) must be in [0, 1), got 1.5"),
    (["--val-fraction", "nan"], "val_fraction (--val-fraction) must be in [0, 1), got nan"),
])
def test_bad_convert_options_are_refused(idml, tmp_path, args, phrase):
    refused(idml("data", "convert", "image-folder", image_folder(tmp_path / "src"), tmp_path / "dst", *args), phrase)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_shard_size_must_be_a_positive_number(idml, tmp_path, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        idml("data", "convert", "image-folder", image_folder(tmp_path / "src"), tmp_path / "dst", "--shard-mb", value)
    assert exit_.value.code == BAD_INPUT
    assert f"argument --shard-mb: must be a positive number, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_an_option_of_another_layout_is_refused(idml, tmp_path):
    root = make_cub(tmp_path / "cub", bad=False)
    refused(idml("data", "convert", "cub", root, tmp_path / "dst", "--with-domains"),
            "the cub layout does not take --with-domains")
    assert not (tmp_path / "dst").exists()


def test_missing_or_wrong_source_is_refused(idml, tmp_path):
    refused(idml("data", "convert", "image-folder", tmp_path / "nope", tmp_path / "dst"), "does not exist")
    write_file(tmp_path / "file.zip", b"PK")
    refused(idml("data", "convert", "cub", tmp_path / "file.zip", tmp_path / "dst"), "is a file, not a folder")
    root = make_cub(tmp_path / "cub", bad=False)
    (root / "images.txt").write_bytes(b"\xff\xfe\x00binary")
    refused(idml("data", "convert", "cub", root, tmp_path / "dst"), "images.txt is not a UTF-8 text file")
    make_cub(root, bad=False)
    (root / "image_class_labels.txt").write_text("1 one\n")
    refused(idml("data", "convert", "cub", root, tmp_path / "dst"), "image_class_labels.txt:1: class id 'one'")
    assert not (tmp_path / "dst").exists()


def test_unreadable_images_are_counted_not_fatal(idml, tmp_path):
    src = image_folder(tmp_path / "src")
    write_file(src / "a" / "broken.png", CORRUPT_BYTES)
    (src / "b" / "dangling.png").symlink_to(src / "b" / "gone.png")
    code, out, _ = idml("data", "convert", "image-folder", src, tmp_path / "dst")
    assert code == 0 and "broken link: 1" in out
    report = read_manifest(tmp_path / "dst")["conversion_report"]
    assert report["skipped"] == {"broken link": 1, "truncated": 1}
    assert len(ids(tmp_path / "dst")) == 18


# -- 2. files outside the source folder -----------------------------------------------------------
@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder next to the sources, with images that no conversion of them may take in unasked."""
    folder = tmp_path / "elsewhere"
    write_file(folder / "private.png", class_image(50, 0, 16))
    write_file(folder / "album" / "holiday.png", class_image(51, 0, 16))
    return folder


def test_image_folder_skips_links_that_lead_outside(idml, tmp_path, outside):
    src = image_folder(tmp_path / "src")
    (src / "a" / "private.png").symlink_to(outside / "private.png")  # a linked file
    (src / "b" / "album").symlink_to(outside / "album", target_is_directory=True)  # a linked sub-folder
    (src / "zz").symlink_to(outside / "album", target_is_directory=True)  # a linked class folder
    (src / "c" / "again").symlink_to(src / "c", target_is_directory=True)  # a link inside: no escape, no loop
    code, out, _ = idml("data", "convert", "image-folder", src, tmp_path / "dst")
    assert code == 0 and "outside the source folder: 3" in out
    report = read_manifest(tmp_path / "dst")["conversion_report"]
    assert report["skipped"]["outside the source folder"] == 3
    assert report["skipped"]["link loop"] == 1
    assert ids(tmp_path / "dst") == {f"{c}/{i}.png" for c in "abcdef" for i in range(3)}

    code, out, _ = idml("data", "convert", "image-folder", src, tmp_path / "followed", "--follow-links")
    assert code == 0 and "outside the source folder" not in out
    assert {"a/private.png", "b/album/holiday.png", "zz/holiday.png"} <= ids(tmp_path / "followed")


def test_cub_skips_absolute_and_parent_paths_even_with_follow_links(idml, tmp_path, outside):
    root = make_cub(tmp_path / "cub", bad=False)
    with open(root / "images.txt", "a") as f:
        f.write(f"90 {outside / 'private.png'}\n91 001.Black_footed_Albatross/../../../elsewhere/private.png\n")
    with open(root / "image_class_labels.txt", "a") as f:
        f.write("90 1\n91 1\n")
    for flags in ([], ["--follow-links"]):
        dst = tmp_path / f"dst{len(flags)}"
        code, out, _ = idml("data", "convert", "cub", root, dst, *flags)
        assert code == 0 and "outside the source folder: 2" in out
        assert not any("private" in i for i in ids(dst)) and len(ids(dst)) == 12


def test_cub_with_a_linked_images_folder_needs_follow_links(idml, tmp_path):
    # A common set-up: the images live on another disk, linked into the dataset folder.
    root = make_cub(tmp_path / "cub", bad=False)
    shutil.move(root / "images", tmp_path / "big-disk")
    (root / "images").symlink_to(tmp_path / "big-disk", target_is_directory=True)
    refused(idml("data", "convert", "cub", root, tmp_path / "dst"), "no valid images",
            "13 file(s) lie outside the source folder", "--follow-links")
    assert not (tmp_path / "dst").exists()
    assert idml("data", "convert", "cub", root, tmp_path / "dst", "--follow-links")[0] == 0
    assert len(ids(tmp_path / "dst")) == 12


def test_sop_skips_paths_out_of_the_source(idml, tmp_path, outside):
    root = make_sop(tmp_path / "sop")
    with open(root / "Ebay_train.txt", "a") as f:
        f.write(f"90 1 1 ../elsewhere/private.png\n91 1 1 {outside / 'private.png'}\n")
    code, out, _ = idml("data", "convert", "sop", root, tmp_path / "dst", "--val-fraction", "0")
    assert code == 0 and "outside the source folder: 2" in out
    assert len(ids(tmp_path / "dst")) == 10


def test_cars196_skips_linked_images_from_outside(idml, tmp_path, outside):
    from support import make_cars

    root = make_cars(tmp_path / "cars")
    (root / "car_ims" / "000001.jpg").unlink()
    (root / "car_ims" / "000001.jpg").symlink_to(outside / "private.png")
    code, out, _ = idml("data", "convert", "cars196", root, tmp_path / "dst")
    assert code == 0 and "outside the source folder: 1" in out
    assert "car_ims/000001.jpg" not in ids(tmp_path / "dst") and len(ids(tmp_path / "dst")) == 7


# -- 3. classes without valid images do not take a place in the split ---------------------------
@pytest.mark.parametrize("empty", ["no files", "only corrupt files"])
def test_class_split_counts_only_classes_with_valid_images(idml, tmp_path, empty):
    src = image_folder(tmp_path / "src", classes="acdef")
    (src / "b").mkdir()
    if empty == "only corrupt files":
        write_file(src / "b" / "0.png", CORRUPT_BYTES)
        write_file(src / "b" / "1.jpg", b"")
    code, out, _ = idml("data", "convert", "image-folder", src, tmp_path / "dst", "--val-fraction", "0")
    assert code == 0 and "classes without valid images (left out): 1: b" in out
    split_of = {c["class_name"]: c["split"] for c in read_manifest(tmp_path / "dst")["classes"]}
    # Five usable classes: the first 3 train, the last 2 test (b's folder used to count and push d into test).
    assert split_of == {"a": "train", "c": "train", "d": "train", "e": "test", "f": "test"}


# -- 4. a validation split too small to rank models ------------------------------------------------
def test_one_class_validation_split_is_left_out_with_a_note(idml, tmp_path, caplog):
    src = image_folder(tmp_path / "src")  # 3 training classes: 0.1 of them is one class
    with caplog.at_level(logging.WARNING):
        code, out, _ = idml("data", "convert", "image-folder", src, tmp_path / "dst")
    assert code == 0
    note = "no validation split: val_fraction 0.1 of 3 training classes gives 1 class(es)"
    assert note in out and note in caplog.text
    assert "training will keep the last epoch's model" in out and "--val-fraction 0.50" in out
    manifest = read_manifest(tmp_path / "dst")
    assert "val" not in manifest["splits"] and manifest["splits"]["train"]["num_classes"] == 3
    assert len(ids(tmp_path / "dst")) == 18  # nothing lost: val's class stays in train


def test_validation_classes_need_two_images_each(idml, tmp_path):
    src = image_folder(tmp_path / "src", classes="abcdefgh")  # a-d train
    chosen = select_val_classes("abcd", 0.5)
    for i in (1, 2):
        (src / chosen[0] / f"{i}.png").unlink()  # one image left: no positive pair to retrieve
    code, out, _ = idml("data", "convert", "image-folder", src, tmp_path / "dst", "--val-fraction", "0.5")
    assert code == 0 and "no validation split: val_fraction 0.5 of 4 training classes gives 2 class(es) of which 1 with 2+ images" in out
    assert "val" not in read_manifest(tmp_path / "dst")["splits"]


def test_two_class_validation_split_is_kept(idml, tmp_path):
    src = image_folder(tmp_path / "src")
    code, out, _ = idml("data", "convert", "image-folder", src, tmp_path / "dst", "--val-fraction", "0.5")
    assert code == 0 and "note:" not in out
    assert read_manifest(tmp_path / "dst")["splits"]["val"]["num_classes"] == 2


# -- 5. a damaged dataset is refused before training starts ----------------------------------------
@pytest.fixture
def dataset(tmp_path) -> Path:
    return Path(make_class_dataset(tmp_path / "ds", train_classes=4, val_classes=2, test_classes=2, per_class=4,
                                   size=16))


def train_locally(idml, dataset: Path, out: Path):
    return idml("train", "--output-dir", out, "--set", *TRAIN_OVERRIDES, f"data.dataset={dataset}",
                "data.image_size=16", "train.batch_size=4", "train.images_per_class=2", "train.epochs=1")


def test_train_refuses_a_shard_without_its_image_column(idml, tmp_path, dataset):
    shard = dataset / "train" / "part-00000.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["image"]), shard)
    line = refused(train_locally(idml, dataset, tmp_path / "run"), f"dataset {dataset} is damaged",
                   f"train: {shard} has no 'image' column", "--verify")
    assert "re-create the dataset" in line
    assert not (tmp_path / "run" / "last.pt").exists()  # no epoch ran
    assert any("has no 'image' column" in p for p in verify_dataset(dataset))
    refused(idml("data", "inspect", dataset, "--grid", tmp_path / "grid.png"), "has no 'image' column")
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("where", ["split", "shard"])
def test_train_refuses_a_manifest_whose_counts_disagree(idml, tmp_path, dataset, where):
    if where == "split":
        edit_manifest(dataset, lambda m: m["splits"]["train"].update(num_images=21))
        phrase = "train: shards hold 16 rows, manifest says 21 images"
    else:
        edit_manifest(dataset, lambda m: m["splits"]["train"]["shards"][0].update(num_rows=15))
        phrase = "has 16 rows, manifest says 15"
    refused(train_locally(idml, dataset, tmp_path / "run"), f"dataset {dataset} is damaged", phrase)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_train_refuses_a_damaged_test_split_before_training(idml, tmp_path, dataset):
    shard = dataset / "test" / "part-00000.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["image"]), shard)
    refused(train_locally(idml, dataset, tmp_path / "run"), f"test: {shard} has no 'image' column")
    assert not (tmp_path / "run" / "last.pt").exists()  # found before training, not after


def test_ray_training_refuses_a_damaged_dataset_on_the_driver(tmp_path, dataset):
    """pipelines.train.plan runs before Ray starts a worker (used to be a 194-line WorkerGroupError)."""
    from idml.config import load_config
    from idml.errors import DamagedFileError
    from pipelines.train import RayOptions, plan

    shard = dataset / "train" / "part-00000.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["image"]), shard)
    cfg = load_config(overrides=[*TRAIN_OVERRIDES, f"data.dataset={dataset}", "train.batch_size=4",
                                 "train.images_per_class=2", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(DamagedFileError, match="has no 'image' column"):
        plan(cfg, RayOptions())


def test_train_refuses_an_unreadable_shard(idml, tmp_path, dataset):
    shard = dataset / "val" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: os.path.getsize(shard) // 2])
    refused(train_locally(idml, dataset, tmp_path / "run"), f"val: cannot read {shard} as Parquet")
    assert not (tmp_path / "run" / "last.pt").exists()
