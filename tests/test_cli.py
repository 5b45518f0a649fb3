"""The command line (``pipelines.cli``): its options, and the layering it sits on."""

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_argument_has_help():
    from pipelines.index_cli import build_parser as index_parser

    for root in (build_parser(), index_parser()):
        for parser in _parsers(root):
            missing = [a.dest for a in parser._actions if a.help is None and not isinstance(a, argparse._SubParsersAction)]
            assert not missing, f"{parser.prog}: {missing}"


def test_set_given_twice_keeps_both():
    args = build_parser().parse_args(["train", "--set", "train.epochs=3", "--set", "loss.name=triplet", "train.lr=1"])
    assert args.overrides == ["train.epochs=3", "loss.name=triplet", "train.lr=1"]


def test_version_and_the_one_entry_from_a_source_tree(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.startswith("idml ")
    # What `ray job submit --working-dir .` runs: the same command line as the installed `idml`.
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert "--num-workers" in out and "--ray " in out
    args = build_parser().parse_args(["train", "--ray", "--set", "train.epochs=1"])
    assert args.ray and args.command == "train"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_library_never_imports_the_pipelines_the_cli_or_ray():
    for path in (REPO / "idml").rglob("*.py"):
        bad = {n for n in _imports(path) if n.split(".")[0] in ("pipelines", "ray")}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
    # Importing the Ray driver does not pull the command line in.
    check = ("import sys, pipelines.train, pipelines.train_worker, pipelines.index; "
             "assert 'pipelines.cli' not in sys.modules and 'pipelines.index_cli' not in sys.modules")
    subprocess.run([sys.executable, "-c", check], cwd=REPO, check=True)


def test_ctrl_c_is_reported_even_when_where_it_stopped_cannot_be_told(capsys):
    from pipelines._errors import INTERRUPTED, run_command

    def interrupted() -> int:
        raise KeyboardInterrupt

    def unreadable_storage() -> str:
        raise OSError("storage unreachable")

    assert run_command(interrupted, prog="idml", verbose=False, on_interrupt=unreadable_storage) == INTERRUPTED
    assert capsys.readouterr().err.strip() == "idml: stopped (Ctrl-C); where it stopped is unknown (OSError: storage unreachable)"
