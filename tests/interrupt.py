"""Ctrl-C as a terminal delivers it, to a command running in a child process, and what came of it.

The child starts with SIGINT at its default: a suite run in the background (``cmd &``) ignores
SIGINT, and a child that inherits that never gets Python's ``KeyboardInterrupt``."""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Stopped:
    returncode: int
    output: str  # stdout and stderr together
    seconds: float  # from the SIGINT to the exit

    def stop_lines(self, prog: str = "idml") -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith(f"{prog}: stopped (Ctrl-C)")]

    def assert_clean(self, prog: str = "idml", *, within_s: float) -> str:
        """Exit 130, one line saying it stopped, no traceback, within ``within_s``; returns the line."""
        assert self.returncode == 130, self.output[-3000:]
        assert len(self.stop_lines(prog)) == 1 and "Traceback" not in self.output, self.output[-3000:]
        assert self.seconds < within_s, f"stopped after {self.seconds:.1f} s:\n{self.output[-3000:]}"
        return self.stop_lines(prog)[0]


def ctrl_c_when(cmd: list[str], ready: str, *, log: Path, cwd, env=None, start_s: float = 300,
                stop_s: float = 120) -> Stopped:
    """Run ``cmd``, send it SIGINT once ``ready`` appears in its output, and wait for it to stop
    (killed after ``stop_s``: a hang fails the test, it never blocks the suite)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + start_s
        while ready not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"exited with {proc.returncode} before {ready!r}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {ready!r} in {start_s:g} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=stop_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return Stopped(proc.returncode, log.read_text(errors="replace"), time.monotonic() - sent)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
