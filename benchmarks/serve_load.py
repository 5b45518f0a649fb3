"""Search service load: the HTTP service (Ray Serve, `pipelines.serve`) against the same search
in-process (`IndexSearcher` + `BatchEmbedder`), same machine, same query images, side by side.

    .venv/bin/python benchmarks/serve_load.py [--n 512] [--queries 64] [--rounds 3] [--clients 4]

It builds a small index of generated images with `idml index build` on a local Ray instance,
starts the service on that instance (one replica, one CPU), and then alternates rounds of:

- in-process: one query at a time, decode + embed + search, with one torch thread (the replica's
  share: Ray gives a 1-CPU actor one OpenMP thread);
- HTTP, 1 client: `POST /search` one image at a time (the same work plus HTTP, the Serve proxy and
  the hop to the replica);
- HTTP, N clients: N threads posting concurrently (the replica batches their images).

It prints requests/s and p50/p99 latency of each, and the ratios HTTP / in-process. The client
threads, the proxy and the replica share the machine's cores, as a load generator on the same
host does; on a loaded machine the numbers say little (run it on an idle one).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from embed_throughput import make_checkpoint, make_corpus  # noqa: E402


def query_images(corpus: str, n: int) -> list[bytes]:
    """The first ``n`` images of the corpus as encoded bytes (what a client uploads)."""
    import pyarrow.parquet as pq

    blobs: list[bytes] = []
    for path in sorted(Path(corpus).glob("*/part-*.parquet")):
        blobs += pq.read_table(path, columns=["image"]).column("image").to_pylist()
    return blobs[:n]


def in_process(searcher, embedder, queries: list[bytes], k: int, rerank: bool) -> tuple[list[float], float]:
    latencies = []
    start = time.perf_counter()
    for blob in queries:
        t = time.perf_counter()
        mu, sigma = embedder.embed_images([blob])
        searcher.search(mu, np.square(sigma).sum(axis=1), k, rerank=rerank)
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - start


def over_http(url: str, queries: list[bytes], k: int, rerank: bool, clients: int) -> tuple[list[float], float]:
    """Every client posts every query once; (latencies, wall seconds)."""
    import requests

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        session = requests.Session()
        mine = []
        for i in range(len(queries)):
            blob = queries[(i + offset) % len(queries)]  # clients start at different images
            t = time.perf_counter()
            res = session.post(f"{url}/search", data=blob, params={"k": k, "rerank": str(rerank).lower()}, timeout=120)
            mine.append(time.perf_counter() - t)
            if res.status_code != 200:
                failures.append(f"{res.status_code} {res.text[:200]}")
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(c * len(queries) // clients,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return latencies, time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(latencies: list[float], seconds: float) -> tuple[float, float, float]:
    ms = np.asarray(latencies) * 1000
    return len(latencies) / seconds, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="indexed images (default: 512)")
    p.add_argument("--queries", type=int, default=64, help="query images, the same on every side (default: 64)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of every side (default: 3)")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients of the last side (default: 4)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rerank", action="store_true", help="introspective re-rank on every query")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=64, help="model input side (images are stored at 96 px)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--workdir", help="default: a temporary folder")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        return run(args, work)


def run(args, work: Path) -> int:
    from ray import serve

    from idml.index import IndexSearcher
    from idml.index.embed import BatchEmbedder
    from pipelines._ray import init_ray
    from pipelines.index_cli import main as index_main
    from pipelines.serve import APP_NAME, ServeOptions, app

    corpus = make_corpus(work / "corpus", args.n, 96)
    checkpoint = make_checkpoint(work / "model.pt", args.backbone, args.dim, args.image_size)
    index_dir = work / "index"
    ray = init_ray("local", log_to_driver=False)  # the replica logs every request
    try:
        if index_main(["build", "--index-dir", str(index_dir), "--checkpoint", checkpoint, "--corpus", corpus,
                       "--threads", "1", "--no-mlflow"]) != 0:
            raise RuntimeError("idml index build failed")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app(ServeOptions(index_dir=str(index_dir), cpus_per_replica=1)), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"

        queries = query_images(corpus, args.queries)
        searcher = IndexSearcher(index_dir)
        embedder = BatchEmbedder(checkpoint, threads=1)
        sides = {"in-process (1 thread)": lambda: in_process(searcher, embedder, queries, args.k, args.rerank),
                 "HTTP, 1 client": lambda: over_http(url, queries, args.k, args.rerank, 1),
                 f"HTTP, {args.clients} clients": lambda: over_http(url, queries, args.k, args.rerank, args.clients)}
        for measure in sides.values():  # warm-up: first calls, the re-rank's imports, connections
            measure()
        results = {name: ([], 0.0) for name in sides}
        for _ in range(args.rounds):
            for name, measure in sides.items():
                latencies, seconds = measure()
                results[name] = (results[name][0] + latencies, results[name][1] + seconds)
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nsearch service load: {args.n}-image index ({args.backbone}, {args.image_size} px, dim {args.dim}), "
          f"{len(queries)} query images, k {args.k}{', re-ranked' if args.rerank else ''}, {args.rounds} alternating rounds")
    print(f"{'':<26}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}")
    stats = {name: summary(*r) for name, r in results.items()}
    for name, (rps, p50, p99) in stats.items():
        print(f"{name:<26}{rps:>12.1f}{p50:>10.1f}{p99:>10.1f}")
    base = stats["in-process (1 thread)"]
    print(f"\n{'HTTP / in-process':<26}{'requests/s':>12}{'p50':>10}{'p99':>10}")
    for name, (rps, p50, p99) in stats.items():
        if name.startswith("HTTP"):
            print(f"{name:<26}{rps / base[0]:>12.2f}{p50 / base[1]:>10.2f}{p99 / base[2]:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
