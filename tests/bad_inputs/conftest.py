"""The bad-input suites run the real command line in this process."""

from __future__ import annotations

import pytest

from pipelines.cli import main


@pytest.fixture
def idml(capsys):
    """Run ``idml ARGS...`` in this process; returns (exit code, stdout, stderr)."""

    def run(*args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
