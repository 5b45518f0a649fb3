"""Embedding throughput: Ray Data ``map_batches`` (the indexing pipeline) vs a plain torch loop.

Both sides run the same ``BatchEmbedder`` (same checkpoint, torch threads and batch size; decode,
transform, forward) and feed the same ``PartitionSink`` (embeddings written to Parquet), so the
ratio is the cost of Ray Data: reading blocks, moving them to the actor and back. Ray runs one
actor with the same number of threads as the loop.

    .venv/bin/python benchmarks/embed_throughput.py [--n 2048] [--batch-size 64] [--threads 2]

"steady" is the marginal rate between a run on n/4 images and a run on n images,
(n - n/4) / (t_n - t_n/4): fixed costs (model load, Ray's actor start-up, job planning) cancel.
"end to end" is n / t_n (for Ray: from job submission; for the loop: after the model is loaded,
which Ray does inside its timed actor start). The target is steady ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def make_corpus(root: Path, n: int, size: int) -> str:
    from PIL import Image, ImageDraw

    from idml.data import ImageRecord, write_dataset

    def records():
        rng = np.random.default_rng(0)
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 60, (size, size, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(img)
            for _ in range(3):
                x0, y0 = rng.integers(0, size // 2, 2)
                w, h = rng.integers(size // 8, size // 2, 2)
                draw.ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=tuple(int(c) for c in rng.integers(60, 256, 3)))
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=90)
            yield ImageRecord(id=f"img-{i:06d}", image=out.getvalue(), label=i % 10, class_name=f"c{i % 10}",
                              domain="default", split="test")

    write_dataset(records(), root, name="bench", shard_bytes=4 << 20)
    return str(root)


def make_checkpoint(path: Path, backbone: str, dim: int, image_size: int) -> str:
    import torch

    from idml.checkpoint import save_checkpoint
    from idml.config import load_config
    from idml.model import build_model

    cfg = load_config(overrides=[f"model.backbone={backbone}", f"model.embedding_dim={dim}", "model.pretrained=false",
                                 f"data.image_size={image_size}"])
    torch.manual_seed(0)
    model = build_model(backbone, embedding_dim=dim, pretrained=False)
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0})
    return str(path)


def plain_loop(corpus, checkpoint: str, dim: int, batch_size: int, threads: int, out: Path) -> float:
    """Seconds to embed ``corpus`` in a plain loop (the model is loaded before the clock starts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from idml.index.embed import BatchEmbedder
    from idml.index.partitions import PartitionSink

    embedder = BatchEmbedder(checkpoint, threads=threads)
    sink = PartitionSink(out, dim=dim, target_rows=10**9)
    start = time.perf_counter()
    for path in corpus.files:
        # Stream each shard in batches, as a DataLoader would.
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["id", "image"]):
            sink.add(embedder(pa.Table.from_batches([record_batch])))
    sink.close()
    return time.perf_counter() - start


def ray_pipeline(corpus, checkpoint: str, dim: int, batch_size: int, threads: int, out: Path) -> float:
    """Seconds for ``pipelines.index.embed_with_ray`` (one actor, same threads) from submission
    (the driver loads the checkpoint and puts it in the object store inside the clock, as
    ``idml index build`` does)."""
    from idml.checkpoint import load_checkpoint
    from idml.index.embed import model_state
    from idml.index.partitions import PartitionSink
    from pipelines.index import embed_with_ray

    sink = PartitionSink(out, dim=dim, target_rows=10**9)
    start = time.perf_counter()
    embed_with_ray(corpus, corpus.files, model_state(load_checkpoint(checkpoint)), sink, None, batch_size=batch_size,
                   actors=(1, 1), threads=threads)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="images")
    p.add_argument("--image-size", type=int, default=64, help="model input side (images are stored at 96 px)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each side; the best is reported")
    p.add_argument("--workdir", help="default: a temporary folder")
    args = p.parse_args(argv)

    import ray

    from idml.index import resolve_corpus

    small_n = max(args.batch_size, args.n // 4)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        corpora = {"small": resolve_corpus(make_corpus(tmp / "small", small_n, 96)),
                   "full": resolve_corpus(make_corpus(tmp / "full", args.n, 96))}
        checkpoint = make_checkpoint(tmp / "model.pt", args.backbone, args.dim, args.image_size)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        sides = {"plain torch loop": plain_loop, "ray map_batches": ray_pipeline}
        runs = {name: [] for name in sides}
        for r in range(args.repeats):
            for name, fn in sides.items():  # alternate, so both see the same machine
                times = {size: fn(corpus, checkpoint, args.dim, args.batch_size, args.threads, tmp / f"{name[:4]}-{size}-{r}")
                         for size, corpus in corpora.items()}
                runs[name].append((args.n / times["full"], (args.n - small_n) / max(1e-9, times["full"] - times["small"])))
        ray.shutdown()

    print(f"\nembedding {args.n} images ({args.backbone}, {args.image_size}px, dim {args.dim}), batch {args.batch_size}, "
          f"{args.threads} torch threads, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} (other work on the machine skews both sides)")
    print(f"{'':<18}{'end to end img/s':>18}{'steady img/s':>14}   runs (end to end / steady)")
    best = {}
    for name, rs in runs.items():
        best[name] = (max(r[0] for r in rs), max(r[1] for r in rs))
        print(f"{name:<18}{best[name][0]:>18.1f}{best[name][1]:>14.1f}   " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in rs))
    e2e = best["ray map_batches"][0] / best["plain torch loop"][0]
    steady = best["ray map_batches"][1] / best["plain torch loop"][1]
    print(f"ratio ray / plain: steady {steady:.3f} (target >= 0.9: {'PASS' if steady >= 0.9 else 'FAIL'}), "
          f"end to end {e2e:.3f} (Ray's actor start-up and model load included, on {args.n} images)")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
