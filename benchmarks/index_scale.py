"""Index at scale: sharded IVF build, query speed and recall vs exact search, and update cost.

Synthetic clustered vectors (``--n`` x ``--d``, default 1,000,000 x 512; L2-normalised; ``--n``
for more) go through the same library code as ``idml index build`` (``PartitionSink`` ->
``StagedBuild.finish``: Parquet partitions, one IVF shard per partition, exact-recall sample,
checksums, manifest, publish), without the embedding step. Then:

* queries: held-out vectors from the same distribution; exact top-10 by brute-force inner
  product (faiss, BLAS) vs the published sharded index (``IndexSearcher``, nprobe tuned by the
  build to recall@10 >= 0.95 on its sample; IVF shards' lists merged into one memory-mapped
  file at the first open, as by default). Targets: recall@10 >= 0.95, >= 50x faster, and
  no slower than one unsharded index of the same spec at the same nprobe. Also timed: the
  first open (the merge) and the shards searched one by one (``--combine shards``).
* build time vs one unsharded faiss index of the same spec (same nlist, training sample size,
  k-means iterations), trained and filled in one process.
* update with ``--update-fraction`` (1%) new vectors through ``StagedBuild`` (kind update):
  embeds nothing else, reuses every shard, adds one. Target: <= 2% of the full build. (In the
  pipeline an update also hashes the corpus to find what changed; there is no corpus here.)
* an IVF-PQ row (``--pq``, default ``IVF<nlist>,PQ<d/8>``: 64-byte codes at d=512) built the same
  way: memory vs IVF-Flat, recall@10 vs exact on the held-out queries (candidates re-scored by
  exact cosine, as the searcher does, and on the codes' scores alone), speed vs exact.
* a paper estimate for ``--estimate-n`` (100M) vectors of that IVF-PQ on a cluster: memory per
  shard, shards per node of ``--node-memory``, build time extrapolated from the measured rates.

Distributions (``--distribution``; the first two by default), each running everything above:
``tight`` (256 isotropic clusters, spread 1.0: each cluster spans a few IVF lists, which flatters
IVF); ``embedding`` (10,000 classes whose mean, between- and within-class spectra are fitted to
trained emoji embeddings: ``EmbeddingLike``); ``loose`` (10,000 isotropic clusters, spread 1.5: a
stress case, no real embedding space looks like it; noise in 512 isotropic directions swamps the
clusters, so IVF needs most lists for any recall).

    .venv/bin/python benchmarks/index_scale.py [--n 1000000] [--d 512] [--shards 4] [--distribution embedding]
    .venv/bin/python benchmarks/index_scale.py --n 20000 --d 64 --queries 200   # a minute: checks it runs
"""

from __future__ import annotations

import argparse
import math
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402


def load() -> str:
    return f"load average {os.getloadavg()[0]:.1f}"


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Clusters:
    """Gaussian blobs around random unit centres; noise norm ``spread`` x the centre's."""

    def __init__(self, d: int, n_clusters: int, spread: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
        faiss.normalize_L2(self.centers)
        self.sigma = spread / math.sqrt(d)

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, self.centers.shape[1]), dtype=np.float32)
        x *= self.sigma
        x += self.centers[rng.integers(0, len(self.centers), n)]
        faiss.normalize_L2(x)
        return x


class EmbeddingLike:
    """Classes shaped like trained embeddings rather than isotropic blobs: a shared mean direction,
    class centres and within-class scatter that are each anisotropic (power-law spectra in random
    orientations), fitted to the default model's emoji test embeddings (configs/emoji.yaml,
    3,704 images of 925 emoji): mean norm 0.61; between-class variance 0.47 with eigenvalues
    ~ i^-1.37 (16 directions hold half of it); within-class variance 0.16, ~ i^-0.86 (40 hold
    half). Same-class cosine ~0.8 and other-class cosine ~0.4, as measured there."""

    MEAN_NORM, BETWEEN_VAR, BETWEEN_EXP, WITHIN_VAR, WITHIN_EXP = 0.61, 0.47, 1.37, 0.16, 0.86

    def __init__(self, d: int, n_classes: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        mean = rng.standard_normal(d).astype(np.float32)
        self.mean = self.MEAN_NORM * mean / np.linalg.norm(mean)
        self.within = self._basis(rng, d, self.WITHIN_VAR, self.WITHIN_EXP)
        between = self._basis(rng, d, self.BETWEEN_VAR, self.BETWEEN_EXP)
        self.centers = self.mean + rng.standard_normal((n_classes, d), dtype=np.float32) @ between

    @staticmethod
    def _basis(rng, d: int, variance: float, exponent: float) -> np.ndarray:
        """A d x d map taking N(0, I) to N(0, C): C's eigenvalues ~ i^-exponent summing to
        ``variance``, its eigenvectors a random rotation."""
        eig = np.arange(1, d + 1, dtype=np.float64) ** -exponent
        eig *= variance / eig.sum()
        rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
        return (np.sqrt(eig)[:, None] * rotation.T).astype(np.float32)

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, self.centers.shape[1]), dtype=np.float32) @ self.within
        x += self.centers[rng.integers(0, len(self.centers), n)]
        faiss.normalize_L2(x)
        return x


def feed(sink, x: np.ndarray, first_id: int, chunk: int = 50_000) -> None:
    from idml.index.embed import embedded_batch

    rng = np.random.default_rng(first_id)
    for start in range(0, len(x), chunk):
        mu = x[start:start + chunk]
        ids = [f"v{i:09d}" for i in range(first_id + start, first_id + start + len(mu))]
        sigma = 0.01 * rng.standard_normal(mu.shape, dtype=np.float32)  # small uncertainty embeddings
        sink.add(embedded_batch(ids, [f"h{i}" for i in ids], mu, sigma))
    sink.close()


def listing(n: int) -> pa.Table:
    ids = [f"v{i:09d}" for i in range(n)]
    return pa.table({"id": ids, "content_hash": [f"h{i}" for i in ids]})


# name: (clusters, spread; None: EmbeddingLike)
DISTRIBUTIONS = {"tight": (256, 1.0), "embedding": (10_000, None), "loose": (10_000, 1.5)}


def staged_run(index_dir: Path, kind: str, d: int, n_total: int, x: np.ndarray, first_id: int, args,
               index: str | None = None) -> tuple[dict, float]:
    from idml.index import BuildRequest, IndexStore, StagedBuild

    checkpoint = {"path": "synthetic", "sha256": "synthetic", "embedding_dim": d, "uncertainty_weight": 0.0}
    corpus = {"uri": "synthetic", "kind": "synthetic", "splits": [], "num_rows": n_total, "fingerprint": str(n_total)}
    index = index or args.index
    corpus_listing = listing(n_total)  # the corpus scan's output: input here, like the vectors
    request = BuildRequest(kind, d, checkpoint, corpus, index_type=index if kind == "build" else "auto",
                           nlist=args.nlist if kind == "build" and index in ("auto", "ivf") else None,
                           shards=args.shards if kind == "build" else None, recall_sample=args.recall_sample)
    start = time.perf_counter()
    with StagedBuild(IndexStore(index_dir), request, progress=lambda m: print(f"  [{kind}] {m}", flush=True)) as staged:
        feed(staged.sink(), x, first_id)
        manifest = staged.finish(corpus_listing)
    return manifest, time.perf_counter() - start


def unsharded_build(x: np.ndarray, spec: dict) -> tuple[faiss.Index, float, float]:
    index = faiss.index_factory(x.shape[1], spec["factory"], faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter, ivf.cp.seed = spec["niter"], spec["seed"]
    ivf.cp.max_points_per_centroid = max(1, math.ceil(spec["train_size"] / spec["nlist"]))
    rng = np.random.default_rng(spec["seed"])
    sample = x[np.sort(rng.choice(len(x), size=min(len(x), spec["train_size"]), replace=False))]
    t = time.perf_counter()
    index.train(sample)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    index.add(x)
    return index, train_s, time.perf_counter() - t


def recall_at(found: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(e[:k])) / k for f, e in zip(found, exact)]))


def timed_search(index, queries: np.ndarray, k: int, repeats: int = 3) -> tuple[np.ndarray, float]:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        _, labels = index.search(queries, k)
        best = min(best, time.perf_counter() - t)
    return labels, best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--index", default="auto", help="auto, flat, ivf or a faiss factory string (as `idml index build --index`)")
    p.add_argument("--nlist", type=int, help="default: the library's auto rule")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--recall-sample", type=int, default=256, help="the build's own recall/nprobe sample")
    p.add_argument("--distribution", nargs="+", choices=tuple(DISTRIBUTIONS), default=["tight", "embedding"],
                   help="tight: 256 isotropic clusters, spread 1.0; embedding: 10,000 classes shaped like trained "
                        "embeddings; loose: 10,000 isotropic clusters, spread 1.5 (a stress case). Each runs everything")
    p.add_argument("--clusters", type=int, help="override the distribution's number of clusters")
    p.add_argument("--spread", type=float,
                   help="override the distribution's cluster noise norm relative to the centre norm "
                        "(two members of a cluster have cosine ~ 1/(1+spread^2))")
    p.add_argument("--pq", default="", help="IVF-PQ row: a factory string (default IVF<nlist>,PQ<d/8>), or 'none'")
    p.add_argument("--estimate-n", type=int, default=100_000_000, help="vectors of the paper estimate")
    p.add_argument("--node-memory", default="64GB", help="memory of one cluster node in the paper estimate")
    p.add_argument("--update-fraction", type=float, default=0.01)
    p.add_argument("--workdir", help="where the index is written (default: a temporary folder)")
    args = p.parse_args(argv)
    for name in args.distribution:
        clusters, spread = DISTRIBUTIONS[name]
        if spread is not None and args.spread is not None:
            spread = args.spread
        run(args, name, args.clusters or clusters, spread)
    return 0


def run(args, distribution: str, clusters: int, spread: float | None) -> None:
    from idml.index import IndexSearcher
    from idml.index import spec as fx

    d, n = args.d, args.n
    n_new = max(1, int(n * args.update_fraction))
    shape = (f"{clusters} classes shaped like trained embeddings (cosine within a class ~0.8, between ~0.4)"
             if spread is None else f"{clusters} isotropic clusters, spread {spread} (cosine within a cluster "
                                    f"~{1 / (1 + spread**2):.2f}, between clusters ~0)")
    print(f"\n##### distribution {distribution}\ndata: {n} x {d} float32 ({n * d * 4 / 2**30:.2f} GiB), {shape}; "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads", flush=True)
    t = time.perf_counter()
    blobs = EmbeddingLike(d, clusters) if spread is None else Clusters(d, clusters, spread)
    x = np.empty((n, d), np.float32)  # filled in chunks: no second copy at peak
    for s in range(0, n, 100_000):
        x[s:s + 100_000] = blobs.sample(min(100_000, n - s), seed=1 + s // 100_000)
    queries = blobs.sample(args.queries, seed=10**6)
    new = blobs.sample(n_new, seed=10**6 + 1)
    print(f"generated in {time.perf_counter() - t:.1f}s; peak RSS {peak_gib():.2f} GiB", flush=True)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        index_dir = Path(tmp) / "index"
        print("sharded build (library, as `idml index build` after embedding) ...", flush=True)
        built, build_s = staged_run(index_dir, "build", d, n, x, 0, args)
        m, spec = built["metrics"], built["faiss"]
        faiss_s = m["train_seconds"] + m["shards_seconds"]
        peak_build = peak_gib()
        print(f"  done in {build_s:.1f}s; peak RSS {peak_build:.2f} GiB; {load()}", flush=True)

        print("unsharded faiss build of the same spec ...", flush=True)
        single, single_train, single_add = unsharded_build(x, spec) if spec["index_type"] == "ivf" else (None, 0.0, 0.0)
        if spec["index_type"] != "ivf":
            t = time.perf_counter()
            single = faiss.IndexFlatIP(d)
            single.add(x)
            single_add = time.perf_counter() - t
        print(f"  train {single_train:.1f}s + add {single_add:.1f}s; peak RSS {peak_gib():.2f} GiB; {load()}", flush=True)

        print(f"queries: {len(queries)} held-out vectors, top-10 ...", flush=True)
        t = time.perf_counter()
        _, exact = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
        exact_s = time.perf_counter() - t
        t = time.perf_counter()
        searcher = IndexSearcher(index_dir)  # an IVF index of several shards: their lists merged into one file
        open_s = time.perf_counter() - t
        rows = {shard: np.char.lstrip(ids, "v").astype(np.int64) for shard, ids in searcher.ids.items()}

        def to_rows(labels):
            shard, row = labels >> 32, labels & 0xFFFFFFFF
            out = np.full(labels.shape, -1, np.int64)
            for s in np.unique(shard[labels >= 0]):
                mask = (shard == s) & (labels >= 0)
                out[mask] = rows[int(s)][row[mask]]
            return out

        searcher.index.search(queries[:10], 10)  # page the memory-mapped lists in
        found, sharded_s = timed_search(searcher.index, queries, 10)
        sharded_recall = recall_at(to_rows(found), exact)
        curve = []
        if spec["index_type"] == "ivf":
            for nprobe in (1, 2, 4, 8, 16, 32, 64):
                if nprobe > spec["nlist"]:
                    break
                f, s = timed_search(faiss_index_with(searcher, nprobe), queries, 10, repeats=1)
                curve.append((nprobe, recall_at(to_rows(f), exact), s))
            faiss.extract_index_ivf(single).nprobe = spec["nprobe"]
            faiss_index_with(searcher, spec["nprobe"])
        single_found, single_s = timed_search(single, queries, 10)
        single_recall = recall_at(single_found, exact)
        del searcher, single
        by_shard = IndexSearcher(index_dir, combine="shards")
        by_shard.index.search(queries[:10], 10)
        _, by_shard_s = timed_search(by_shard.index, queries, 10)
        del by_shard

        pq_row = None
        nlist = spec["nlist"] or fx.default_nlist(n)
        pq_factory = args.pq or f"IVF{nlist},PQ{max(1, d // 8)}"
        if pq_factory != "none":
            print(f"IVF-PQ build ({pq_factory}) ...", flush=True)
            pq_built, pq_s = staged_run(Path(tmp) / "index-pq", "build", d, n, x, 0, args, index=pq_factory)
            pq_searcher = IndexSearcher(Path(tmp) / "index-pq")
            # to_rows reads `rows` when called: now this index's shards
            rows = {shard: np.char.lstrip(ids, "v").astype(np.int64) for shard, ids in pq_searcher.ids.items()}
            pq_searcher.index.search(queries[:10], 10)
            pq_found, pq_search_s = timed_search(pq_searcher.index, queries, 10)
            pq_searcher.spec.refine = 0  # the codes' own scores, for comparison
            plain_found, _ = timed_search(pq_searcher.index, queries, 10, repeats=1)
            pq_row = (pq_built, pq_s, pq_search_s, recall_at(to_rows(pq_found), exact),
                      fx.estimated_index_bytes(f"IVF{nlist},Flat", n, d, pq_built["counts"]["shards"]),
                      recall_at(to_rows(plain_found), exact))
            del pq_searcher

        print(f"update: {n_new} new vectors ({args.update_fraction:.1%}) ...", flush=True)
        updated, update_s = staged_run(index_dir, "update", d, n + n_new, new, n, args)
        um = updated["metrics"]

    print(f"\n=== index_scale results ({os.cpu_count()} CPUs; {load()} at the end: other work on the machine inflates times) ===")
    print(f"vectors {n} x {d}; {built['counts']['shards']} shards of {spec['factory']}; nprobe {spec['nprobe']} "
          f"(tuned by the build: recall@10 {built['recall']['recall']:.4f} on its {built['recall']['queries']} sampled vectors)")
    print(f"build (sharded, library): total {build_s:.1f}s = partitions {build_s - m['index_seconds']:.1f}s "
          f"+ sample {m['sample_seconds']:.1f}s + train {m['train_seconds']:.1f}s + shards {m['shards_seconds']:.1f}s "
          f"+ exact neighbours of the recall sample {m['exact_seconds']:.1f}s + recall/nprobe tuning {m['recall_seconds']:.1f}s + checksums {m['checksum_seconds']:.1f}s")
    print(f"build (unsharded faiss, same spec): train {single_train:.1f}s + add {single_add:.1f}s = {single_train + single_add:.1f}s")
    print(f"  ratio sharded/unsharded: faiss work (train + shards) {faiss_s / (single_train + single_add):.2f}, "
          f"whole versioned build {build_s / (single_train + single_add):.2f}")
    print(f"exact search: {exact_s:.2f}s for {len(queries)} queries ({exact_s / len(queries) * 1e3:.2f} ms/query)")
    print(f"sharded IVF:  {sharded_s:.3f}s ({sharded_s / len(queries) * 1e3:.3f} ms/query), recall@10 {sharded_recall:.4f}, "
          f"speed-up {exact_s / sharded_s:.1f}x  -> recall {'PASS' if sharded_recall >= 0.95 else 'FAIL'} (>= 0.95), "
          f"speed {'PASS' if exact_s / sharded_s >= 50 else 'FAIL'} (>= 50x)")
    print(f"unsharded:    {single_s:.3f}s, recall@10 {single_recall:.4f} (same nprobe); sharded/unsharded time "
          f"{sharded_s / single_s:.2f} -> {'PASS' if sharded_s <= single_s * 1.05 else 'FAIL'} (no slower; 5% for noise)")
    print(f"  the sharded index as searched by default: {open_s:.1f}s to open the version the first time (its shards' "
          f"lists merged into one memory-mapped file, once per version); shard by shard (--combine shards) "
          f"{by_shard_s:.3f}s, {by_shard_s / single_s:.2f}x unsharded")
    for nprobe, r, s in curve:
        print(f"  nprobe {nprobe:>3}: recall@10 {r:.4f}, {s / len(queries) * 1e3:.3f} ms/query, speed-up {exact_s / s:.1f}x")
    print(f"update (+{n_new}): {update_s:.2f}s = {update_s / build_s:.2%} of the full build "
          f"({'PASS' if update_s / build_s <= 0.02 else 'FAIL'} <= 2%); shards "
          f"{[s['source'] for s in updated['shards']].count('reused')} reused + "
          f"{[s['source'] for s in updated['shards']].count('new')} new; recall@10 after update "
          f"{updated['recall']['recall']:.4f} on {updated['recall']['queries']} queries (nprobe {updated['faiss']['nprobe']}); "
          f"update phases: shards {um['shards_seconds']:.2f}s, recall {um['recall_seconds']:.2f}s, checksums {um['checksum_seconds']:.2f}s")
    print(f"index size on disk: {m['index_bytes'] / 2**30:.2f} GiB faiss (+ Parquet embeddings with mu and sigma)")
    print(f"peak RSS: {peak_build:.2f} GiB after the sharded build (incl. the {n * d * 4 / 2**30:.2f} GiB of vectors the benchmark holds), "
          f"{peak_gib():.2f} GiB overall (adds the unsharded index and exact search)")
    if pq_row is not None:
        report_pq(args, pq_row, exact_s, len(queries), n, d)


def report_pq(args, pq_row, exact_s: float, n_queries: int, n: int, d: int) -> None:
    """The IVF-PQ row, and what the same index would take for ``--estimate-n`` vectors."""
    from idml.index import spec as fx
    from idml.index.request import DEFAULT_SHARD_ROWS

    built, build_s, search_s, recall, ivf_flat_bytes, plain_recall = pq_row
    spec, m = built["faiss"], built["metrics"]
    print(f"IVF-PQ {spec['factory']}: faiss files {m['index_bytes'] / 2**20:.1f} MiB (estimated {fx.format_bytes(spec['estimated_bytes'])}) "
          f"= {m['index_bytes'] / ivf_flat_bytes:.3f}x IVF-Flat's {fx.format_bytes(ivf_flat_bytes)}, + exact vectors for re-scoring "
          f"{m.get('exact_vector_bytes', 0) / 2**20:.1f} MiB on disk; nprobe {spec['nprobe']} "
          f"(build sample recall@10 {built['recall']['recall']:.4f}, {built['recall']['query_ms']:.2f} ms/query alone)")
    print(f"  held-out queries: recall@10 {recall:.4f} vs exact re-scored ({spec.get('refine', 0)}x k candidates; "
          f"{plain_recall:.4f} on the codes' scores alone), {search_s / n_queries * 1e3:.3f} ms/query, "
          f"speed-up {exact_s / search_s:.1f}x; build {build_s:.1f}s (train {m['train_seconds']:.1f}s, shards {m['shards_seconds']:.1f}s)")

    # Paper estimate: the same code size at N vectors. Coarse assignment costs O(nlist) per
    # vector and k-means O(training points * nlist): measured times are scaled by those.
    big_n = args.estimate_n
    code = re.search(r"PQ(\d+)", spec["factory"])
    m_bytes = int(code.group(1)) if code else max(1, d // 8)
    big_nlist = fx.default_nlist(big_n)
    big = f"IVF{big_nlist},PQ{m_bytes}"
    shards = math.ceil(big_n / DEFAULT_SHARD_ROWS)
    total = fx.estimated_index_bytes(big, big_n, d, shards)
    codebooks = 256 * d * 4  # in trained.faiss and in every shard file (the centroids only in trained.faiss)
    per_shard = big_n / shards * (m_bytes + fx.IDS_BYTES) + codebooks
    node = fx.parse_bytes(args.node_memory)
    per_node = int(node * 0.5 // per_shard)  # half a node for the index; the rest for the OS, page cache, serving
    nlist_scale = big_nlist / max(1, spec["nlist"])
    add_rate = n / max(m["shards_seconds"], 1e-9)  # vectors per second, this machine, this nlist
    train_s = m["train_seconds"] * nlist_scale * (fx.TRAIN_POINTS_PER_LIST * big_nlist / max(1, spec["train_size"]))
    add_s = big_n / add_rate * nlist_scale
    print(f"paper estimate, {big_n:,} x {d} as {big}: {fx.format_bytes(total)} in {shards} shards of {DEFAULT_SHARD_ROWS:,} "
          f"({fx.format_bytes(per_shard)} each, {fx.format_bytes(codebooks)} of it its copy of the codebooks; the "
          f"{fx.format_bytes(big_nlist * d * 4)} of centroids once per node); {per_node} shards per "
          f"{args.node_memory} node at half its memory -> {math.ceil(shards / max(per_node, 1))} node(s)")
    print(f"  build on one driver like this machine ({os.cpu_count()} CPUs; embedding not counted): train ~{train_s / 60:.0f} min "
          f"(scaled by nlist x training points from {m['train_seconds']:.1f}s) + add ~{add_s / 3600:.1f} h ({add_rate:,.0f} vectors/s here, "
          f"scaled by nlist); a GPU trains k-means ~100x faster, and adds scale with the driver's cores")


def faiss_index_with(searcher, nprobe: int):
    from idml.index.tuning import set_nprobe

    set_nprobe(searcher.index.index, nprobe)
    return searcher.index


if __name__ == "__main__":
    sys.exit(main())
