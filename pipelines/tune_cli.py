"""``idml tune``: its arguments and what it runs. Ray is imported
only when the search starts (``pipelines.cli`` wires this in)."""

from __future__ import annotations

import argparse


def add_tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True, help="search space YAML (see tune_spaces/)")
    p.add_argument("--config", help="base config (default: the space file's base_config)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="override base config values for every trial (may be repeated)")
    p.add_argument("--name", help="search name; the same name resumes an interrupted search (default: the space file's name)")
    p.add_argument("--output-dir", help="table, best config, plot, trials' checkpoints (default: runs/tune/<name>)")
    p.add_argument("--storage-path", help="Ray Tune/Train storage; shared (NFS, s3://...) on a multi-node cluster "
                                          "(default: <output-dir>/ray)")
    p.add_argument("--retrain-seeds", type=int, default=0,
                   help="retrain the best and the lambda = 0 config on N seeds, evaluated on test (default: 0)")
    p.add_argument("--experiment", default="idml", help="MLflow experiment (default: idml)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local instance)")


def run_tune(args: argparse.Namespace) -> int:
    from ._tune_space import load_space
    from .tune import TuneOptions, tune_search

    space = load_space(args.space, args.config, args.overrides)
    args.where_stopped = lambda: ("the search's state is saved; run the same command again to resume it "
                                  "(finished trials are kept, unfinished ones continue from their checkpoints)")
    tune_search(space, TuneOptions(name=args.name, output_dir=args.output_dir, storage_path=args.storage_path,
                                   experiment=args.experiment, address=args.address,
                                   retrain_seeds=args.retrain_seeds, verbose=args.verbose))
    return 0
