"""Errors the user can fix. The CLI prints them as one line and exits 2 (bad input); any other
exception is a failure of ours (exit 1). Built-in ``ValueError``, ``FileNotFoundError`` and
``FileExistsError`` raised with a message for the user count as bad input too."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: a file, folder, config or argument the user gave cannot be used as it is.
    The message names the input and says what to do."""


class DamagedFileError(InputError):
    """A file exists but its content is not what was written (truncated, corrupt, wrong checksum)."""
