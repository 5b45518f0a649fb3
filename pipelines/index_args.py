"""The arguments of ``idml index`` (``pipelines.index_cli`` runs the commands): ``add_index_args`` adds them
to ``idml index``'s parser, as every subcommand of ``pipelines.cli`` does."""

from __future__ import annotations

import argparse

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


class _IndexTypeArg(argparse._StoreAction):
    """``--index``: its help lists ``idml.index.kinds.NAMED_INDEXES``, read only when the help is
    shown: that table imports faiss and torch, which building the ``idml`` parser for any other
    command (``idml data ...``, ``idml --help``) should not pay for."""

    @property
    def help(self) -> str:
        from idml.index.kinds import NAMED_INDEXES

        named = {name: factory("<nlist>") for name, factory in NAMED_INDEXES.items()}
        return ("auto: exact Flat up to 200k vectors, IVF-Flat above (with --max-index-memory: Flat, IVF-Flat "
                "or IVF-PQ, whichever fits); " + "; ".join(f"{name} ({factory})" for name, factory in named.items())
                + "; or a faiss index_factory string searching by inner product, e.g. 'IVF4096,PQ64', "
                "'IVF1024,SQ8', 'HNSW32' (checked before embedding)")

    @help.setter
    def help(self, value: str | None) -> None:
        pass  # the property above is the help


def add_index_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="index_command", required=True, metavar="INDEX_COMMAND")

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
    build.add_argument("--index", dest="index_type", default="auto", metavar="auto|NAME|FACTORY", action=_IndexTypeArg)
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
    query.add_argument("--min-confidence", type=float, metavar="P",
                       help="abstain (return no hits) where the model's confidence that the top-1 hit is right is below P")
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
