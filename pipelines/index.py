"""Batch indexing of image corpora on Ray (the commands are ``pipelines.index_cli``: ``idml index``).

Ray Data reads the corpus files a run needs (the sharded Parquet dataset format, or a folder /
URI of raw images via ``read_binary_files``), embeds them with ``idml.index.BatchEmbedder`` in
``map_batches`` on an autoscaling actor pool, and the driver streams the embeddings into
resumable partitions. The model reaches every actor through Ray's object store (put once by the
driver), never as a path: a checkpoint on the driver's disk, or one the driver downloaded from
MLflow or S3, is not on the other nodes. Everything else (faiss shards, versions, recall,
verification, queries) is ``idml.index``; this module only wires it to Ray and MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from idml.index.build import Embedded
from idml.index.embed import BatchEmbedder

from ._capacity import Request, refuse_unless_it_fits
from ._ray import init_ray

log = logging.getLogger(__name__)

# Seconds each embedding batch sleeps: lets the crash test kill a build between two partitions.
DELAY_ENV = "IDML_INDEX_EMBED_DELAY_S"
# Model batches per Ray Data block, i.e. per call of an embedding actor.
BATCHES_PER_BLOCK = 4


def ensure_ray():
    """Ray, initialised once: connects to $RAY_ADDRESS when set, else starts a local instance."""
    return init_ray(log_to_driver=False)


def _read(corpus, files: list[str]):
    import ray.data

    if corpus.kind == "dataset":
        # include_paths: each row names its shard, which the next update compares by stat.
        ds = ray.data.read_parquet(files, filesystem=corpus.filesystem, include_paths=True)
        return ds.select_columns(["id", "image", "path"]), None
    return ray.data.read_binary_files(files, filesystem=corpus.filesystem, include_paths=True), corpus.root


@contextlib.contextmanager
def block_size(corpus, batch_size: int):
    """Read blocks of about one embedding call (``BATCHES_PER_BLOCK`` batches) for this job. Ray
    Data keeps a task's output together up to this size, and its default (128 MiB) would put a
    whole shard in one block: ``whole_batch_blocks`` would then hand the actor pool that shard as
    one bundle (one actor, its embeddings held back until the shard is done). Small blocks keep
    embeddings streaming into partitions (which then finish, and survive a crash, while the job
    runs) and spread a small corpus over the whole actor pool."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old = ctx.target_max_block_size
    row_bytes = max(1, corpus.num_bytes // max(1, corpus.num_rows))
    ctx.target_max_block_size = int(min(old or 128 << 20, max(1 << 10, BATCHES_PER_BLOCK * batch_size * row_bytes)))
    try:
        yield
    finally:
        ctx.target_max_block_size = old


def whole_batch_blocks(ds, batch_size: int):
    """``ds`` in blocks of exactly ``BATCHES_PER_BLOCK`` model batches (the last one shorter),
    each one call of an embedding actor, which runs the model batch by batch. Ray's per-call work
    (slicing, an output block, scheduling) is paid once per few batches, and the model never gets
    the tail of a read block as a tiny batch (blocks of 260 rows were called as 64, 64, 64, 64 and
    4 images; a batch of 4 costs 2.4x the CPU per image of one of 64). Ray Data's streaming
    repartition (experimental in Ray 2.60) costs one small task per block, 0.016 ms/image."""
    return ds.repartition(target_num_rows_per_block=BATCHES_PER_BLOCK * batch_size, strict=True)


@dataclass(frozen=True)
class ActorPool:
    """The embedding actor pool: Ray Data starts ``min_actors`` and adds actors up to
    ``max_actors`` while work is queued; actors the cluster cannot hold yet are resource
    requests the Ray autoscaler answers by starting nodes (GPU nodes for ``num_gpus``)."""

    min_actors: int
    max_actors: int
    num_cpus: float
    num_gpus: int
    threads: int  # torch threads per actor (0: torch's default)

    def strategy(self):
        import ray.data

        return ray.data.ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors)

    def describe(self) -> str:
        size = f"{self.min_actors}" if self.min_actors == self.max_actors else f"{self.min_actors}-{self.max_actors}"
        each = f"1 GPU + {self.num_cpus:g} CPU each" if self.num_gpus else f"{self.num_cpus:g} CPU, {self.threads} threads each"
        return f"{size} actor(s), {each}"


def parse_actors(text: str) -> tuple[int, int]:
    """``--actors``: ``N`` (a fixed pool) or ``MIN-MAX`` (autoscaling); 0 or empty: the default."""
    text = text.strip()
    try:
        low, high = (text.split("-", 1) if "-" in text else (text, text))
        low, high = int(low), int(high)
    except ValueError:
        raise ValueError(f"--actors {text!r}: give a number of actors (e.g. 4) or a range MIN-MAX (e.g. 1-8)") from None
    if low < 0 or high < low or (high == 0) != (low == 0):
        raise ValueError(f"--actors {text!r}: need 1 <= MIN <= MAX (or 0 for the default)")
    return low, high


def actor_pool(cpus: int, gpus: int, *, actors: tuple[int, int] = (0, 0), threads: int = 0,
               use_gpu: bool = False) -> ActorPool:
    """The pool for a cluster with ``cpus``/``gpus`` now. GPU actors (one GPU each) when
    ``use_gpu`` or the cluster has GPUs; by default as many as there are GPUs now (at least
    one, which an autoscaling cluster starts a GPU node for). CPU actors run ``threads`` torch
    threads (default min(4, CPUs)); by default as many as fit now. On CPU the pool reserves less
    than it uses (at most cpus - 1 among the actors that fit now), so a CPU is left for Ray
    Data's list/read tasks: with every CPU held by actors the job would wait for its input forever.
    ``actors``: (min, max) from ``--actors``; (0, 0) for the default."""
    low, high = actors
    if use_gpu or gpus:
        default = max(1, gpus)
        return ActorPool(low or default, high or default, 1, 1, threads or 0)
    threads = threads or max(1, min(4, cpus))
    fit = max(1, cpus // threads)
    low, high = (low, high) if low else (fit, fit)
    budget = cpus - 1 if cpus >= 2 else cpus / 2
    return ActorPool(low, high, round(min(threads, budget / min(high, fit)), 3), 0, threads)


class ObjectStoreEmbedder(BatchEmbedder):
    """``BatchEmbedder`` on a Ray actor: the model and the known (id, hash) table come from the
    object store, so no actor opens a path of the driver's machine. Each output row names the
    node that embedded it (the driver counts rows per node for the manifest)."""

    def __init__(self, refs: dict, **kwargs):
        import ray

        # In a dict, the refs stay refs through Ray Data's constructor args; fetched here, once per actor.
        super().__init__(ray.get(refs["model"]), known=ray.get(refs["known"]), **kwargs)
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, batch) -> pa.Table:
        out = super().__call__(batch)
        return out.append_column("node", pa.array([self.node_id] * out.num_rows, pa.string()))


def _embedding_step(ds, refs: dict, id_prefix, pool: ActorPool, batch_size: int, delay_s: float):
    """``ds`` embedded by ``pool``'s actors (lazily: nothing runs until it is iterated)."""
    return ds.map_batches(
        ObjectStoreEmbedder,
        fn_constructor_args=(refs,),
        fn_constructor_kwargs={"id_prefix": id_prefix, "threads": pool.threads, "batch_size": batch_size,
                               "delay_s": delay_s},
        batch_size=BATCHES_PER_BLOCK * batch_size,  # a whole block per call
        batch_format="pyarrow",
        compute=pool.strategy(),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        # Ray Data puts every actor's constructor arguments (its map transformer) in the object
        # store, and Ray logs an error for each such actor created with restarts allowed (Ray
        # Data's default, -1): a line on every build. A lost actor fails the build instead;
        # its finished partitions stay, and the same command resumes from them.
        max_restarts=0,
    )


@dataclass
class EmbedReport:
    seconds: float
    pool: ActorPool
    rows_by_node: dict[str, int] = field(default_factory=dict)

    def manifest_entry(self) -> dict:
        return {"actors": self.pool.describe(), "model_via": "ray object store", "rows_by_node": self.rows_by_node}


def embed_with_ray(corpus, files: list[str], model_state: dict, sink, known, *, batch_size: int = 64,
                   actors: tuple[int, int] = (0, 0), threads: int = 0, use_gpu: bool = False,
                   delay_s: float = 0.0) -> EmbedReport:
    """Embed ``files`` of ``corpus`` with the checkpoint ``model_state`` (loaded by the driver,
    shipped to the actors by ``ray.put``) into ``sink``; images in ``known`` are hashed only."""
    import ray.data
    from tqdm.auto import tqdm

    ray = ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    cluster = ray.cluster_resources()
    pool = actor_pool(int(cluster.get("CPU", 1)), int(cluster.get("GPU", 0)), actors=actors, threads=threads,
                      use_gpu=use_gpu)
    # One actor: Ray Data embeds with the actors that start (more --actors than fit only wait
    # unused), so only an actor that no node can hold waits forever.
    refuse_unless_it_fits(Request("embedding actor", {"CPU": pool.num_cpus, "GPU": float(pool.num_gpus)}, 1,
                                  fix="lower --threads" + ("; --gpu needs a GPU on a node" if pool.num_gpus else "")))
    refs = {"model": ray.put(model_state), "known": ray.put(known)}
    nodes: Counter = Counter()
    with block_size(corpus, batch_size):
        ds, id_prefix = _read(corpus, files)
        with warnings.catch_warnings():
            # max_restarts has no named parameter in Ray 2.60: only the deprecated **ray_remote_args.
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            embedded = _embedding_step(whole_batch_blocks(ds, batch_size), refs, id_prefix, pool, batch_size, delay_s)
        log.info("embedding %d file(s) with %s", len(files), pool.describe())
        start = time.time()
        # Rows per file are known only when every file is read (or each file is one image).
        total = corpus.num_rows if len(files) == len(corpus.files) else len(files) if corpus.kind == "images" else None
        # No prefetch: with it, Ray Data yields each block only once the next one is embedded, so
        # embeddings reached the partitions a block late (the last two blocks together).
        batches = iter(embedded.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
        # closing: on Ctrl-C the execution stops here, not in a thread that outlives Ray's shutdown.
        with tqdm(total=total, desc="embed", unit="img", disable=not sys.stderr.isatty()) as bar, \
                contextlib.closing(batches):
            for batch in batches:
                nodes.update(batch.column("node").to_pylist())
                sink.add(batch.drop_columns(["node"]))
                bar.update(batch.num_rows)
        sink.close()
    return EmbedReport(time.time() - start, pool, dict(nodes))


@dataclass(frozen=True)
class RayEmbedding:
    """The embedding step of ``idml.index.build.build_index`` on a Ray Data actor pool
    (``embed_with_ray``), as ``idml index build|update`` runs it."""

    batch_size: int = 64
    actors: tuple[int, int] = (0, 0)
    threads: int = 0
    use_gpu: bool = False
    delay_s: float = 0.0

    def __call__(self, corpus, files: list[str], model: dict, sink, known) -> Embedded:
        report = embed_with_ray(corpus, files, model, sink, known, batch_size=self.batch_size, actors=self.actors,
                                threads=self.threads, use_gpu=self.use_gpu, delay_s=self.delay_s)
        return Embedded(report.seconds, report.manifest_entry())


def listing_with_ray(corpus):
    """(id, content_hash) of every corpus image, hashed in Ray tasks."""
    from idml.index.embed import hash_batch

    ensure_ray()
    ds, id_prefix = _read(corpus, corpus.files)
    hashed = ds.map_batches(hash_batch, fn_kwargs={"id_prefix": id_prefix}, batch_format="pyarrow", batch_size=256)
    tables = list(hashed.iter_batches(batch_size=None, batch_format="pyarrow"))
    schema = pa.schema([("id", pa.string()), ("content_hash", pa.string())])
    return pa.concat_tables([t.cast(schema) for t in tables] or [schema.empty_table()])
