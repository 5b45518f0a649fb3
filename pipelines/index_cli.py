"""``idml index build|update|query|verify|versions|publish|prune``: the command line of batch
indexing (the Ray side is ``pipelines.index``; everything else is ``idml.index``).

Exit codes: 0 done (a version published, or nothing to do for publish/prune/query/verify);
1 failure (or ``verify`` found problems); 2 bad input; 3 ``update`` found nothing changed in the
corpus and published nothing; 4 another writer (build, update, publish, prune) holds the index
folder (``--wait SECONDS`` waits for it); 130 Ctrl-C."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from ._errors import run_command

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "idml-index"
UP_TO_DATE = 3  # `update`: nothing changed in the corpus, nothing published
INDEX_BUSY = 4  # another writer holds the index folder


def _at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``, refused before any work starts."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _recall(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _memory(text: str) -> int:
    from idml.index.spec import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from idml.index.kinds import NAMED_INDEXES

    parser = argparse.ArgumentParser(prog="idml index", description="Embed image corpora and build versioned, sharded faiss indexes")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, Ray's own logs, and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_wait_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--wait", type=_at_least(0), default=0, metavar="SECONDS",
                       help=f"wait up to this long for another writer of the index folder (default: exit {INDEX_BUSY} at once)")

    def add_writer_args(p: argparse.ArgumentParser, *, update: bool) -> None:
        default = " (default: the one the published version used)" if update else ""
        p.add_argument("--index-dir", required=True, help="folder holding the index versions")
        p.add_argument("--checkpoint", required=not update,
                       help="trained idml checkpoint: a path, a shared-storage URI (s3://...) or an MLflow model "
                            "(models:/NAME@alias, models:/NAME/3, runs:/RUN_ID/model); read on the driver only" + default)
        p.add_argument("--corpus", required=not update,
                       help="dataset folder (sharded Parquet format) or folder/URI of raw images" + default)
        p.add_argument("--split", nargs="*", default=None, help="dataset splits to index (default: all)" + default)
        p.add_argument("--follow-links", action="store_true", default=None,
                       help="also index images linked from outside the corpus folder (skipped and counted otherwise)" + default)
        p.add_argument("--nprobe", type=_at_least(1), help="IVF lists probed per query (default: tuned to --target-recall)")
        p.add_argument("--max-query-ms", type=_milliseconds, metavar="MS",
                       help="latency budget of the tuning: nprobe (IVF) or efSearch (HNSW) stops growing when one query "
                            "would take longer, even below --target-recall (default: no budget)")
        p.add_argument("--recall-sample", type=_at_least(1), default=256, help="stored vectors used to measure recall@10 against exact search")
        p.add_argument("--target-recall", type=_recall, default=0.95,
                       help="recall@10 (vs exact search, on --recall-sample vectors) the nprobe/efSearch tuning aims for")
        p.add_argument("--batch-size", type=_at_least(1), default=64, help="images per embedding batch")
        p.add_argument("--actors", default="0", metavar="N|MIN-MAX",
                       help="embedding actors: N (a fixed pool) or MIN-MAX (autoscaling: Ray Data adds actors while "
                            "work is queued, the Ray autoscaler adds nodes for them); default: one per GPU, or what fits the CPUs now")
        p.add_argument("--threads", type=_at_least(0), default=0, help="torch threads per CPU actor (default: min(4, CPUs))")
        p.add_argument("--gpu", action="store_true",
                       help="one GPU per actor (mixed precision), also on a cluster with no GPU node running yet "
                            "(default: GPU actors only when the cluster has GPUs now)")
        add_wait_arg(p)
        p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)")
        p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")

    build = sub.add_parser("build", help="embed the whole corpus and publish a new index version")
    add_writer_args(build, update=False)
    named = {name: factory("<nlist>") for name, factory in NAMED_INDEXES.items()}
    build.add_argument("--index", dest="index_type", default="auto", metavar="|".join(["auto", *named, "FACTORY"]),
                       help="auto: exact Flat up to 200k vectors, IVF-Flat above (with --max-index-memory: Flat, IVF-Flat "
                            "or IVF-PQ, whichever fits); "
                            + "; ".join(f"{name} ({factory})" for name, factory in named.items())
                            + "; or a faiss index_factory string searching by inner product, e.g. 'IVF4096,PQ64', "
                            "'IVF1024,SQ8', 'HNSW32' (checked before embedding)")
    build.add_argument("--max-index-memory", dest="max_index_bytes", type=_memory, metavar="SIZE",
                       help="memory budget of the index, e.g. 8GB or 512MiB: --index auto picks the best index that "
                            "fits it; any other --index is refused if its estimate exceeds it")
    build.add_argument("--nlist", type=_at_least(1), help="IVF lists for --index auto/ivf (default: ~sqrt(n), a power of two)")
    build.add_argument("--train-size", type=_at_least(1), help="vectors sampled to train the IVF quantizer (default: 64 * nlist)")
    build.add_argument("--shards", type=_at_least(1), help="index shards = embedding partitions (default: one per 250k images)")
    build.add_argument("--refine", type=_at_least(0), metavar="N",
                       help="lossy indexes (PQ, SQ): searches re-score N x k candidates by exact cosine, and the "
                            "recall tuning measures them so (default: 10); 0 or 1: off, and no exact vector files are "
                            "kept (saves n x d x 4 bytes of disk). Refused for exact indexes. An update keeps it")

    update = sub.add_parser("update", help="embed only new and changed images, drop removed ones, publish a new version "
                                           f"(exit {UP_TO_DATE}: nothing changed, nothing published)")
    add_writer_args(update, update=True)

    query = sub.add_parser("query", help="top-k neighbours of query images or indexed ids")
    query.add_argument("--index-dir", required=True, help="folder holding the index versions")
    query.add_argument("--version", help="index version (default: the published one)")
    what = query.add_mutually_exclusive_group(required=True)
    what.add_argument("--ids", nargs="+", help="ids of indexed images (each is left out of its own results)")
    what.add_argument("--images", nargs="+", help="image files or URIs, embedded with the index's checkpoint")
    query.add_argument("--checkpoint", help="checkpoint for --images (default: the index's; its hash must match)")
    query.add_argument("--k", type=_at_least(1), default=10, help="neighbours per query (default: 10)")
    query.add_argument("--rerank", action="store_true", help="re-rank candidates by the introspective distance")
    query.add_argument("--rerank-k", type=_at_least(1), help="candidates re-ranked (default: max(10k, 100))")
    query.add_argument("--lambda", dest="uncertainty_weight", type=float,
                       help="uncertainty weight for --rerank (default: the checkpoint's loss.uncertainty_weight)")
    query.add_argument("--nprobe", type=_at_least(1), help="override the version's tuned nprobe (IVF)")
    query.add_argument("--refine", type=_at_least(0), metavar="N",
                       help="lossy indexes (PQ, SQ): re-score N x k candidates by exact cosine (default: the version's, "
                            "set by build --refine, as its recall was measured; 0 or 1: off, the codes' approximate scores)")
    query.add_argument("--combine", choices=("auto", "shards", "ondisk"), default="auto",
                       help="shards: search the shard files together; ondisk: merge IVF shards' lists once per version "
                            "into the index folder's cache/ and memory-map that (as fast as one index; sharded IVF search "
                            "is 1.6-1.9x slower); auto (default): ondisk for IVF with several shards, else shards")
    query.add_argument("--json", help="also write the results here")
    query.add_argument("--gpu", action="store_true", help="search an exact (Flat) index on the GPUs faiss sees (faiss-gpu)")

    verify = sub.add_parser("verify", help="check a version's files, checksums, counts and ids")
    verify.add_argument("--index-dir", required=True, help="folder holding the index versions")
    verify.add_argument("--version", help="default: the published one")
    verify.add_argument("--corpus", nargs="?", const="", default=None, metavar="URI",
                        help="also check that every corpus image is indexed with its current content "
                             "(no value: the corpus the version was built from)")
    verify.add_argument("--no-checksums", action="store_true", help="skip hashing the files (faster)")

    versions = sub.add_parser("versions", help="list the index versions: created, vectors, model, parent, which is CURRENT")
    versions.add_argument("--index-dir", required=True, help="folder holding the index versions")
    versions.add_argument("--json", action="store_true", help="print JSON instead of a table")

    publish = sub.add_parser("publish", help="point CURRENT at an existing, sound version (a rollback, or forward again)")
    publish.add_argument("version", help="the version to publish, e.g. v000002 (see `idml index versions`)")
    publish.add_argument("--index-dir", required=True, help="folder holding the index versions")
    add_wait_arg(publish)

    prune = sub.add_parser("prune", help="delete all but the newest versions (never CURRENT; shared files stay)")
    prune.add_argument("--index-dir", required=True, help="folder holding the index versions")
    prune.add_argument("--keep", type=_at_least(1), required=True, help="newest versions to keep (CURRENT is kept in any case)")
    prune.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    add_wait_arg(prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:
        for noisy in ("ray", "ray.data", "faiss.loader"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    handlers = {"build": _build_or_update, "update": _build_or_update, "query": _query, "verify": _verify,
                "versions": _versions, "publish": _publish, "prune": _prune}
    return run_command(lambda: _unless_busy(handlers[args.command], args), prog="idml index", verbose=args.verbose)


def _unless_busy(handler, args) -> int:
    """Another writer holding the index is no error of the user's nor ours: a scheduled run
    that overlaps the previous one exits with its own code and a line saying who holds it."""
    from idml.index.store import IndexLockedError

    try:
        return handler(args)
    except IndexLockedError as e:
        print(f"idml index: {e}", file=sys.stderr)
        return INDEX_BUSY


# -- commands -------------------------------------------------------------------------------
def _build_or_update(args) -> int:
    from idml.index.build import BuildIndexRequest, build_index

    from .index import DELAY_ENV, RayEmbedding, parse_actors

    embedding = RayEmbedding(batch_size=args.batch_size, actors=parse_actors(args.actors), threads=args.threads,
                             use_gpu=args.gpu, delay_s=float(os.environ.get(DELAY_ENV, "0") or 0))
    build_only = {k: getattr(args, k) for k in ("index_type", "max_index_bytes", "nlist", "train_size", "shards", "refine")
                  if hasattr(args, k)}
    request = BuildIndexRequest(
        args.index_dir, args.command, checkpoint=args.checkpoint, corpus=args.corpus, splits=args.split,
        follow_links=args.follow_links, nprobe=args.nprobe, recall_sample=args.recall_sample,
        target_recall=args.target_recall, max_query_ms=args.max_query_ms, wait_s=args.wait,
        experiment=None if args.no_mlflow else args.experiment, tracking_uri=args.tracking_uri, **build_only)
    result = build_index(request, embed=embedding, progress=_say)
    _print_summary(result.manifest, result.published, result.embedded)
    return 0 if result.published else UP_TO_DATE


def _print_summary(manifest: dict, published: bool, embedded: int) -> None:
    from idml.index.spec import format_bytes

    c, spec = manifest["counts"], manifest["faiss"]
    state = "published" if published else "unchanged (up to date)"
    print(f"\nindex {manifest['version']} {state}")
    tuned = {"ivf": f", nprobe {spec['nprobe']}", "hnsw": f", efSearch {spec.get('ef_search', 0)}"}.get(spec["index_type"], "")
    print(f"  vectors {c['vectors']} in {c['shards']} shard(s), {spec['factory']}{tuned}")
    if spec.get("choice"):
        budget = f" (budget {format_bytes(spec['max_index_bytes'])})" if spec.get("max_index_bytes") else ""
        print(f"  index chosen: {spec['choice']}; estimated memory {format_bytes(spec.get('estimated_bytes', 0))}{budget}")
    if not published:
        print(f"  nothing changed in the corpus: reused all {c['vectors']} vectors; corrupt {c['corrupt']} "
              f"(exit {UP_TO_DATE}: nothing published)")
    else:
        m = manifest["metrics"]
        changes = "".join(f", {k} {c[k]}" for k in ("added", "changed", "removed") if k in c)
        print(f"  images embedded {embedded} (this run){changes}; {_reused(manifest)}; corrupt {c['corrupt']}")
        if "files_read" in c:
            print(f"  corpus files read {c['files_read']}, unchanged and not read {c['files_unchanged']}")
        r = manifest["recall"]
        if spec["index_type"] == "flat":
            recall = "exact search (recall 1)"
        else:
            target = (f" (target {r['target_recall']:g}{', within ' + format(r['max_query_ms'], 'g') + ' ms' if r.get('max_query_ms') else ''}"
                      f"{'' if r.get('reached', True) else ': NOT reached'})" if "target_recall" in r else "")
            latency = f"; {r['query_ms']:.2f} ms/query" if r.get("query_ms") is not None else ""
            recall = f"recall@10 vs exact {r['recall']:.4f} on {r['queries']} sampled vectors{target}{latency}"
        if r.get("refine"):
            recall += f"; lossy codes re-scored by exact cosine ({r['refine']}x k candidates)"
        vectors = f" + exact vectors {m['exact_vector_bytes'] / 2**20:.1f} MiB on disk" if m.get("exact_vector_bytes") else ""
        print(f"  {recall}; index {m['index_bytes'] / 2**20:.1f} MiB{vectors}; {m['build_seconds']:.1f}s")
        for bad in manifest.get("corrupt", [])[:10]:
            print(f"  corrupt: {bad['id']}: {bad['reason']}")


def _reused(manifest: dict) -> str:
    """Vectors this run did not compute: the parent version's and an interrupted run's."""
    c = manifest["counts"]
    parts = [f"{c['reused']} from {manifest['parent']}" if c.get("reused") else "",
             f"{c['resumed']} from the interrupted run" if c.get("resumed") else ""]
    parts = [p for p in parts if p]
    total = c.get("reused", 0) + c.get("resumed", 0)
    return f"reused {total}" + (f" ({' + '.join(parts)})" if parts else "")


def _say(message: str) -> None:
    print(message, flush=True)


def _query(args) -> int:
    import numpy as np

    from idml.index import IndexSearcher, format_results

    if args.json:  # a bad output path is refused before the work, not after it
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    searcher = IndexSearcher(args.index_dir, args.version, combine=args.combine, nprobe=args.nprobe, gpu=args.gpu,
                             refine=args.refine)
    if args.ids:
        mu, u = searcher.lookup(args.ids)
        names, exclude = list(args.ids), list(args.ids)
    else:
        mu, u = _embed_query_images(searcher.manifest, args.images, args.checkpoint)
        names, exclude = list(args.images), None
    results = searcher.search(mu, u, args.k, rerank=args.rerank, rerank_k=args.rerank_k,
                              uncertainty_weight=args.uncertainty_weight, exclude=exclude, names=names)
    print(f"index {searcher.version}: {len(searcher)} vectors" + (
        f"; re-ranked by the introspective distance (lambda {args.uncertainty_weight if args.uncertainty_weight is not None else searcher.uncertainty_weight:g})"
        if args.rerank else ""))
    print(format_results(results, reranked=args.rerank))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"version": searcher.version, "results": [asdict(r) for r in results]}, f, indent=2,
                      default=lambda x: float(x) if isinstance(x, np.floating) else str(x))
    return 0


def _embed_query_images(manifest: dict, images: list[str], checkpoint: str | None):
    import numpy as np

    from idml.index.embed import BatchEmbedder
    from idml.search_service import checkpoint_for_index

    blobs = [_read_query_image(image) for image in images]  # a wrong path is refused before the model loads
    path = checkpoint_for_index(manifest, checkpoint)
    mu, sigma = BatchEmbedder(path).embed_images(blobs, names=[f"query image {i}" for i in images])
    return mu, np.square(sigma).sum(axis=1)


def _read_query_image(image: str) -> bytes:
    import pyarrow.fs as pafs

    from idml.data.source import filesystem_for

    fs, path = filesystem_for(image)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"query image {image} does not exist")
    if kind != pafs.FileType.File:
        raise IsADirectoryError(f"query image {image} is a folder; pass image files")
    with fs.open_input_stream(path) as f:
        return f.read()


def _verify(args) -> int:
    from idml.index import IndexStore, resolve_corpus, verify_against_corpus, verify_index

    store = IndexStore(args.index_dir)
    problems = verify_index(args.index_dir, args.version, checksums=not args.no_checksums)
    version = args.version or store.current_version() or f"({store.root}: nothing published)"
    if args.corpus is not None and not problems:
        manifest = store.read_manifest(version)
        uri = args.corpus or manifest["corpus"]["uri"]
        same_corpus = uri == manifest["corpus"]["uri"]
        splits = manifest["corpus"].get("splits") if same_corpus else None
        corpus = resolve_corpus(uri, splits or None, follow_links=same_corpus and manifest["corpus"].get("follow_links", False))
        from .index import listing_with_ray

        problems += verify_against_corpus(manifest, args.index_dir, listing_with_ray(corpus))
    if problems:
        print(f"verify {version}: FAILED")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"verify {version}: OK")
    return 0


def _versions(args) -> int:
    from idml.index import IndexStore
    from idml.index.versions import list_versions

    store = IndexStore(args.index_dir)
    rows = list_versions(store)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    if not rows:
        print(f"no index versions in {store.root}")
        return 0
    print(f"  {'VERSION':<9} {'CREATED':<25} {'KIND':<6} {'VECTORS':>9}  {'PARENT':<8}  MODEL")
    for r in rows:
        mark = "*" if r.current else " "
        vectors = "" if r.vectors is None else str(r.vectors)
        print(f"{mark} {r.version:<9} {r.created_at or '?':<25} {r.kind or '?':<6} {vectors:>9}  {r.parent or '-':<8}  "
              f"{r.model or '?'}" + ("  CURRENT" if r.current else "") + (f"\n    DAMAGED: {r.problem}" if r.problem else ""))
    if not any(r.current for r in rows):
        print(f"(nothing published: `idml index publish --index-dir {store.root} VERSION`)")
    return 0


def _publish(args) -> int:
    from idml.index import IndexStore
    from idml.index.versions import publish_version

    store = IndexStore(args.index_dir)
    previous = publish_version(store, args.version, wait_s=args.wait)
    vectors = store.read_manifest(args.version)["counts"]["vectors"]
    if previous == args.version:
        print(f"{args.version} is already the published version ({vectors} vectors)")
    else:
        print(f"published {args.version} ({vectors} vectors); CURRENT was {previous or 'not set'}")
    return 0


def _prune(args) -> int:
    from idml.index import IndexStore
    from idml.index.versions import prune_versions

    result = prune_versions(IndexStore(args.index_dir), args.keep, dry_run=args.dry_run, wait_s=args.wait)
    verb = "would delete" if args.dry_run else "deleted"
    if result.removed:
        print(f"{verb} {len(result.removed)} version(s): {', '.join(result.removed)} "
              f"({result.freed_bytes / 2**20:.1f} MiB no kept version shares)")
    else:
        print("nothing to delete")
    print(f"kept: {', '.join(result.kept) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
