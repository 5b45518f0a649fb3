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

from idml.files import file_sha256, write_json_atomic

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
        with contextlib.suppress(OSError):
            write_json_atomic(self.path, self.stamps)
            self._changed = False


def describe_digest(digest: str, expected: str) -> str:
    return f"sha256 {digest[:12]}…, expected {expected[:12]}…"


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# Inside a derived folder (e.g. an index version's merged cache): its files' checksums, written
# when it was made, before it was renamed into place.
SEAL_NAME = "checksums.json"


class SealedFolder:
    """A folder of derived files carrying the checksums of its files (``SEAL_NAME``), written when
    it is made and checked where it is opened; files found sound are remembered by stamp in its
    ``STAMPS_NAME``, so an open hashes them again only when their stat changes. A folder that fails
    is rebuilt from its sources by its owner: deleting it loses nothing."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.stats: dict[str, os.stat_result] = {}  # each file's stat when ``problems`` found it sound

    def seal(self, names: list[str], **facts: Any) -> None:
        """Record the sha256 and size of the files ``names`` and ``facts`` (what they were made from)."""
        files = {name: {"sha256": file_sha256(self.path / name), "bytes": (self.path / name).stat().st_size}
                 for name in names}
        write_json_atomic(self.path / SEAL_NAME, {"files": files, **facts})

    def problems(self, *, checksums: bool = True, remember: bool = True, **facts: Any) -> list[str]:
        """Why the folder cannot be used, each naming the file: no readable record of its
        checksums, another recorded fact than ``facts`` (made from other sources), a file missing,
        of another size or sha256 (``checksums``; False: sizes only). Empty when it is sound.
        ``remember``: trust and keep stamps (False: hash every file)."""
        record_path = self.path / SEAL_NAME
        record = read_stamps(record_path)  # the same tolerant JSON read: absent or damaged is {}
        files = record.get("files")
        if not isinstance(files, dict) or not files:
            return [f"{record_path} is missing or damaged: the checksums of {self.path} are unknown"]
        for key, value in facts.items():
            if record.get(key) != value:
                return [f"{self.path} was made from other sources than these ({key} differs)"]
        stamps = Stamps(self.path / STAMPS_NAME if remember else None)
        problems, self.stats = [], {}
        for name, info in files.items():
            path = self.path / name
            if not isinstance(info, dict):
                problems.append(f"{record_path} is damaged: no checksum for {path}")
                continue
            try:
                st = os.stat(path)
            except OSError:
                problems.append(f"missing file {path}")
                continue
            if st.st_size != info.get("bytes"):
                problems.append(f"{path} has {st.st_size} bytes, its checksum record says {info.get('bytes')}")
            elif checksums and not stamps.matches(name, str(info.get("sha256")), path)[0]:
                problems.append(f"checksum mismatch for {path}")
            else:
                self.stats[name] = st
        stamps.save()
        return problems


def stat_signature(st: os.stat_result, *, ctime: bool) -> tuple:
    """What ``StatWatch`` compares: the inode, size and mtime, and (``ctime``) the ctime."""
    return (st.st_ino, st.st_size, st.st_mtime_ns) + ((st.st_ctime_ns,) if ctime else ())


class StatWatch:
    """Files read after they were checked (memory-mapped, or read again per request), with their
    stat as checked: ``changed()`` names those changed since, by stat alone (cheap enough to ask at
    every request). The ctime is compared only for files no other name links (``ctime=True``): a
    write that puts the mtime back still changes it, but a later index version hard-linking a file
    changes it too."""

    def __init__(self) -> None:
        self.signatures: dict[Path, tuple] = {}
        self._ctime: set[Path] = set()

    def add(self, path: str | os.PathLike, st: os.stat_result | None = None, *, ctime: bool = False) -> None:
        """Watch ``path`` from its stat ``st`` (default: now; absent: changed once it appears)."""
        path = Path(path)
        if st is None:
            with contextlib.suppress(OSError):
                st = os.stat(path)
        self.signatures[path] = stat_signature(st, ctime=ctime) if st is not None else ()
        (self._ctime.add if ctime else self._ctime.discard)(path)

    def changed(self) -> list[str]:
        changed = []
        for path, signature in self.signatures.items():
            try:
                now = stat_signature(os.stat(path), ctime=path in self._ctime)
            except OSError:
                now = ()
            if now != signature:
                changed.append(str(path))
        return changed
