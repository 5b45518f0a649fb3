"""The file helpers every writer and reader of idml shares: checksums, atomic writes, and an
exclusive lock. One place, so that every file idml publishes is written the same durable way
(tmp file, fsync, rename, fsync of the folder) and hashed the same way."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator


def stream_sha256(f: BinaryIO) -> str:
    """Hex sha256 of what is left to read in ``f``, in 1 MiB blocks."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file (shard checksums, checkpoint identity)."""
    with open(path, "rb") as f:
        return stream_sha256(f)


def fsync_dir(path: Path) -> None:
    # The rename itself is only durable once the folder holding it is flushed.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Readers see the old content or the new, never a half-written file, even after a crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """A blocking, process-wide exclusive lock on ``path`` (flock), held by one process at a time;
    the others wait (e.g. several processes preparing the same cached file: the first prepares it,
    the rest find it done). The kernel releases it when its holder dies, so a killed process never
    leaves a stale lock behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
