"""The versioned index folder: immutable versions, one atomically replaced ``CURRENT`` pointer.

Layout::

    <index_dir>/CURRENT                     {"version": "v000003"}; replaced with os.replace
    <index_dir>/versions/v000003/           manifest.json, shards/, trained.faiss, recall_sample.npz
    <index_dir>/staging/<build key>/        work/ (resumable embedding partitions) and version/
    <index_dir>/cache/<version>/            derived files (the merged on-disk IVF, with the checksums of its
                                            files), safe to delete: checked at open, merged again when damaged
    <index_dir>/cache/<version>.checked.json  files found sound, by stat (see ``IndexStore.checked_manifest``)
    <index_dir>/.lock                       held (flock) by the one writer (build, update, publish, prune)
    <index_dir>/trash/                      versions being deleted by ``prune`` (renamed out of versions/ first)

A version folder is complete before it is renamed into ``versions/`` and it is published only by
replacing ``CURRENT`` afterwards, so readers only ever see a finished version. Versions share
unchanged files by hard links: deleting one version's folder removes only its names, never a
file another version still links.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from idml.files import file_sha256, fsync_dir, write_json_atomic
# Aliased: the names this module's code has always used (the definitions moved to idml.integrity).
from idml.integrity import RACY_SECONDS, read_stamps, stat_stamp
from idml.errors import DamagedFileError

INDEX_FORMAT = "idml-index"
# 2: IVF shard files without their coarse quantizer (trained.faiss holds it), exact vectors beside
# lossy shards. An older idml refuses such a version instead of searching shards it cannot read;
# this one reads both.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
CURRENT_NAME = "CURRENT"
_VERSION_RE = re.compile(r"^v(\d{6,})$")


def read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFileError(f"{path} is not valid JSON ({e}); the file is damaged") from e


def checksum(path: Path) -> dict[str, Any]:
    """What a manifest records of each file: its sha256 and size."""
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (versions share unchanged files for free), copying where the
    filesystem cannot link."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        shutil.copy2(src, dst)


def merge_sources(manifest: dict[str, Any]) -> dict[str, str]:
    """What a version's merged cache is made from: the checksums of its trained index and shard
    indexes. Recorded in the cache, it tells a copy merged from other shards."""
    names = ["trained.faiss", *(entry["index"] for entry in manifest["shards"])]
    return {name: manifest["files"][name]["sha256"] for name in names if name in manifest.get("files", {})}


class IndexLockedError(RuntimeError):
    """Another writer holds the index folder (the CLI exits with its own code for it)."""


class IndexStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / "staging"
        self.cache_dir = self.root / "cache"
        self.current_path = self.root / CURRENT_NAME

    # -- reading ---------------------------------------------------------------------------
    def current_version(self) -> str | None:
        if not self.current_path.is_file():
            return None
        pointer = read_json(self.current_path)
        version = pointer.get("version") if isinstance(pointer, dict) else None
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise ValueError(f"{self.current_path} does not name a version ({pointer!r}); the index is damaged")
        return version

    def version_dir(self, version: str) -> Path:
        if not _VERSION_RE.match(version):
            raise ValueError(f"{version!r} is not a version name (expected e.g. v000001)")
        return self.versions_dir / version

    def resolve_version(self, version: str | None = None) -> str:
        """``version`` or the published one; FileNotFoundError naming what to run when absent."""
        if version is None:
            version = self.current_version()
            if version is None:
                where = (f"index folder {self.root} does not exist" if not self.root.exists()
                         else f"no index version is published in {self.root}")
                raise FileNotFoundError(f"{where}; run `idml index build --index-dir {self.root} ...` first")
        if not (self.version_dir(version) / MANIFEST_NAME).is_file():
            raise FileNotFoundError(f"index version {version} does not exist in {self.versions_dir}")
        return version

    def read_manifest(self, version: str | None = None) -> dict[str, Any]:
        version = self.resolve_version(version)
        manifest = read_json(self.version_dir(version) / MANIFEST_NAME)
        if manifest.get("format") != INDEX_FORMAT or manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise ValueError(
                f"{self.version_dir(version) / MANIFEST_NAME} is not an {INDEX_FORMAT} "
                f"v{'/v'.join(map(str, READABLE_FORMAT_VERSIONS))} manifest; rebuild the index with this idml version"
            )
        return manifest

    def versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir() if _VERSION_RE.match(p.name))

    def next_version_id(self) -> str:
        numbers = [int(_VERSION_RE.match(v).group(1)) for v in self.versions()]
        return f"v{max(numbers, default=0) + 1:06d}"

    def find_version_by_key(self, build_key: str) -> str | None:
        """A finished version folder for ``build_key`` (one renamed into place by a run that died
        before publishing it)."""
        for version in reversed(self.versions()):
            path = self.version_dir(version) / MANIFEST_NAME
            if path.is_file() and read_json(path).get("build_key") == build_key:
                return version
        return None

    # -- checking --------------------------------------------------------------------------
    def file_problems(self, version: str, manifest: dict[str, Any], *, checksums: bool = True,
                      remember: bool = False) -> dict[str, str]:
        """``{file: what is wrong}`` for the files ``manifest`` lists: missing, another size than
        recorded, or (``checksums``) another sha256.

        ``remember``: files hashed sound are remembered by their stat (inode, size, mtime, ctime;
        in ``cache/``, safe to delete) and not hashed again while it is unchanged, so opening a
        big index stays cheap. Any write to a file, even one that restores its mtime, changes
        its ctime; only damage that bypasses the filesystem (bit rot) waits for ``idml index verify``."""
        vdir = self.version_dir(version)
        remembered = self.remembered(version) if remember and checksums else {}
        sound: dict[str, list] = {}
        problems: dict[str, str] = {}
        for rel, info in manifest.get("files", {}).items():
            path = vdir / rel
            try:
                st = path.stat()
            except FileNotFoundError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                problems[rel] = f"missing file {path}"
            elif st.st_size != info["bytes"]:
                problems[rel] = f"{path} has {st.st_size} bytes, the manifest says {info['bytes']}"
            elif checksums:
                stamp = stat_stamp(info["sha256"], st)
                if remembered.get(rel) == stamp:
                    sound[rel] = stamp
                elif file_sha256(path) != info["sha256"]:
                    problems[rel] = f"checksum mismatch for {path}"
                elif time.time() - st.st_ctime > RACY_SECONDS:
                    sound[rel] = stamp
        if remember and checksums and sound != remembered:
            self._remember(version, sound)
        return problems

    def remembered(self, version: str) -> dict[str, list]:
        """The stamps ``file_problems(remember=True)`` keeps for ``version``: {file: [sha256, inode,
        size, mtime_ns, ctime_ns]} of files found sound."""
        return read_stamps(self.stamps_path(version))

    def merged_dir(self, version: str) -> Path:
        """Where ``version``'s IVF shards are merged into one on-disk index (``combined.merge_ondisk``)."""
        return self.cache_dir / version

    def stamps_path(self, version: str) -> Path:
        return self.cache_dir / f"{version}.checked.json"

    def _remember(self, version: str, stamps: dict[str, list]) -> None:
        with contextlib.suppress(OSError):  # a read-only index is simply hashed again next time
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.stamps_path(version), stamps)

    def remember_built(self, version: str, manifest: dict[str, Any], *, hashed_since: float,
                       parent_stamps: dict[str, list]) -> None:
        """Remember the files of a version just built as sound, as a query's check would: the first
        query and the next update then stat them instead of hashing the whole version again.
        A file counts when its content is what was hashed: the build hashed it after its last write
        (its mtime is RACY_SECONDS before ``hashed_since``), or it is a parent's file found sound at
        the update's start and hard-linked since (``parent_stamps``: same inode, size and mtime).
        Its ctime is newer (linking, and removing the staging links, change it): the stamp records
        the current one, which later checks compare."""
        vdir = self.version_dir(version)
        stamps: dict[str, list] = {}
        for rel, info in manifest.get("files", {}).items():
            try:
                st = (vdir / rel).stat()
            except OSError:
                continue
            stamp = stat_stamp(info["sha256"], st)
            if st.st_size != info["bytes"]:
                continue
            if parent_stamps.get(rel, [])[:4] == stamp[:4] or st.st_mtime < hashed_since - RACY_SECONDS:
                stamps[rel] = stamp
        if stamps:
            self._remember(version, stamps)

    def checked_manifest(self, version: str | None = None, *, purpose: str = "query") -> tuple[str, dict[str, Any]]:
        """``(version, manifest)`` of ``version`` (default: the published one) once every file it
        lists has its recorded size and sha256; DamagedFileError naming the damaged file and the
        newest sound version otherwise. ``purpose`` ("query", "update", "publish": a version an interrupted
        run finished, "republish": ``idml index publish``) picks the advice."""
        version = self.resolve_version(version)
        manifest = self.read_manifest(version)
        problems = self.file_problems(version, manifest, remember=True)
        if problems:
            raise DamagedFileError(self._damage_message(version, list(problems.values()), purpose))
        return version, manifest

    def newest_sound_version(self, *, other_than: str) -> str | None:
        """The newest version but ``other_than`` whose files are all sound (one a user can still query)."""
        for version in reversed(self.versions()):
            if version == other_than:
                continue
            try:
                manifest = self.read_manifest(version)
            except (FileNotFoundError, ValueError):
                continue
            if not self.file_problems(version, manifest, remember=True):
                return version
        return None

    def _damage_message(self, version: str, problems: list[str], purpose: str) -> str:
        damage = problems[0] + (f" (and {len(problems) - 1} more damaged file(s))" if len(problems) > 1 else "")
        if purpose == "publish":
            return (f"index version {version}, finished by an interrupted run but never published, is damaged: {damage}; "
                    f"delete {self.version_dir(version)} and rerun")
        sound = self.newest_sound_version(other_than=version)
        rebuild = f"`idml index build --index-dir {self.root} ...` rebuilds the index"
        elsewhere = (f"the newest sound version is {sound} (`idml index query --version {sound}` reads it)" if sound
                     else "no other version is sound (versions share unchanged files)")
        details = f"`idml index verify --index-dir {self.root} --version {version}` lists every problem"
        if purpose == "republish":
            return f"cannot publish index version {version}: it is damaged: {damage}; {elsewhere}; {details}"
        if purpose == "update":
            return (f"cannot update index version {version}: it is damaged: {damage}; an update would carry the damage "
                    f"into the next version, so {rebuild}; {elsewhere}; {details}")
        return f"index version {version} is damaged: {damage}; {elsewhere}; {rebuild}; {details}"

    # -- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, *, wait_s: float = 0.0, holder: str = "idml index") -> Iterator[None]:
        """One writer per index folder (build, update, publish, prune). flock is released by the
        kernel when the holder dies, so a killed build never leaves a stale lock behind.
        ``wait_s``: how long to wait for another writer before IndexLockedError."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + max(0.0, wait_s)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise IndexLockedError(self._locked_message(path, wait_s)) from None
                    time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            # Who holds it, for the message another writer gets (the lock itself is the flock).
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{holder} (pid {os.getpid()}, since {datetime.now().isoformat(timespec='seconds')})\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def _locked_message(self, path: Path, wait_s: float) -> str:
        try:
            held_by = path.read_text().strip()
        except OSError:
            held_by = ""
        waited = f" (waited {wait_s:g}s)" if wait_s > 0 else ""
        return (f"another writer holds {self.root}{waited}: {held_by or 'an idml index build/update/publish/prune'}; "
                "wait for it to finish, or pass --wait SECONDS")

    def staging(self, build_key: str) -> Path:
        path = self.staging_dir / build_key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def move_into_versions(self, folder: Path, version: str) -> Path:
        """Rename a finished version folder into ``versions/`` (not yet published)."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        target = self.version_dir(version)
        if target.exists():
            raise FileExistsError(f"{target} already exists; refusing to overwrite a version")
        os.rename(folder, target)
        fsync_dir(self.versions_dir)
        return target

    def publish(self, version: str) -> None:
        """Point ``CURRENT`` at ``version`` (the caller holds the lock and has checked it)."""
        if not (self.version_dir(version) / MANIFEST_NAME).is_file():
            raise FileNotFoundError(f"cannot publish {version}: {self.version_dir(version)} has no manifest")
        write_json_atomic(self.current_path, {"version": version})

    def current_or_none(self) -> str | None:
        """The published version, or None when the pointer is missing or damaged (publishing
        another version is how a damaged pointer is repaired)."""
        try:
            return self.current_version()
        except ValueError:
            return None

    def remove_staging(self, keep: str | None = None) -> None:
        """Drop staging folders (called under the lock, after publishing): no other writer can
        be using them, and a rerun with other options would not reuse them."""
        if not self.staging_dir.is_dir():
            return
        for path in self.staging_dir.iterdir():
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.staging_dir.rmdir()  # only when empty
