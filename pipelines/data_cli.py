"""``idml data fetch|convert|inspect``: its arguments and what it runs (the library's
``idml.data``: ``resolve_dataset``, ``convert``, ``summarize``, ``verify_dataset``)."""

from __future__ import annotations

import argparse
import math

from idml.errors import DamagedFileError


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value



def add_data_args(p: argparse.ArgumentParser) -> None:
    from idml.data.converters import CONVERTERS

    data = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
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


def run_data(args: argparse.Namespace) -> int:
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

