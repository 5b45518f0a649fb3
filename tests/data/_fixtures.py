"""Tiny on-the-fly fixtures in the real layouts of the supported datasets."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from idml.data import ImageRecord


def image_bytes(fmt="PNG", size=(12, 10), color=(200, 30, 40), mode="RGB", **save_kwargs) -> bytes:
    im = Image.new(mode, size, color)
    out = io.BytesIO()
    im.save(out, format=fmt, **save_kwargs)
    return out.getvalue()


def noise_png(seed: int, size=(16, 16)) -> bytes:
    # Noise does not compress, so shard sizes are predictable in rollover tests.
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def make_records(n_classes=4, per_class=3, test_from=2, domains=("default",)):
    records = []
    for c in range(n_classes):
        for d in domains:
            for i in range(per_class):
                records.append(
                    ImageRecord(
                        id=f"{d}/c{c}/{i}.png",
                        image=noise_png(c * 1000 + i + 100 * len(d)),
                        label=c,
                        class_name=f"class{c}",
                        domain=d,
                        split="train" if c < test_from else "test",
                    )
                )
    return records


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_cub(root: Path, bad: bool = True) -> Path:
    """CUB layout with classes 1, 2 (train) and 101, 102 (test); class 2 has only a broken file."""
    classes = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 101: "101.White_Pelican", 102: "102.Western_Wood_Pewee"}
    lines, labels = [], []
    image_id = 0
    for class_id, folder in classes.items():
        for i in range(3):
            image_id += 1
            rel = f"{folder}/{folder.split('.')[1]}_{i:04d}_{image_id}.jpg"
            if class_id == 2:
                data = image_bytes("JPEG")[:40] if bad else image_bytes("JPEG")  # truncated
            else:
                data = image_bytes("JPEG", size=(20, 16), color=(class_id % 255, 10 * i, 50))
            write_file(root / "images" / rel, data)
            lines.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
    # One listed image that is a text file with a .jpg name.
    image_id += 1
    rel = f"{classes[1]}/not_really_{image_id}.jpg"
    write_file(root / "images" / rel, b"hello, I am text")
    lines.append(f"{image_id} {rel}")
    labels.append(f"{image_id} 1")
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def make_cars(root: Path) -> Path:
    """cars_annos.mat with classes 1, 2 (train) and 99, 100 (test), like the real struct array."""
    from scipy.io import savemat

    names = np.empty((1, 196), dtype=object)
    for i in range(196):
        names[0, i] = f"Car Model {i + 1} 2012"
    dtype = [
        ("relative_im_path", "O"),
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("test", "O"),
    ]
    rows = []
    n = 0
    for class_id in (1, 2, 99, 100):
        for i in range(2):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            write_file(root / rel, image_bytes("JPEG", size=(24, 16), color=(class_id, 100, 20 * i)))
            rows.append((rel, np.array([[1]], np.uint8), np.array([[2]], np.uint8), np.array([[20]], np.uint8),
                         np.array([[14]], np.uint8), np.array([[class_id]], np.uint8), np.array([[i % 2]], np.uint8)))
    # A listed image that is missing on disk, and a zero-byte one.
    rows.append(("car_ims/999998.jpg", *[np.array([[1]], np.uint8)] * 4, np.array([[1]], np.uint8), np.array([[0]], np.uint8)))
    write_file(root / "car_ims/999999.jpg", b"")
    rows.append(("car_ims/999999.jpg", *[np.array([[1]], np.uint8)] * 4, np.array([[99]], np.uint8), np.array([[0]], np.uint8)))
    annotations = np.empty((1, len(rows)), dtype=dtype)
    for j, row in enumerate(rows):
        annotations[0, j] = row
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": names})
    return root


def make_sop(root: Path) -> Path:
    """Stanford Online Products layout: classes 1-3 in Ebay_train.txt, 4-5 in Ebay_test.txt."""
    header = "image_id class_id super_class_id path\n"
    files = {"Ebay_train.txt": [], "Ebay_test.txt": []}
    image_id = 0
    for class_id, (superclass, super_id) in enumerate(
        [("bicycle", 1), ("bicycle", 1), ("chair", 4), ("chair", 4), ("mug", 9)], start=1
    ):
        for i in range(2):
            image_id += 1
            rel = f"{superclass}_final/11108512287{class_id}_{i}.JPG"
            write_file(root / rel, image_bytes("JPEG", size=(16, 16), color=(10 * class_id, 30 * i, 90)))
            files["Ebay_train.txt" if class_id <= 3 else "Ebay_test.txt"].append(f"{image_id} {class_id} {super_id} {rel}")
    for name, lines in files.items():
        (root / name).write_text(header + "\n".join(lines) + "\n")
    return root


EMOJI_VENDORS = ("google", "twitter", "facebook", "apple")


def _emoji_png(vendor: str, seed: int) -> bytes:
    # RGBA with a transparent border, like the real 64px sprites (smaller to stay fast).
    rng = np.random.default_rng(seed * 10 + EMOJI_VENDORS.index(vendor))
    a = np.zeros((16, 16, 4), np.uint8)
    a[3:13, 3:13, :3] = rng.integers(0, 200, (10, 10, 3))
    a[3:13, 3:13, 3] = 255
    out = io.BytesIO()
    Image.fromarray(a).save(out, format="PNG")
    return out.getvalue()


def emoji_entries():
    def entry(unified, short_name, sort_order, missing=(), **extra):
        e = {
            "unified": unified,
            "image": unified.lower() + ".png",
            "short_name": short_name,
            "category": "Smileys & Emotion",
            "sort_order": sort_order,
        }
        for v in EMOJI_VENDORS:
            e[f"has_img_{v}"] = v not in missing
        e.update(extra)
        return e

    variations = {
        tone: {"unified": f"1F385-{tone}", "image": f"1f385-{tone.lower()}.png",
               **{f"has_img_{v}": True for v in EMOJI_VENDORS}}
        for tone in ("1F3FB", "1F3FC")
    }
    return [
        entry("1F604", "smile", 3),
        entry("1F600", "grinning", 1),
        entry("2764-FE0F", "heart", 2),
        entry("1F385", "santa", 4, skin_variations=variations),
        entry("1F680", "rocket", 5),
        entry("1F9FF", "nazar_amulet", 6, missing=("facebook",)),  # flag false for one vendor
        entry("1F3FB", "skin-tone-2", 7),  # modifier: never a class
        entry("1F431", "cat", 8),
        entry("1F436", "dog", 9),  # flag true everywhere but the apple file is absent
    ]


def make_emoji_tarballs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = emoji_entries()
    for vendor in EMOJI_VENDORS:
        path = folder / f"emoji-datasource-{vendor}-16.0.0.tgz"
        with tarfile.open(path, "w:gz") as tar:
            def add(name, data):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

            add("package/package.json", json.dumps({"name": f"emoji-datasource-{vendor}", "version": "16.0.0"}).encode())
            for i, e in enumerate(entries):
                images = [e["image"]] + [v["image"] for v in e.get("skin_variations", {}).values()]
                for image in images:
                    if not e[f"has_img_{vendor}"] or (vendor == "apple" and e["short_name"] == "dog"):
                        continue
                    add(f"package/img/{vendor}/64/{image}", _emoji_png(vendor, i))
                    add(f"package/img/{vendor}/32/{image}", _emoji_png(vendor, i))
            # emoji.json after the images: the reader must not depend on member order.
            add("package/emoji.json", json.dumps(entries).encode())
    return folder


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def make_fashion_idx(folder: Path, per_label=4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(10), per_label)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (len(labels), 28, 28))
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images[:10])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels[:10])
    return folder
