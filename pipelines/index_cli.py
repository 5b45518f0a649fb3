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
from .index_args import INDEX_BUSY, UP_TO_DATE, add_index_args


def build_parser() -> argparse.ArgumentParser:
    """``python -m pipelines.index_cli``: ``idml index`` as a command of its own (scheduled
    updates, ``ray job submit``), with the same arguments."""
    parser = argparse.ArgumentParser(prog="idml index", description="Embed image corpora and build versioned, sharded faiss indexes")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, Ray's own logs, and tracebacks on errors")
    add_index_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:
        for noisy in ("ray", "ray.data", "faiss.loader"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return run_command(lambda: run_index(args), prog="idml index", verbose=args.verbose)


def run_index(args: argparse.Namespace) -> int:
    """Another writer holding the index is no error of the user's nor ours: a scheduled run
    that overlaps the previous one exits with its own code and a line saying who holds it."""
    from idml.index.store import IndexLockedError

    handlers = {"build": _build_or_update, "update": _build_or_update, "query": _query, "verify": _verify,
                "versions": _versions, "publish": _publish, "prune": _prune}
    try:
        return handlers[args.index_command](args)
    except IndexLockedError as e:
        print(f"idml index: {e}", file=sys.stderr)
        return INDEX_BUSY


# -- commands -------------------------------------------------------------------------------
def _build_or_update(args) -> int:
    from idml.index.build import BuildIndexRequest, build_index, format_build_summary

    from .index import DELAY_ENV, RayEmbedding, parse_actors

    embedding = RayEmbedding(batch_size=args.batch_size, actors=parse_actors(args.actors), threads=args.threads,
                             use_gpu=args.gpu, delay_s=float(os.environ.get(DELAY_ENV, "0") or 0))
    build_only = {k: getattr(args, k) for k in ("index_type", "max_index_bytes", "nlist", "train_size", "shards", "refine")
                  if hasattr(args, k)}
    request = BuildIndexRequest(
        args.index_dir, args.index_command, checkpoint=args.checkpoint, corpus=args.corpus, splits=args.split,
        follow_links=args.follow_links, nprobe=args.nprobe, recall_sample=args.recall_sample,
        target_recall=args.target_recall, max_query_ms=args.max_query_ms, wait_s=args.wait,
        experiment=None if args.no_mlflow else args.experiment, tracking_uri=args.tracking_uri, **build_only)
    result = build_index(request, embed=embedding, progress=_say)
    print(format_build_summary(result, nothing_published=f"exit {UP_TO_DATE}: nothing published"))
    return 0 if result.published else UP_TO_DATE


def _say(message: str) -> None:
    print(message, flush=True)


def _query(args) -> int:
    import numpy as np

    from idml.index import format_results
    from idml.index.query import QueryRequest, query_index

    if args.json:  # a bad output path is refused before the work, not after it
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    response = query_index(QueryRequest(
        args.index_dir, ids=args.ids, images=args.images, version=args.version, checkpoint=args.checkpoint, k=args.k,
        rerank=args.rerank, rerank_k=args.rerank_k, uncertainty_weight=args.uncertainty_weight, nprobe=args.nprobe,
        refine=args.refine, combine=args.combine, gpu=args.gpu, min_confidence=args.min_confidence))
    reranked = response.uncertainty_weight is not None
    print(f"index {response.version}: {response.vectors} vectors" + (
        f"; re-ranked by the introspective distance (lambda {response.uncertainty_weight:g})" if reranked else ""))
    print(format_results(response.results, reranked=reranked))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(response.to_json(), f, indent=2, default=lambda x: float(x) if isinstance(x, np.floating) else str(x))
    return 0


def _verify(args) -> int:
    from idml.index.verify import VerifyRequest, verify_version

    from .index import listing_with_ray

    result = verify_version(VerifyRequest(args.index_dir, args.version, args.corpus, checksums=not args.no_checksums),
                            list_corpus=listing_with_ray)
    print(f"verify {result.version}: {'FAILED' if result.problems else 'OK'}")
    for problem in result.problems:
        print(f"  {problem}")
    return 1 if result.problems else 0


def _versions(args) -> int:
    from idml.index import IndexStore
    from idml.index.versions import format_versions, list_versions

    store = IndexStore(args.index_dir)
    rows = list_versions(store)
    print(json.dumps([asdict(r) for r in rows], indent=2) if args.json else format_versions(rows, store.root))
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
    print(result.describe(dry_run=args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
