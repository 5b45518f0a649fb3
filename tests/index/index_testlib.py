"""Tiny corpora and a real tiny checkpoint for the index tests (shared with
tests/pipelines/test_index_pipeline.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

CORRUPT_BYTES = b"\x89PNG\r\n\x1a\n this is not really a png"


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


def make_records(n: int, *, seed0: int = 0, corrupt: tuple[int, ...] = (), changed: dict[int, int] | None = None,
                 drop: tuple[int, ...] = (), extra: int = 0):
    """Records img-000.. of a two-split dataset; ``corrupt`` ids get broken bytes, ``changed``
    maps an index to another image seed, ``drop`` leaves ids out, ``extra`` appends new ids."""
    from idml.data import ImageRecord

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


def make_dataset(root: Path, n: int = 40, *, shard_bytes: int = 1500, **kwargs) -> str:
    """A dataset with several small Parquet shards per split."""
    from idml.data import write_dataset

    write_dataset(make_records(n, **kwargs), root, name="tiny-index", shard_bytes=shard_bytes, overwrite=True)
    return str(root)


def make_image_folder(root: Path, n: int = 12, *, corrupt: tuple[int, ...] = ()) -> str:
    for i in range(n):
        path = root / f"group{i % 2}" / f"pic-{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(CORRUPT_BYTES if i in corrupt else shape_image(100 + i))
    (root / "notes.txt").write_text("not an image, not part of the corpus")
    return str(root)


def make_checkpoint(path: Path, *, embedding_dim: int = 32) -> str:
    from idml.checkpoint import model_from_checkpoint, save_checkpoint
    from idml.config import load_config
    from idml.model import build_model

    cfg = load_config(overrides=["model.backbone=resnet18", f"model.embedding_dim={embedding_dim}",
                                 "model.pretrained=false", "data.image_size=32", "loss.uncertainty_weight=0.5"])
    import torch

    torch.manual_seed(0)
    model = build_model("resnet18", embedding_dim=embedding_dim, pretrained=False)
    # A visible uncertainty: the default head starts near 0, which would make re-ranking a no-op.
    torch.nn.init.normal_(model.uncertainty_head.weight, std=0.001)
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0})
    model_from_checkpoint(str(path))  # fail here, not in the pipeline, if the format drifts
    return str(path)


def embed_in_process(corpus, checkpoint: str, sink, known: pa.Table | None = None, batch_size: int = 8) -> None:
    """The library path without Ray: every corpus file through one BatchEmbedder into ``sink``."""
    from idml.index.corpus import read_ids_and_images
    from idml.index.embed import BatchEmbedder

    # One thread: two OpenMP threads crawl when the two cores are shared with other work.
    embedder = BatchEmbedder(checkpoint, known=known, id_prefix=corpus.root if corpus.kind == "images" else None,
                             threads=1)
    for path in corpus.files:
        table = read_ids_and_images(corpus, path)
        for start in range(0, table.num_rows, batch_size):
            sink.add(embedder(table.slice(start, batch_size)))
    sink.close()


def build_in_process(index_dir, corpus_uri: str, checkpoint: str, kind: str = "build", splits=None, **options) -> dict:
    """A whole build/update without Ray (what pipelines.index does, with the plain loop)."""
    from idml.index import BuildRequest, IndexStore, StagedBuild, resolve_corpus
    from idml.index.embed import describe_checkpoint

    corpus = resolve_corpus(corpus_uri, splits)
    ckpt = describe_checkpoint(checkpoint)
    request = BuildRequest(kind, ckpt["embedding_dim"], ckpt, corpus.describe(), **options)
    with StagedBuild(IndexStore(index_dir), request) as staged:
        if staged.finished_version:
            return staged.publish_finished()
        sink = staged.sink()
        embed_in_process(corpus, checkpoint, sink, staged.known())
        return staged.finish(sink.listing(), embed_seconds=1.0, embedded_this_run=sink.counts["embedded"])
