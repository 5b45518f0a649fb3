"""What the bad-input suite fed the product and what came of it, counted over the whole run
(``conftest.py`` prints the total: "N inputs: clear / skipped / handled / traceback / hang / 5xx
/ silent"). Imported as ``bad_inputs.outcomes`` (``tests`` is on ``pythonpath``): one module,
so one count, whichever test records into it.

- clear: the command gave the undamaged run's answer; skipped: the damage left the bytes as
  they were; handled: refused in one line naming the input (exit 2, a 4xx), or recovered;
- traceback, hang, 5xx, silent (exit 0 with another answer): the failures, which must be 0.

The fuzzer records its own counts per input; every other bad-input test is one input, handled
when it passes (each asserts its input's one-line refusal or correct recovery) and a failure
("traceback") when it does not."""

from __future__ import annotations

import os
from collections import Counter

OUTCOMES = ("clear", "skipped", "handled", "traceback", "hang", "5xx", "silent")
FAILURES = ("traceback", "hang", "5xx", "silent")

counts: Counter = Counter()
tests_that_recorded: set[str] = set()  # their pass or failure is not counted again as one input


def record(tally: Counter) -> None:
    """Add the current test's per-input outcomes (the fuzzer's ``Tally.counts``)."""
    counts.update({outcome: n for outcome, n in tally.items() if outcome in OUTCOMES})
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    tests_that_recorded.add(current.rsplit(" (", 1)[0])


def record_test(nodeid: str, passed: bool) -> None:
    """A bad-input test that counted nothing itself: one input."""
    if nodeid not in tests_that_recorded:
        counts["handled" if passed else "traceback"] += 1


def line() -> str:
    return f"{sum(counts.values())} inputs: " + " / ".join(f"{counts[o]} {o}" for o in OUTCOMES)
