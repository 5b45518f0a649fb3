"""The ``idml`` command line: data fetch|convert|inspect, train (local or ``--ray``), eval, index, tune, serve,
export.

It sits above the library (``idml``) and the Ray entrypoints (``pipelines``) and imports from
both; neither imports it. It is the one entry: ``idml`` (installed) or ``python -m pipelines.cli``
(a source tree, e.g. a ``ray job submit --working-dir .``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from ._errors import run_command
from .data_cli import add_data_args, run_data
from .export_cli import add_export_args, run_export
from .index_args import add_index_args
from .index_cli import run_index
from .model_cli import add_model_args, run_model
from .serve_cli import add_serve_args, run_serve
from .train_cli import add_eval_args, add_train_args, run_eval, run_train
from .tune_cli import add_tune_args, run_tune


def _version() -> str:
    try:
        return version("idml")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show debug logs, Ray Data's execution lines, library warnings, and tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idml", description="Introspective Deep Metric Learning")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = sub.add_parser("data", help="fetch, convert and inspect datasets")
    add_data_args(data)
    train = sub.add_parser("train", help="train a model and evaluate it on the test split")
    add_train_args(train)
    ev = sub.add_parser("eval", help="evaluate a checkpoint (or the frozen pretrained backbone)")
    add_eval_args(ev)
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
    command = {"data": run_data, "train": run_train, "eval": run_eval, "index": run_index, "tune": run_tune,
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



if __name__ == "__main__":
    sys.exit(main())
