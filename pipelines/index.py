"""Batch indexing of image corpora on Ray (the commands are ``pipelines.index_cli``: ``idml index``).

Ray Data reads the corpus (the sharded Parquet dataset format, or a folder / URI of raw images
via ``read_binary_files``), embeds it with ``idml.index.BatchEmbedder`` in ``map_batches`` on an
actor pool (the model loads once per actor; one GPU per actor when the cluster has GPUs), and
the driver streams the embeddings into resumable partitions. Everything else (faiss shards,
versions, recall, verification, queries) is ``idml.index``; this module only wires it to Ray
and MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from ._ray import init_ray

log = logging.getLogger(__name__)

# Seconds each embedding batch sleeps: lets the crash test kill a build between two partitions.
DELAY_ENV = "IDML_INDEX_EMBED_DELAY_S"


def ensure_ray():
    """Ray, initialised once: connects to $RAY_ADDRESS when set, else starts a local instance."""
    return init_ray(log_to_driver=False)


def _read(corpus):
    import ray.data

    if corpus.kind == "dataset":
        return ray.data.read_parquet(corpus.files, filesystem=corpus.filesystem).select_columns(["id", "image"]), None
    return ray.data.read_binary_files(corpus.files, filesystem=corpus.filesystem, include_paths=True), corpus.root


@contextlib.contextmanager
def block_size(corpus, batch_size: int):
    """Blocks of about four batches for this job. Ray Data hands a map's output back block by
    block, and its default (128 MiB) would hold back thousands of embeddings at a time: small
    blocks keep embeddings streaming into partitions (which then finish, and survive a crash,
    while the job runs) and spread a small corpus over the whole actor pool."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old = ctx.target_max_block_size
    row_bytes = max(1, corpus.num_bytes // max(1, corpus.num_rows))
    ctx.target_max_block_size = int(min(old or 128 << 20, max(1 << 10, 4 * batch_size * row_bytes)))
    try:
        yield
    finally:
        ctx.target_max_block_size = old


def actor_resources(cpus: int, gpus: int, *, actors: int = 0, threads: int = 0) -> dict:
    """Embedding actor pool: one actor per GPU, else ``cpus // threads`` actors of ``threads``
    torch threads. On CPU the pool reserves less than it uses (at most cpus - 1 in all), so a
    CPU is left for Ray Data's list/read tasks: with every CPU held by actors the job would wait
    for its input forever."""
    if gpus:
        return {"actors": actors or gpus, "num_gpus": 1, "num_cpus": 1, "threads": threads or 0}
    threads = threads or max(1, min(4, cpus))
    actors = actors or max(1, cpus // threads)
    budget = cpus - 1 if cpus >= 2 else cpus / 2
    return {"actors": actors, "num_gpus": 0, "num_cpus": round(min(threads, budget / actors), 3), "threads": threads}


def embed_with_ray(corpus, checkpoint: str, sink, known, *, batch_size: int = 64, actors: int = 0,
                   threads: int = 0, delay_s: float = 0.0) -> float:
    """Embed every image of ``corpus`` not in ``known`` into ``sink``; returns seconds spent."""
    import ray.data
    from tqdm.auto import tqdm

    from idml.index.embed import BatchEmbedder

    ray = ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    cluster = ray.cluster_resources()
    res = actor_resources(int(cluster.get("CPU", 1)), int(cluster.get("GPU", 0)), actors=actors, threads=threads)
    with block_size(corpus, batch_size):
        ds, id_prefix = _read(corpus)
        embedded = ds.map_batches(
            BatchEmbedder,
            fn_constructor_args=(checkpoint,),
            fn_constructor_kwargs={"known": known, "id_prefix": id_prefix, "threads": res["threads"], "delay_s": delay_s},
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=res["actors"]),
            num_cpus=res["num_cpus"],
            num_gpus=res["num_gpus"],
        )
        log.info("embedding %d images with %d actor(s) (%s)", corpus.num_rows, res["actors"],
                 f"{res['num_gpus']} GPU each" if res["num_gpus"] else f"{res['threads']} threads each")
        start = time.time()
        with tqdm(total=corpus.num_rows, desc="embed", unit="img", disable=not sys.stderr.isatty()) as bar:
            for batch in embedded.iter_batches(batch_size=None, batch_format="pyarrow"):
                sink.add(batch)
                bar.update(batch.num_rows)
        sink.close()
    return time.time() - start


def listing_with_ray(corpus):
    """(id, content_hash) of every corpus image, hashed in Ray tasks."""
    import pyarrow as pa

    from idml.index.embed import hash_batch

    ensure_ray()
    ds, id_prefix = _read(corpus)
    hashed = ds.map_batches(hash_batch, fn_kwargs={"id_prefix": id_prefix}, batch_format="pyarrow", batch_size=256)
    tables = list(hashed.iter_batches(batch_size=None, batch_format="pyarrow"))
    schema = pa.schema([("id", pa.string()), ("content_hash", pa.string())])
    return pa.concat_tables([t.cast(schema) for t in tables] or [schema.empty_table()])
