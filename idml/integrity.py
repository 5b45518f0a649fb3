"""The integrity rule for the files idml reads to answer (dataset shards, checkpoints, ...): each
carries a checksum written when it is created, and it is checked where it is opened. Checking
stays cheap: a file found sound is remembered by a stamp (its checksum and its stat: inode, size,
mtime, ctime) in a JSON file kept beside it, and hashed again only when its stat changes. A file
changed within ``RACY_SECONDS`` of being hashed is not remembered (it could still change within
the same timestamp tick, unseen by its stat: git's "racy clean"), so it is hashed at the next open.

``idml.index.store`` keeps its stamps the same way (``<index>/cache/<version>.checked.json``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from idml.files import file_sha256

RACY_SECONDS = 2.0
# Beside a dataset's manifest: the shards found sound (``DatasetSource.checksum_problems``).
STAMPS_NAME = ".idml-checked.json"


def stat_stamp(sha256: str, st: os.stat_result) -> list:
    """What a file found sound is remembered by: its checksum and its stat."""
    return [sha256, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def read_stamps(path: str | os.PathLike) -> dict[str, list]:
    """The stamps kept at ``path``; none when it is absent or damaged (everything is hashed again)."""
    try:
        stamps = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


class Stamps:
    """The files of one folder found sound, kept in ``<folder>/STAMPS_NAME`` (``path=None``:
    nothing is remembered, every check hashes). Writing them is best effort: a read-only folder
    only costs a hash at the next open."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.stamps = read_stamps(self.path) if self.path is not None else {}
        self._changed = False

    def matches(self, key: str, sha256: str, file: str | os.PathLike,
                hasher: Callable[[], str] | None = None) -> tuple[bool, str]:
        """Whether ``file`` (remembered as ``key``) holds content with ``sha256``, and the
        checksum it has. Hashed (with ``hasher``, default ``file_sha256``) unless a stamp with
        the same stat says it was found sound before."""
        st = os.stat(file)
        stamp = stat_stamp(sha256, st)
        if self.stamps.get(key) == stamp:
            return True, sha256
        digest = hasher() if hasher is not None else file_sha256(file)
        if digest != sha256:
            if self.stamps.pop(key, None) is not None:
                self._changed = True
            return False, digest
        if time.time() - st.st_ctime > RACY_SECONDS and os.stat(file) == st:
            self.stamps[key] = stamp
            self._changed = True
        return True, digest

    def save(self) -> None:
        if self.path is None or not self._changed:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(self.stamps, indent=1) + "\n")
            os.replace(tmp, self.path)
            self._changed = False
        with contextlib.suppress(OSError):
            tmp.unlink()


def describe_digest(digest: str, expected: str) -> str:
    return f"sha256 {digest[:12]}…, expected {expected[:12]}…"


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
