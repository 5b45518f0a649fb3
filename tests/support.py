"""Synthetic data and checkpoints for the tests: images, records and whole datasets in the
project's format, the source layouts the converters read, and a tiny real checkpoint. Generated
in temp folders by the tests; nothing is downloaded. (``tests`` is on ``pythonpath`` in
pyproject.toml, so every test module imports this as ``support``.)"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageDraw

from idml.checkpoint import model_from_checkpoint, save_checkpoint
from idml.config import load_config
from idml.data import ImageRecord, write_dataset
from idml.model import build_model

# A resnet18 from scratch on 32 px images, warm-up of one epoch: a training run in seconds.
TRAIN_OVERRIDES = ["model.backbone=resnet18", "model.pretrained=false", "model.embedding_dim=16",
                   "train.lr=1e-3", "train.proxy_lr_multiplier=10", "train.backbone_lr_multiplier=0.5",
                   "train.warmup_epochs=1", "train.channels_last=false"]
CORRUPT_BYTES = b"\x89PNG\r\n\x1a\n this is not really a png"
BAD_INPUT = 2


def refused(result, *phrases: str) -> str:
    """``(exit code, stdout, stderr)`` of a command that exited 2 with one line on stderr holding
    every phrase, and no traceback; returns that line."""
    code, _, err = result
    lines = [line for line in err.splitlines() if line.startswith("idml: error:")]
    assert code == BAD_INPUT, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def random_batches(n: int = 3, *, classes: int = 4, per_class: int = 2, size: int = 32):
    """``n`` batches of random uint8 images, ``per_class`` of each of ``classes`` classes."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (classes * per_class, 3, size, size), dtype=torch.uint8, generator=g),
             torch.arange(classes).repeat_interleave(per_class)) for _ in range(n)]


# -- images ----------------------------------------------------------------------------------
def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def class_image(label: int, variant: int, size: int = 32, domain_shift: int = 0) -> bytes:
    """A class-coloured square at a class-dependent place on noise (brighter per domain):
    learnable in a few steps."""
    rng = np.random.default_rng(label * 1000 + variant * 10 + domain_shift)
    base = np.random.default_rng(label).integers(40, 216, 3)
    img = rng.integers(0, 40, (size, size, 3)).astype(np.int16) + 20 * domain_shift
    x0, y0 = (label * 7) % (size // 2), (label * 3) % (size // 2)
    img[y0 : y0 + size // 2, x0 : x0 + size // 2] += base.astype(np.int16)
    return png(img)


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


# -- records and datasets --------------------------------------------------------------------
def make_records(n_classes=4, per_class=3, test_from=2, domains=("default",)):
    """Noise images (incompressible: predictable shard sizes), classes < ``test_from`` in train."""
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



def edit_manifest(dataset, edit) -> dict:
    """Apply ``edit(manifest)`` to a dataset's manifest and store it with a new checksum, as a
    converter that wrote those values would have (only a comparison with the shards finds it)."""
    from idml.data.source import seal_manifest

    path = Path(dataset) / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(seal_manifest(manifest)))
    return manifest


def make_class_dataset(root, *, train_classes: int = 8, val_classes: int = 2, test_classes: int = 4, per_class: int = 8,
                       domains=("a", "b"), size: int = 32, corrupt: tuple[str, ...] = (), shard_bytes: int | None = None,
                       name: str = "tiny") -> str:
    """A learnable dataset (``class_image``): train classes first, then val (carved from the
    training classes), then test; image ``i`` of a class is in domain ``domains[i % len]``, id
    ``"<label>/<i>"``. Images whose id is in ``corrupt`` get bytes that do not decode."""
    records = []
    for label in range(train_classes + val_classes + test_classes):
        split = "train" if label < train_classes else "val" if label < train_classes + val_classes else "test"
        for i in range(per_class):
            id_, d = f"{label}/{i}", i % len(domains)
            image = CORRUPT_BYTES if id_ in corrupt else class_image(label, i, size, d)
            records.append(ImageRecord(id=id_, image=image, label=label, class_name=f"class{label}",
                                       domain=domains[d], split=split))
    write_dataset(records, root, name=name, **({"shard_bytes": shard_bytes} if shard_bytes else {}))
    return str(root)


def shape_image(seed: int, size: int = 32) -> bytes:
    """A PNG with a random background colour and a random coloured rectangle or ellipse."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
    x1, y1 = x0 + int(rng.integers(6, size // 2)), y0 + int(rng.integers(6, size // 2))
    fill = tuple(int(c) for c in rng.integers(0, 256, 3))
    (draw.ellipse if seed % 2 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def make_index_records(n: int, *, seed0: int = 0, corrupt: tuple[int, ...] = (), changed: dict[int, int] | None = None,
                 drop: tuple[int, ...] = (), extra: int = 0):
    """Records img-000.. of a two-split dataset; ``corrupt`` ids get broken bytes, ``changed``
    maps an index to another image seed, ``drop`` leaves ids out, ``extra`` appends new ids."""
    changed = changed or {}
    records = []
    for i in range(n + extra):
        if i in drop:
            continue
        data = CORRUPT_BYTES if i in corrupt else shape_image(changed.get(i, seed0 + i))
        label = i % 6
        records.append(ImageRecord(id=f"img-{i:03d}", image=data, label=label, class_name=f"c{label}",
                                   domain="default", split="train" if label < 3 else "test"))
    return records


def make_index_dataset(root: Path, n: int = 40, *, shard_bytes: int = 1500, **kwargs) -> str:
    """A dataset of ``n`` shape images (ids img-000..) with several small Parquet shards per split."""
    write_dataset(make_index_records(n, **kwargs), root, name="tiny-index", shard_bytes=shard_bytes, overwrite=True)
    return str(root)


def make_image_folder(root: Path, n: int = 12, *, corrupt: tuple[int, ...] = ()) -> str:
    for i in range(n):
        path = root / f"group{i % 2}" / f"pic-{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(CORRUPT_BYTES if i in corrupt else shape_image(100 + i))
    (root / "notes.txt").write_text("not an image, not part of the corpus")
    return str(root)


def make_checkpoint(path: Path, *, embedding_dim: int = 32) -> str:
    cfg = load_config(overrides=["model.backbone=resnet18", f"model.embedding_dim={embedding_dim}",
                                 "model.pretrained=false", "data.image_size=32", "loss.uncertainty_weight=0.5"])
    torch.manual_seed(0)
    model = build_model("resnet18", embedding_dim=embedding_dim, pretrained=False)
    # A visible uncertainty: the default head starts near 0, which would make re-ranking a no-op.
    torch.nn.init.normal_(model.uncertainty_head.weight, std=0.001)
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0})
    model_from_checkpoint(str(path))  # fail here, not in the pipeline, if the format drifts
    return str(path)


def in_process_embedding():
    """The library's in-process embedding step as the tests run it: batches of 8, one torch thread
    (two OpenMP threads crawl when the two cores are shared with other work)."""
    from idml.index.build import LocalEmbedding

    return LocalEmbedding(batch_size=8, threads=1)


def embed_in_process(corpus, checkpoint: str, sink, known: pa.Table | None = None) -> None:
    """Every file of ``corpus`` through that step into ``sink``."""
    in_process_embedding()(corpus, list(corpus.files), checkpoint, sink, known)


def run_build(index_dir, corpus_uri: str, checkpoint: str, kind: str = "build", splits=None, **options):
    """``idml.index.build.build_index`` with that step: its ``BuildIndexResult``."""
    from idml.index.build import BuildIndexRequest, build_index

    request = BuildIndexRequest(index_dir, kind, checkpoint=checkpoint, corpus=corpus_uri, splits=splits, **options)
    return build_index(request, embed=in_process_embedding(), progress=lambda message: None)


def build_in_process(index_dir, corpus_uri: str, checkpoint: str, kind: str = "build", splits=None, **options) -> dict:
    """``run_build``'s manifest."""
    return run_build(index_dir, corpus_uri, checkpoint, kind, splits, **options).manifest


def clustered_vectors(n: int, d: int = 32, *, clusters: int, noise: float, seed: int = 0) -> np.ndarray:
    """``n`` L2-normalised float32 vectors around ``clusters`` random centres (Gaussian ``noise``
    per dimension): tight clusters flatter IVF, loose ones make nprobe matter."""
    from idml.faiss_import import faiss

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    faiss.normalize_L2(x)
    return x


def overwrite_merged_vectors(merged_dir: Path, seed: int = 0) -> None:
    """Other unit vectors over every vector stored in a merged on-disk IVF cache's
    ``merged.ivfdata``: the same size, the ids kept (issue 22: served as answers before the cache
    carried checksums)."""
    from idml.faiss_import import faiss

    index = faiss.read_index(str(merged_dir / "merged.index"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    rng = np.random.default_rng(seed)
    with open(merged_dir / "merged.ivfdata", "r+b") as f:
        for i in range(invlists.nlist):
            one = invlists.lists.at(i)
            if one.size:
                vectors = rng.standard_normal((one.size, index.d)).astype(np.float32)
                f.seek(one.offset)
                f.write((vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).tobytes())
