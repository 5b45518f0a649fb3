"""A blocking, process-wide exclusive lock on a file (flock): the kernel releases it when its
holder dies, so a killed process never leaves a stale lock behind."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Held by one process at a time; the others wait (e.g. several processes preparing the same
    cached file: the first prepares it, the rest find it done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
