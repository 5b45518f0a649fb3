"""``idml model``: the MLflow model registry from the command line (register a logged model, move
an alias, list versions). Training logs every run's best model; ``--register-model`` registers it."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    reg = sub.add_parser("register", help="register a logged model (runs:/<run id>/model) as a new version of NAME")
    reg.add_argument("model_uri", help="runs:/<run id>/model (printed by idml train)")
    reg.add_argument("name", help="registered model name")
    alias = sub.add_parser("alias", help="point models:/NAME@ALIAS at a version (e.g. champion)")
    alias.add_argument("name", help="registered model name")
    alias.add_argument("alias", help="alias to set or move, e.g. champion")
    alias.add_argument("version", help="the version it points at")
    ls = sub.add_parser("list", help="the versions of a registered model with their aliases and runs")
    ls.add_argument("name", help="registered model name")


def run_model(args: argparse.Namespace) -> int:
    from idml import registry

    if args.model_command == "register":
        version = registry.register(args.model_uri, args.name)
        print(f"registered {args.model_uri} as models:/{args.name}/{version}")
    elif args.model_command == "alias":
        registry.set_alias(args.name, args.alias, args.version)
        print(f"models:/{args.name}@{args.alias} -> version {args.version}")
    else:
        versions = registry.list_versions(args.name)
        print(f"{'version':>7}  {'aliases':<20}  run")
        for v in versions:
            print(f"{v['version']:>7}  {','.join(v['aliases']) or '-':<20}  {v['run_id']}")
    return 0
