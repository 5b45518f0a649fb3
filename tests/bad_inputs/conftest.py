"""The bad-input suites run the real command line in this process; at the end of a run the
terminal summary gives their inputs' outcomes (``outcomes.py``)."""

from __future__ import annotations

import pytest
from bad_inputs import outcomes

from pipelines.cli import main


@pytest.fixture
def idml(capsys):
    """Run ``idml ARGS...`` in this process; returns (exit code, stdout, stderr)."""

    def run(*args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def pytest_runtest_logreport(report) -> None:
    """Each bad-input test that counted no inputs itself is one input (its setup may fail too)."""
    if report.when == "call" or (report.when == "setup" and report.failed):
        outcomes.record_test(report.nodeid, report.passed)


def pytest_terminal_summary(terminalreporter) -> None:
    if sum(outcomes.counts.values()):
        failures = sum(outcomes.counts[o] for o in outcomes.FAILURES)
        terminalreporter.write_sep("=", "bad inputs (tests/bad_inputs)", red=bool(failures), green=not failures)
        terminalreporter.write_line(outcomes.line())
