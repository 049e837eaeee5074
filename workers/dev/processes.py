"""`farmiq-edge` subprocesses: started as an operator starts them, killed as a crash would.

Used by the benchmark and the end-to-end tests. Each child runs in its own
session (dramatiq forks worker processes, so a crash kills the group) and gets
SIGTERM if its parent dies, so nothing outlives a crashed run.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class NotReady(Exception):
    """A child exited, or did not log that it was ready, in time."""


def die_with_parent() -> None:
    # Runs in the child before exec: SIGTERM it when the parent dies. (Linux
    # ties this to the thread that started the child: start from a long-lived one.)
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def edge_command(*args: str) -> list[str]:
    """`farmiq-edge ARGS` with this interpreter (no need for the venv on PATH)."""
    return [sys.executable, "-m", "workers.cli", *args]


class EdgeProcess:
    """A child process (usually `edge_command(...)`) with its own EDGE_* environment."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "EdgeProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env={**os.environ, **self.env},
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=die_with_parent)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """A crash: SIGKILL to the whole process group, no cleanup."""
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        """A clean shutdown: SIGTERM to the main process (dramatiq forwards it), then wait."""
        if self.proc is None:
            return None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if not self.alive():
                raise NotReady(f"{self.name} exited before it was ready; last log lines:\n"
                               + "\n".join(self.log().splitlines()[-15:]))
            time.sleep(0.1)
        raise NotReady(f"{self.name} not ready after {timeout:.0f}s (no {text!r} in its log)")
