import io
import logging

import pytest
from PIL import Image

from idml.data import (
    convert,
    decode_image,
    read_split,
    select_val_classes,
    verify_dataset,
)

from support import image_bytes, make_cars, make_cub, make_sop, write_file


def _all_rows(root):
    rows = {}
    for split in read_manifest_splits(root):
        table = read_split(root, split)
        for row in table.to_pylist():
            rows[row["id"]] = row
    return rows


def read_manifest_splits(root):
    from idml.data import read_manifest

    return list(read_manifest(root)["splits"])


def _check_images_decode(root):
    for row in _all_rows(root).values():
        im = Image.open(io.BytesIO(row["image"]))
        assert im.format in ("PNG", "JPEG") and im.mode == "RGB"
        assert decode_image(row["image"]).mode == "RGB"


# ------------------------------------------------------------------ val carving


def test_select_val_classes_deterministic_and_bounded():
    classes = [f"class_{i:03d}" for i in range(50)]
    chosen = select_val_classes(classes, 0.1)
    assert len(chosen) == 5
    assert chosen == select_val_classes(list(reversed(classes)), 0.1)
    assert set(chosen) <= set(classes)
    assert select_val_classes(classes, 0.0) == []
    assert len(select_val_classes(classes[:3], 0.1)) == 1  # at least one
    assert select_val_classes(classes[:1], 0.5) == []  # never the only train class
    assert len(select_val_classes(classes[:2], 0.9)) == 1  # never all of them
    with pytest.raises(ValueError, match="val_fraction"):
        select_val_classes(classes, 1.0)


# ---------------------------------------------------------------- image folder


def _make_folder(root, with_domains=False):
    classes = ["ant", "bee", "cat", "dog", "eel", "fox"]
    domains = ["photo", "sketch"] if with_domains else [None]
    for d in domains:
        base = root / d if d else root
        for ci, c in enumerate(classes):
            for i in range(2):
                fmt, suffix = [("PNG", ".png"), ("JPEG", ".JPG")][i]
                write_file(base / c / f"{c}{i}{suffix}", image_bytes(fmt, size=(10 + ci, 8), color=(ci * 40, i * 100, 7)))
        write_file(base / "cat" / "notes.txt", b"not an image")
        write_file(base / "dog" / "sub" / "deep.webp", image_bytes("WEBP", size=(9, 9)))
        write_file(base / "eel" / "broken.png", image_bytes("PNG")[:30])
    # "fox" has only corrupt images in every domain -> empty class.
    for d in domains:
        base = root / d if d else root
        for i, suffix in enumerate([".png", ".JPG"]):
            write_file(base / "fox" / f"fox{i}{suffix}", b"" if i else b"garbage")
    return classes


def test_image_folder(tmp_path, caplog):
    _make_folder(tmp_path / "src")
    write_file(tmp_path / "src" / "README.md", b"hi")
    with caplog.at_level(logging.WARNING):
        manifest = convert("image-folder", tmp_path / "src", tmp_path / "ds", val_fraction=0.0)
    assert manifest["name"] == "src"
    # Sorted classes ant..fox: first half train, last half test; fox is empty and left out.
    assert {c["class_name"]: c["split"] for c in manifest["classes"]} == {
        "ant": "train", "bee": "train", "cat": "train", "dog": "test", "eel": "test",
    }
    assert {c["class_name"]: c["label"] for c in manifest["classes"]} == {
        "ant": 0, "bee": 1, "cat": 2, "dog": 3, "eel": 4,
    }
    report = manifest["conversion_report"]
    assert report["empty_classes"] == ["fox"]
    assert report["skipped"] == {
        "empty file": 1,
        "file outside a class folder": 1,
        "ignored non-image file": 1,
        "not an image": 1,
        "truncated": 1,
    }
    assert report["written"] == {"train": 6, "test": 5}
    assert manifest["splits"]["test"]["images_per_class"] == {"dog": 3, "eel": 2}
    rows = _all_rows(tmp_path / "ds")
    assert "dog/sub/deep.webp" in rows and "ant/ant1.JPG" in rows
    assert rows["dog/sub/deep.webp"]["domain"] == "default"
    assert verify_dataset(tmp_path / "ds") == []
    _check_images_decode(tmp_path / "ds")
    assert "truncated" in caplog.text and "fox" in caplog.text


def test_image_folder_domains_and_explicit_split(tmp_path):
    _make_folder(tmp_path / "src", with_domains=True)
    (tmp_path / "test_classes.txt").write_text("ant\ncat\n")
    manifest = convert("image-folder", 
        tmp_path / "src", tmp_path / "ds", with_domains=True,
        test_classes=tmp_path / "test_classes.txt", val_fraction=0.5, name="domains",
    )
    split_of = {c["class_name"]: c["split"] for c in manifest["classes"]}
    assert {c for c, s in split_of.items() if s == "test"} == {"ant", "cat"}
    assert sum(s == "val" for s in split_of.values()) == 2  # round(0.5 * 3) = 2 of bee/dog/eel
    assert manifest["splits"]["test"]["images_per_domain"] == {"photo": 4, "sketch": 4}
    rows = _all_rows(tmp_path / "ds")
    assert rows["sketch/ant/ant0.png"]["domain"] == "sketch"
    assert rows["photo/ant/ant0.png"]["class_name"] == "ant"
    # Same class across domains shares one label.
    assert rows["sketch/ant/ant0.png"]["label"] == rows["photo/ant/ant0.png"]["label"]
    with pytest.raises(ValueError, match="unknown class"):
        convert("image-folder", tmp_path / "src", tmp_path / "ds2", with_domains=True, test_classes=["zebra"])


def test_val_carving_deterministic_and_disjoint(tmp_path):
    src = tmp_path / "src"
    for i in range(20):
        for j in range(2):  # a validation class needs 2 images to rank anything
            write_file(src / f"class{i:02d}" / f"{j}.png", image_bytes("PNG", color=(i, i, j)))
    m1 = convert("image-folder", src, tmp_path / "a", val_fraction=0.2)
    m2 = convert("image-folder", src, tmp_path / "b", val_fraction=0.2)
    val1 = {c["class_name"] for c in m1["classes"] if c["split"] == "val"}
    assert val1 == {c["class_name"] for c in m2["classes"] if c["split"] == "val"}
    assert len(val1) == 2  # round(0.2 * 10 train classes)
    train = {c["class_name"] for c in m1["classes"] if c["split"] == "train"}
    test = {c["class_name"] for c in m1["classes"] if c["split"] == "test"}
    assert val1 | train == {f"class{i:02d}" for i in range(10)}
    assert not (val1 & train) and not (val1 & test)
    splits = m1["splits"]
    assert not set(splits["val"]["labels"]) & set(splits["train"]["labels"])
    assert val1 == set(select_val_classes([f"class{i:02d}" for i in range(10)], 0.2))


def test_image_folder_max_side(tmp_path):
    write_file(tmp_path / "src" / "a" / "big.jpg", image_bytes("JPEG", size=(64, 32)))
    write_file(tmp_path / "src" / "b" / "small.jpg", image_bytes("JPEG", size=(16, 8)))
    convert("image-folder", tmp_path / "src", tmp_path / "ds", max_side=16, val_fraction=0)
    rows = _all_rows(tmp_path / "ds")
    assert Image.open(io.BytesIO(rows["a/big.jpg"]["image"])).size == (16, 8)
    assert Image.open(io.BytesIO(rows["b/small.jpg"]["image"])).format == "JPEG"


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert("image-folder", tmp_path / "missing", tmp_path / "ds")
    (tmp_path / "flat").mkdir()
    write_file(tmp_path / "flat" / "x.png", image_bytes())
    with pytest.raises(ValueError, match="no class folders"):
        convert("image-folder", tmp_path / "flat", tmp_path / "ds")
    write_file(tmp_path / "bad" / "c" / "x.png", b"junk")
    with pytest.raises(ValueError, match="no valid images"):
        convert("image-folder", tmp_path / "bad", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


# ------------------------------------------------------------------------- CUB


def test_cub(tmp_path):
    make_cub(tmp_path / "CUB_200_2011")
    # src may be the folder containing CUB_200_2011/.
    manifest = convert("cub", tmp_path, tmp_path / "ds", val_fraction=0.0, num_workers=1)
    assert manifest["name"] == "cub200"
    assert manifest["classes"] == [
        {"label": 0, "class_name": "001.Black_footed_Albatross", "split": "train"},
        {"label": 1, "class_name": "101.White_Pelican", "split": "test"},
        {"label": 2, "class_name": "102.Western_Wood_Pewee", "split": "test"},
    ]
    report = manifest["conversion_report"]
    assert report["empty_classes"] == ["002.Laysan_Albatross"]
    assert report["skipped"] == {"not an image": 1, "truncated": 3}
    assert manifest["splits"]["train"]["num_images"] == 3
    assert manifest["splits"]["test"]["num_images"] == 6
    rows = _all_rows(tmp_path / "ds")
    assert all(i.startswith("images/") for i in rows)
    assert verify_dataset(tmp_path / "ds") == []
    _check_images_decode(tmp_path / "ds")


def test_cub_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="images.txt"):
        convert("cub", tmp_path, tmp_path / "ds")


# ---------------------------------------------------------------------- Cars196


def test_cars196(tmp_path):
    make_cars(tmp_path / "cars")
    manifest = convert("cars196", tmp_path / "cars", tmp_path / "ds", val_fraction=0.5)
    split_of = {c["class_name"]: c["split"] for c in manifest["classes"]}
    assert split_of["Car Model 99 2012"] == "test" and split_of["Car Model 100 2012"] == "test"
    # Two training classes leave one for validation at most: too few to rank models, so none.
    assert [split_of[n] for n in ("Car Model 1 2012", "Car Model 2 2012")] == ["train", "train"]
    assert [c["label"] for c in manifest["classes"]] == [0, 1, 2, 3]
    report = manifest["conversion_report"]
    assert report["skipped"] == {"empty file": 1, "missing file": 1}
    assert report["examples"]["missing file"][0].endswith("car_ims/999998.jpg")
    assert report["written"] == {"train": 4, "test": 4}
    assert report["notes"] and report["notes"][0].startswith("no validation split")
    rows = _all_rows(tmp_path / "ds")
    assert rows["car_ims/000005.jpg"]["class_name"] == "Car Model 99 2012"
    assert verify_dataset(tmp_path / "ds") == []


# -------------------------------------------------------------------------- SOP


def test_sop(tmp_path):
    make_sop(tmp_path / "Stanford_Online_Products")
    write_file(tmp_path / "Stanford_Online_Products" / "chair_final" / "111085122873_1.JPG", b"\xff\xd8\xff")
    manifest = convert("sop", tmp_path, tmp_path / "ds", val_fraction=0.0)
    classes = {c["class_name"]: c for c in manifest["classes"]}
    assert list(classes) == ["1", "2", "3", "4", "5"]
    assert [classes[c]["split"] for c in ("4", "5")] == ["test", "test"]
    assert [classes[c]["split"] for c in ("1", "2", "3")] == ["train", "train", "train"]
    assert manifest["splits"]["test"]["images_per_domain"] == {"default": 4}
    assert manifest["conversion_report"]["skipped"] == {"truncated": 1}
    assert manifest["splits"]["train"]["num_images"] == 5
    rows = _all_rows(tmp_path / "ds")
    assert rows["bicycle_final/111085122871_0.JPG"]["class_name"] == "1"
    _check_images_decode(tmp_path / "ds")
