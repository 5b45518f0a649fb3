"""The ``idml`` command line: data fetch|convert|inspect, train (local or ``--ray``), eval, index, tune, serve,
export.

It sits above the library (``idml``) and the Ray entrypoints (``pipelines``) and imports from
both; neither imports it. It is the one entry: ``idml`` (installed) or ``python -m pipelines.cli``
(a source tree, e.g. a ``ray job submit --working-dir .``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from idml.errors import DamagedFileError, InputError

from ._errors import run_command
from .export_cli import add_export_args, run_export
from .index_args import add_index_args
from .index_cli import run_index
from .model_cli import add_model_args, run_model
from .serve_cli import add_serve_args, run_serve
from .tune_cli import add_tune_args, run_tune


def _version() -> str:
    try:
        return version("idml")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show debug logs, Ray Data's execution lines, library warnings, and tracebacks on errors")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file, e.g. configs/emoji.yaml (the main job); without it idml.config's defaults (a fast 64 px IDML on the built-in emoji set)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="override config values, e.g. --set train.epochs=3 loss.name=triplet (may be repeated)")
    p.add_argument("--output-dir", help="where checkpoints, metrics and plots go (shortcut for --set output_dir=...)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if output_dir has last.pt (with --ray: a new run name with a timestamp)")
    track = p.add_argument_group("MLflow (every run logs its selected checkpoint as the model runs:/<run id>/model)")
    track.add_argument("--experiment", default="idml", help="MLflow experiment (default: idml)")
    track.add_argument("--register-model", metavar="NAME",
                       help="also register the model as a new version of NAME (then: idml model alias NAME champion N)")
    track.add_argument("--no-mlflow", action="store_true", help="local runs only: log nothing to MLflow")
    ray = p.add_argument_group("distributed training on Ray (pipelines.train)")
    ray.add_argument("--ray", action="store_true", help="train with Ray Data + Ray Train DDP workers, tracked in MLflow")
    ray.add_argument("--num-workers", type=int, default=1, help="DDP workers (default: 1)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0,
                     help="CPUs each worker reserves; leave some for Ray Data's decoding (default: 1)")
    ray.add_argument("--threads", type=int, default=0,
                     help="torch threads per worker (default: train.threads if set, else the node's CPUs shared "
                          "among its workers; decoding borrows what training leaves idle)")
    ray.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl)")
    ray.add_argument("--run-name", help="Ray run and MLflow run name; the same name resumes (default: the output folder's name)")
    ray.add_argument("--storage-path", help="Ray checkpoints; shared storage (NFS, s3://...) on a multi-node cluster "
                                            "(default: <output_dir>/ray)")
    ray.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint (default: 2)")
    ray.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from idml.data.converters import CONVERTERS

    parser = argparse.ArgumentParser(prog="idml", description="Introspective Deep Metric Learning")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="fetch, convert and inspect datasets").add_subparsers(
        dest="data_command", required=True, metavar="DATA_COMMAND")
    fetch = data.add_parser("fetch", help="fetch and convert a built-in dataset (emoji, fashion-mnist)")
    fetch.add_argument("name", help="built-in dataset: emoji or fashion-mnist")
    fetch.add_argument("--cache-dir", help="default: $IDML_CACHE or ~/.cache/idml")
    fetch.add_argument("--tarball-dir", help="emoji: folder holding the four emoji-datasource-*-16.0.0.tgz files (no npm needed)")
    convert = data.add_parser("convert", help="convert images on disk into the sharded Parquet format",
                              epilog="layouts: " + "; ".join(f"{name}: {c.help}" for name, c in CONVERTERS.items()))
    convert.add_argument("format", choices=list(CONVERTERS), help="the source layout (see below)")
    convert.add_argument("src", help="the extracted source dataset folder")
    convert.add_argument("dst", help="output folder (created; must be new, empty, or a dataset with --overwrite)")
    convert.add_argument("--val-fraction", type=float, default=0.1,
                         help="fraction of training classes held out for model selection (0 disables; default: 0.1)")
    convert.add_argument("--shard-mb", type=_positive_float, default=64.0, help="shard size in MiB of image data (default: 64)")
    convert.add_argument("--with-domains", action="store_true", help="image-folder: src/<domain>/<class>/<image>")
    convert.add_argument("--follow-links", action="store_true",
                         help="read files that symbolic links bring in from outside src (default: skipped and counted)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing dataset at dst")
    inspect = data.add_parser("inspect", help="summarise a converted dataset")
    inspect.add_argument("dataset", help="a dataset folder or built-in name")
    inspect.add_argument("--grid", help="also save a PNG grid of sample images here")
    inspect.add_argument("--verify", action="store_true", help="check every shard's checksum and the manifest against the rows (exit 2 when any fails)")

    train = sub.add_parser("train", help="train a model and evaluate it on the test split")
    _add_train_args(train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint (or the frozen pretrained backbone)")
    _add_config_args(ev)
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint written by idml train (best.pt, last.pt), a path on shared "
                                             "storage (s3://...), or an MLflow model: models:/NAME@alias, runs:/<run id>/model")
    source.add_argument("--frozen-backbone", action="store_true", help="evaluate the pretrained backbone's pooled features")
    ev.add_argument("--split", default=None, help="split to evaluate (default: data.test_split)")
    ev.add_argument("--json", help="write the metrics here")

    tune = sub.add_parser("tune", help="hyperparameter search on Ray Tune (lambda, margin, learning rates)")
    add_tune_args(tune)

    serve = sub.add_parser("serve", help="HTTP search service over an index on Ray Serve (127.0.0.1; no authentication)")
    add_serve_args(serve)
    export = sub.add_parser("export", help="write a checkpoint as a TorchScript or ONNX file")
    add_export_args(export)
    model = sub.add_parser("model", help="MLflow model registry: register a logged model, move an alias, list versions")
    add_model_args(model)

    index = sub.add_parser("index", help="build|update|query|verify|versions|publish|prune versioned faiss indexes (Ray)",
                           description="Embed image corpora and build versioned, sharded faiss indexes")
    add_index_args(index)
    return parser


def main(argv: list[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    _configure_logging(args.verbose)
    command = {"data": _data, "train": _train, "eval": _eval, "index": run_index, "tune": run_tune,
               "serve": run_serve, "export": run_export, "model": run_model}[args.command]
    args.where_stopped = None  # a command may set it: () -> a line saying where its work stopped (Ctrl-C)
    return run_command(lambda: command(args), prog="idml", verbose=args.verbose,
                       on_interrupt=lambda: args.where_stopped() if args.where_stopped else None)


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow sets its level when imported
        for noisy in ("faiss.loader", "ray", "ray.data", "ray.train", "mlflow"):  # CPU-feature probing; Ray's, MLflow's chatter
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # Library deprecation notices are for developers (-v), not for a training run's output.
        import warnings

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def _load(args):
    from idml.config import load_config

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def _data(args) -> int:
    from idml import data

    if args.data_command == "fetch":
        root = data.resolve_dataset(args.name, cache_dir=args.cache_dir, tarball_dir=args.tarball_dir)
        print(data.summarize(root))
        print(f"\ndataset ready at {root}")
    elif args.data_command == "convert":
        options = {"with_domains": True} if args.with_domains else {}
        data.convert(args.format, args.src, args.dst, val_fraction=args.val_fraction, follow_links=args.follow_links,
                     shard_bytes=int(args.shard_mb * (1 << 20)), overwrite=args.overwrite, **options)
        print(data.summarize(args.dst))
    else:
        root = data.resolve_dataset(args.dataset)
        if args.verify:  # first: the summary reads the shards, and would stop at the first damaged one
            problems = data.verify_dataset(root)
            if problems:
                print("verify: FAILED\n  " + "\n  ".join(problems))
                raise DamagedFileError(f"dataset {root} failed verification: {len(problems)} problem(s), listed above; "
                                       "re-create it with `idml data convert` or `idml data fetch`")
        print(data.summarize(root))
        if args.verify:
            print("verify: OK")
        if args.grid:
            print(f"sample grid: {data.save_sample_grid(root, args.grid)}")
    return 0


def _train(args) -> int:
    from idml.evaluation import format_metrics_table
    from idml.evaluation.protocol import describe_selective
    from idml.training.loop import FIGURES

    cfg = _load(args)
    if args.ray:
        from .train import RayOptions, plan, train_planned, where_stopped

        options = RayOptions(num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker, threads=args.threads,
                             use_gpu=args.gpu,
                             run_name=args.run_name, storage_path=args.storage_path, max_failures=args.max_failures,
                             experiment=args.experiment, register_model=args.register_model, address=args.address,
                             verbose=args.verbose)
        if args.no_mlflow:
            raise InputError("--no-mlflow applies to local runs: a Ray run is tracked in MLflow (the workers log to it)")
        p = plan(cfg, options, resume=not args.no_resume)
        args.where_stopped = lambda: where_stopped(p)
        summary = train_planned(p)
    else:
        import time

        from idml.checkpoint import describe_last_checkpoint
        from idml.training.local import track_local_run, train_local

        # Without resuming, a last.pt older than this command is the earlier run's.
        since = time.time() if args.no_resume else None
        args.where_stopped = lambda: describe_last_checkpoint(Path(cfg.output_dir) / "last.pt", since=since)
        if args.no_mlflow and args.register_model:
            raise InputError("--register-model needs MLflow; drop --no-mlflow")
        if not args.no_mlflow:
            from idml.tracking import check_tracking_store, tracking_uri

            check_tracking_store(tracking_uri(), hint=", or pass --no-mlflow")
        summary = train_local(cfg, resume=not args.no_resume)
        if not args.no_mlflow:
            summary.update(track_local_run(cfg, summary, experiment=args.experiment, register_model=args.register_model))
    print()
    print(format_metrics_table({f"test (epoch {summary['selected_epoch']})": summary["test"]}, _table_metrics(cfg, summary["test"])))
    _print_cross_domain(summary.get("cross_domain"))
    if describe_selective(summary):
        print("\n" + describe_selective(summary))
    print(f"\ntrain throughput: {summary['train_images_per_s']:.1f} images/s; "
          f"eval throughput: {summary['test']['embed_images_per_s']:.1f} images/s; "
          f"final evaluation (confidence, test, analyses, figures): {summary['final_evaluation_s']:.0f} s")
    # With --ray and validation, last.pt lives in Ray's checkpoint only: name what is there.
    written = [n for n in ("best.pt", "last.pt", "metrics.json", *FIGURES) if (Path(cfg.output_dir) / n).exists()]
    print(f"outputs in {cfg.output_dir}: {', '.join(written)}")
    if args.ray:
        print(f"Ray run {summary['run_name']!r} (checkpoints in {summary['storage_path']}); "
              f"MLflow run {summary['mlflow_run_id']}")
        summary.update(model_uri=f"runs:/{summary['mlflow_run_id']}/model")
    if summary.get("model_uri"):
        registered = (f"; registered as models:/{args.register_model}" + (f"/{summary['version']}" if summary.get("version") else "")
                      if args.register_model else "")
        print(f"MLflow model: {summary['model_uri']}{registered}")
    return 0


def _eval(args) -> int:
    from idml.training.evaluate import EvaluateRequest, evaluate_checkpoint
    from idml.evaluation import format_metrics_table
    from idml.evaluation.protocol import describe_selective

    cfg = _load(args)
    done = evaluate_checkpoint(EvaluateRequest(cfg, checkpoint=args.checkpoint, split=args.split))
    print(format_metrics_table({f"{done.name} / {done.split}": done.metrics}, _table_metrics(cfg, done.metrics)))
    _print_cross_domain(done.result["cross_domain"])
    if describe_selective(done.result):
        print("\n" + describe_selective(done.result))
    print(f"\neval throughput: {done.metrics['embed_images_per_s']:.1f} images/s")
    if args.json:
        Path(args.json).write_text(json.dumps(done.report(), indent=2, default=float))
    return 0


def _table_metrics(cfg, metrics: dict) -> list[str]:
    wanted = [f"recall@{k}" for k in cfg.eval.recall_ks] + ["map@r", "r_precision", "nmi",
              "xdomain_recall@1", "recall_at_1_lowest_uncertainty", "recall_at_1_highest_uncertainty",
              "uncertainty_auroc_mixed"]
    return [m for m in wanted if m in metrics]


def _print_cross_domain(cross: dict | None) -> None:
    if not cross:
        return
    from idml.evaluation import format_metrics_table

    rows = {pair: {k: v for k, v in m.items() if k in ("recall@1", "map@r")} for pair, m in cross["pairs"].items()}
    rows["average"] = {k: v for k, v in cross["average"].items() if k in ("recall@1", "map@r")}
    print("\ncross-domain retrieval (query domain -> gallery domain):")
    print(format_metrics_table(rows))


if __name__ == "__main__":
    sys.exit(main())
