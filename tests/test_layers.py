"""The layer contracts of pyproject.toml ([tool.importlinter]) hold, and each one fails when an
import breaks it: lint-imports runs on a copy of the packages with one offending import added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACT_NAMES = {c["id"]: c["name"] for c in
                  tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # The packages of ``root`` first on the path: a copy is checked, not the installed checkout.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture(scope="module")
def copy_of_packages(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layers")
    for package in ("idml", "pipelines"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root)
    return root


# (module the import is added to, the import, the contract it breaks)
BREAKS = [  # every contract has one
    ("idml/index/labels.py", "import pipelines._errors", "library-below-pipelines"),
    ("idml/index/store.py", "import ray", "library-without-ray"),
    ("pipelines/index.py", "from pipelines import index_cli", "cli-on-top"),
    ("idml/index/labels.py", "from idml.index import exact_vectors", "idml-acyclic"),  # it imports labels
    ("idml/errors.py", "import idml.index.store", "idml-acyclic"),  # idml.index -> idml.errors
]


@pytest.mark.parametrize("module, offending, contract", BREAKS, ids=[f"{c}:{m}" for m, _, c in BREAKS])
def test_a_contract_fails_when_broken(copy_of_packages, module, offending, contract):
    path = copy_of_packages / module
    original = path.read_text()
    path.write_text(original + f"\n{offending}  # injected by test_layers\n")
    try:
        result = lint_imports(copy_of_packages)
    finally:
        path.write_text(original)
    assert result.returncode != 0, result.stdout
    assert "1 broken" in result.stdout, result.stdout
    # lint-imports wraps long lines: compare the report with its whitespace collapsed.
    assert f"{CONTRACT_NAMES[contract]} BROKEN" in " ".join(result.stdout.split()), result.stdout


def test_every_contract_has_a_break():
    assert {contract for _, _, contract in BREAKS} == set(CONTRACT_NAMES)
