"""Whether a file really lies inside a folder once symbolic links are resolved: converters and the
index corpus read only files inside the folder they were given, unless told to follow links."""

from __future__ import annotations

import os


def within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


class FolderBoundary:
    """The real (link-resolved) extent of ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.real_root = os.path.realpath(root)
        self._real_dirs: dict[str, str] = {}

    def real_path(self, path: str | os.PathLike) -> str:
        path = os.fspath(path)
        if os.path.islink(path):
            return os.path.realpath(path)
        # One realpath per folder rather than per file: datasets and corpora list millions.
        folder = os.path.dirname(path)
        real = self._real_dirs.get(folder)
        if real is None:
            real = self._real_dirs[folder] = os.path.realpath(folder)
        return os.path.join(real, os.path.basename(path))

    def contains(self, path: str | os.PathLike) -> bool:
        return within(self.real_path(path), self.real_root)
