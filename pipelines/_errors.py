"""How every command line of the project ends: one line per failure, never a traceback unless
``-v``. Exit 2 for bad input the user can fix, 1 for anything else, 130 for Ctrl-C."""

from __future__ import annotations

import atexit
import gc
import sys
from collections.abc import Callable

from idml.errors import InputError

BAD_INPUT = 2
FAILURE = 1
INTERRUPTED = 130

# What users cause: a missing or existing path, a bad value, an unreadable file.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                                                 IsADirectoryError, PermissionError)


def run_command(command: Callable[[], int], *, prog: str, verbose: bool,
                on_interrupt: Callable[[], str | None] | None = None) -> int:
    """Run ``command`` and turn what it raises into a message and an exit code.
    ``on_interrupt`` may return a line saying where the work stopped (e.g. the last checkpoint)."""
    try:
        return command()
    except KeyboardInterrupt:
        where = _where_stopped(on_interrupt)
        print(f"\n{prog}: stopped (Ctrl-C)" + (f"; {where}" if where else ""), file=sys.stderr)
        # The process ends next, and Python's last garbage collection would walk every object that
        # torch, Ray and MLflow made (10-20 s measured on a busy 2-core machine) before it exits.
        atexit.register(gc.freeze)
        return INTERRUPTED
    except _USER_ERRORS as err:
        if verbose:
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return BAD_INPUT
    except Exception as err:  # noqa: BLE001 - the last line of defence of a command line
        if verbose:
            raise
        print(f"{prog}: error: {type(err).__name__}: {_one_line(err)} (run with -v for the traceback)", file=sys.stderr)
        return FAILURE


def _where_stopped(on_interrupt: Callable[[], str | None] | None) -> str | None:
    """The interrupted command's own line; the stop is reported even if working it out fails."""
    if on_interrupt is None:
        return None
    try:
        return on_interrupt()
    except Exception as err:  # noqa: BLE001 - the stop itself must still be reported
        return f"where it stopped is unknown ({type(err).__name__}: {_one_line(err)})"


def _one_line(err: BaseException) -> str:
    """Our messages may span lines on purpose (a list of differing keys); a foreign one's first line suffices."""
    text = str(err).strip() or type(err).__name__
    return text if isinstance(err, InputError) else text.splitlines()[0]
