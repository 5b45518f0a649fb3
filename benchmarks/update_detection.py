"""Change detection of ``idml index update``: stat first and read only what changed, vs reading
and hashing the whole corpus (what an update did before).

A folder of ``--files`` PNG images (default 10,000 of 128 px, ~50 kB each) is indexed once; then ``--changed``
of them (default 1%) get new pixels. The same update then runs twice, on two copies of that
index, side by side in this process (no Ray; the library path of ``idml index update``):

* stat first (``StagedBuild.plan_reads``, what ``idml index update`` does): list every file's size
  and mtime, compare with the parent version's record, read, hash and embed only the new or
  changed files;
* read all (before): read and hash every image, embed those whose content hash is new.

Both must publish the same version (the same ids and content hashes, ``changed`` = the files
rewritten). Prints each update's seconds, the files it read and the ratio.

    .venv/bin/python benchmarks/update_detection.py [--files 10000] [--changed 0.01]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from embed_throughput import make_checkpoint  # noqa: E402


def draw(path: Path, seed: int, size: int) -> None:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    # Photo-sized files: noise does not compress (a 128 px PNG is ~50 kB), so reading and hashing
    # cost what they cost for a real corpus on local disk.
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    box = sorted(rng.integers(0, size, 2).tolist()) + sorted(rng.integers(0, size, 2).tolist())
    ImageDraw.Draw(image).ellipse([box[0], box[2], box[1] + 1, box[3] + 1], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    image.save(path)


def make_folder(root: Path, n: int, size: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = root / f"part{i % 100:02d}" / f"img-{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        draw(path, i, size)
        paths.append(path)
    return paths


def run_update(index_dir: Path, folder: Path, checkpoint: str, *, stat_first: bool, kind: str = "update",
               files_per_batch: int = 64) -> tuple[dict, float, int]:
    """One build or update in process: (manifest, seconds, files read)."""
    from idml.index import BuildRequest, IndexStore, StagedBuild, resolve_corpus
    from idml.index.corpus import read_ids_and_images
    from idml.index.embed import BatchEmbedder, describe_checkpoint

    start = time.perf_counter()
    corpus = resolve_corpus(str(folder))
    ckpt = describe_checkpoint(checkpoint)
    request = BuildRequest(kind, ckpt["embedding_dim"], ckpt, corpus.describe())
    with StagedBuild(IndexStore(index_dir), request) as staged:
        # plan_reads also records the files' stats in the version (a build reads every file).
        files = staged.plan_reads(corpus).files if stat_first else corpus.files
        embedder = BatchEmbedder(checkpoint, known=staged.known(), id_prefix=corpus.root, threads=1)
        sink = staged.sink()
        for i in range(0, len(files), files_per_batch):
            sink.add(embedder(pa.concat_tables([read_ids_and_images(corpus, f) for f in files[i:i + files_per_batch]])))
        sink.close()
        manifest = staged.finish(sink.listing(), embedded_this_run=sink.counts["embedded"])
    return manifest, time.perf_counter() - start, len(files)


def published_rows(index_dir: Path) -> set[tuple[str, str]]:
    import pyarrow.parquet as pq

    from idml.index import IndexStore

    store = IndexStore(index_dir)
    vdir = store.version_dir(store.current_version())
    rows = set()
    for entry in store.read_manifest()["shards"]:
        t = pq.read_table(vdir / entry["embeddings"], columns=["id", "content_hash"])
        rows.update(zip(t.column("id").to_pylist(), t.column("content_hash").to_pylist()))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--changed", type=float, default=0.01, help="fraction of the files rewritten before the update")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--workdir", help="default: a temporary folder")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        paths = make_folder(tmp / "images", args.files, args.size)
        checkpoint = make_checkpoint(tmp / "model.pt", "resnet18", 64, 32)
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{args.files} images of {args.size} px ({megabytes:.0f} MB) in {time.perf_counter() - t:.1f}s; "
              "building the index ...", flush=True)
        built, build_s, _ = run_update(tmp / "index", tmp / "images", checkpoint, stat_first=True, kind="build")
        print(f"  built {built['version']} in {build_s:.1f}s", flush=True)
        time.sleep(2.1)  # files modified within 2 s of a listing get an unknown mtime (racy): not the case measured
        n_changed = max(1, int(args.files * args.changed))
        for i in np.random.default_rng(0).choice(len(paths), n_changed, replace=False):
            draw(paths[i], 10**6 + int(i), args.size)
        time.sleep(2.1)
        for name in ("stat-first", "read-all"):
            shutil.copytree(tmp / "index", tmp / name)
            shutil.rmtree(tmp / name / "cache", ignore_errors=True)  # both check their parent's files alike

        results = {}
        for name in ("stat-first", "read-all"):
            manifest, seconds, read = run_update(tmp / name, tmp / "images", checkpoint, stat_first=name == "stat-first")
            results[name] = (manifest, seconds, read)
            print(f"  {name}: {seconds:.2f}s, {read} files read, counts {dict((k, manifest['counts'][k]) for k in ('changed', 'added', 'removed'))}",
                  flush=True)
        for name, (manifest, _, _) in results.items():
            assert manifest["counts"]["changed"] == n_changed, (name, manifest["counts"])
        assert published_rows(tmp / "stat-first") == published_rows(tmp / "read-all"), "the two updates disagree"

    stat_s, read_s = results["stat-first"][1], results["read-all"][1]
    print(f"\n=== update_detection ({args.files} files, {n_changed} changed) ===")
    print(f"stat first: {stat_s:.2f}s, {results['stat-first'][2]} files read; read all: {read_s:.2f}s, "
          f"{results['read-all'][2]} files read; read all / stat first: {read_s / stat_s:.1f}x; both published the same rows")
    print(f"full build for reference: {build_s:.1f}s (the update, stat first, is {stat_s / build_s:.1%} of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
