"""Managing an index folder's versions: listing them (``idml index versions``), publishing an
existing one (a rollback, or forward again: ``idml index publish``) and deleting old ones
(``idml index prune``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass, field
from typing import Any

from ..files import fsync_dir
from .store import IndexStore


@dataclass
class VersionInfo:
    """One line of ``idml index versions``."""

    version: str
    current: bool
    created_at: str | None = None
    kind: str | None = None
    parent: str | None = None
    vectors: int | None = None
    model: str | None = None
    problem: str | None = None  # unreadable manifest, missing file or wrong size (sizes only: cheap)


@dataclass
class PruneResult:
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    freed_bytes: int = 0  # files no kept version links any more

    def describe(self, *, dry_run: bool = False) -> str:
        verb = "would delete" if dry_run else "deleted"
        removed = (f"{verb} {len(self.removed)} version(s): {', '.join(self.removed)} "
                   f"({self.freed_bytes / 2**20:.1f} MiB no kept version shares)" if self.removed else "nothing to delete")
        return f"{removed}\nkept: {', '.join(self.kept) or 'none'}"


def model_label(checkpoint: dict[str, Any]) -> str:
    """A version's model in a word: the registered name and version when it came from MLflow."""
    model = checkpoint.get("model") or {}
    if model.get("registered_model"):
        return f"{model['registered_model']} v{model['version']}" + (f" (@{model['alias']})" if model.get("alias") else "")
    return str(model.get("model_uri") or checkpoint.get("path"))


def list_versions(store: IndexStore) -> list[VersionInfo]:
    """Every version, oldest first, with what ``idml index versions`` shows. Files are
    checked by size only (``verify`` hashes them)."""
    current = store.current_or_none()
    out = []
    for version in store.versions():
        info = VersionInfo(version, version == current)
        try:
            manifest = store.read_manifest(version)
        except (FileNotFoundError, ValueError) as e:
            info.problem = str(e)
            out.append(info)
            continue
        info.created_at, info.kind, info.parent = manifest.get("created_at"), manifest.get("kind"), manifest.get("parent")
        info.vectors = manifest.get("counts", {}).get("vectors")
        info.model = model_label(manifest.get("checkpoint", {}))
        problems = store.file_problems(version, manifest, checksums=False)
        if problems:
            info.problem = next(iter(problems.values())) + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        out.append(info)
    return out


def format_versions(rows: list[VersionInfo], root: str | os.PathLike) -> str:
    """``list_versions`` as a table, the published one marked."""
    if not rows:
        return f"no index versions in {root}"
    lines = [f"  {'VERSION':<9} {'CREATED':<25} {'KIND':<6} {'VECTORS':>9}  {'PARENT':<8}  MODEL"]
    for r in rows:
        mark = "*" if r.current else " "
        vectors = "" if r.vectors is None else str(r.vectors)
        lines.append(f"{mark} {r.version:<9} {r.created_at or '?':<25} {r.kind or '?':<6} {vectors:>9}  "
                     f"{r.parent or '-':<8}  {r.model or '?'}" + ("  CURRENT" if r.current else "")
                     + (f"\n    DAMAGED: {r.problem}" if r.problem else ""))
    if not any(r.current for r in rows):
        lines.append(f"(nothing published: `idml index publish --index-dir {root} VERSION`)")
    return "\n".join(lines)


def publish_version(store: IndexStore, version: str, *, wait_s: float = 0.0) -> str | None:
    """Point ``CURRENT`` at an existing version (a rollback, or forward again) once all its
    files have their recorded sizes and checksums; returns the version it replaced. Under the
    lock, so it never interleaves with a build's own publish."""
    with store.lock(wait_s=wait_s, holder=f"idml index publish {version}"):
        store.version_dir(version)  # a bad name is refused before anything else
        if version not in store.versions():
            known = ", ".join(store.versions()) or "none"
            raise FileNotFoundError(f"index version {version} does not exist in {store.versions_dir} (versions: {known})")
        store.checked_manifest(version, purpose="republish")
        previous = store.current_or_none()
        if previous != version:
            store.publish(version)
        return previous


def prune_versions(store: IndexStore, keep: int, *, dry_run: bool = False, wait_s: float = 0.0) -> PruneResult:
    """Delete all but the ``keep`` newest versions, never the published one.

    Under the lock, so no build or update is running: none can be reading a version as its
    parent (a build's parent is always the published version, which is kept). Each version
    is renamed out of ``versions/`` first (atomic: a reader sees it whole or not at all),
    then deleted; a prune killed half-way leaves only ``trash/``, emptied by the next one.
    Files a kept version shares (hard links) stay: only the pruned version's names go."""
    if keep < 1:
        raise ValueError(f"--keep must be >= 1, got {keep}")
    with store.lock(wait_s=wait_s, holder=f"idml index prune --keep {keep}"):
        current = store.current_version()  # a damaged pointer is refused: what to keep would be a guess
        versions = store.versions()
        kept = set(versions[-keep:]) | ({current} if current else set())
        result = PruneResult(removed=[v for v in versions if v not in kept], kept=[v for v in versions if v in kept])
        result.freed_bytes = _bytes_freed_by_removing(store, result.removed)
        if dry_run:
            return result
        _empty_trash(store)
        trash = store.root / "trash"
        for version in result.removed:
            trash.mkdir(exist_ok=True)
            os.rename(store.version_dir(version), trash / f"{version}.{os.getpid()}")
            fsync_dir(store.versions_dir)
            for merged in (store.cache_dir / version, *store.cache_dir.glob(f"{version}.tmp-*")):  # and killed merges' leftovers
                shutil.rmtree(merged, ignore_errors=True)
            for path in (store.stamps_path(version), store.cache_dir / f"{version}.lock"):  # the latter: merge_ondisk's
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        _empty_trash(store)
        return result


def _bytes_freed_by_removing(store: IndexStore, versions: list[str]) -> int:
    """Bytes of the files whose every hard link lies in ``versions`` (only those are freed)."""
    links: dict[int, list] = {}  # inode -> [size, links found, links in all]
    for version in versions:
        for path in store.version_dir(version).rglob("*"):
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                entry = links.setdefault(st.st_ino, [st.st_size, 0, st.st_nlink])
                entry[1] += 1
    return sum(size for size, found, total in links.values() if found >= total)


def _empty_trash(store: IndexStore) -> None:
    trash = store.root / "trash"
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
