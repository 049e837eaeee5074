"""`farmiq-edge up` as a new user runs it, in a real terminal (a pty): the live
status view appears within 10 s, process logs go to <state-dir>/logs (not the
terminal), the embedded PostgreSQL's chatter stays out of the terminal, and
Ctrl-C (SIGINT to the foreground process group, as a terminal sends it) stops
every process with exit 0. A second run reuses the data.
"""

import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import scalar, wait_until
from workers.dev.processes import ROOT

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """A child process on a pty, 120×40, in its own process group (the terminal's foreground job)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        os.set_blocking(self.master, False)
        env = {**env, "COLUMNS": "120", "LINES": "40", "TERM": "xterm-256color"}
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True)
        os.close(slave)
        self.screen = b""

    def read(self) -> str:
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the child closed the pty
                break
            if not chunk:
                break
            self.screen += chunk
        return ANSI.sub(b"", self.screen).decode("utf-8", "replace")

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read()
            time.sleep(0.1)
        self.read()
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path (mode 0700): run as root, pgserver runs pg_ctl as
    # the user `pgserver`, which must reach the data directory to stop the server.
    path = Path(tempfile.mkdtemp(prefix="farmiq-up-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _up(state: Path) -> Terminal:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(EDGE_METRICS_PORT="0", EDGE_BRIDGE_HEARTBEAT_PATH=str(state / "heartbeat"))
    return Terminal([sys.executable, "-m", "workers.cli", "up", "--state-dir", str(state), "--interval", "1"], env)


def _run_once(tmp_path: Path) -> tuple[str, int]:
    """Start up, wait for the view and for data, Ctrl-C; return (screen, raw rows before Ctrl-C)."""
    term = _up(tmp_path)
    started = time.monotonic()
    try:
        wait_until(lambda: "Queues (dramatiq.queue)" in term.read(), 60, "the live view")
        shown_after = time.monotonic() - started
        screen = term.read()
        url = re.search(r"event=embedded_postgres url=(\S+)", screen).group(1)
        wait_until(lambda: scalar(url, "SELECT count(*) FROM telemetry_agg") > 0, 90, "aggregated telemetry")
        # The view follows the data: accepted events show up in it.
        wait_until(lambda: re.search(r"accepted events\s+\d+\s+[1-9][\d,]*\*", term.read()[-6000:]) is not None,
                   30, "accepted events in the view")
        raw_rows = int(scalar(url, "SELECT count(*) FROM telemetry_raw"))
        term.ctrl_c()
        code = term.wait(60)
        screen = term.read()
    finally:
        term.close()
    assert code == 0, screen[-3000:]
    assert shown_after < 10 or os.environ.get("CI"), f"live view after {shown_after:.1f} s"
    print(f"live view shown {shown_after:.1f} s after start")
    # Every child (bridge, workers, scheduler, simulator, brokers) is gone with it.
    leftovers = subprocess.run(["pgrep", "-g", str(term.proc.pid)], capture_output=True, text=True).stdout
    assert leftovers.strip() == ""
    return screen, raw_rows


def test_up_shows_the_live_view_and_stops_on_ctrl_c(state_dir):
    screen, raw_rows = _run_once(state_dir)
    logs = state_dir / "logs"
    # Process output is in one file per process, not on the terminal.
    for name in ("bridge", "ingest", "aggregate", "scheduler", "simulate", "system", "up"):
        assert (logs / f"{name}.log").exists(), name
    assert "event=mqtt_subscribed" in (logs / "bridge.log").read_text()
    assert "event=mqtt_subscribed" not in screen
    assert "Dramatiq" not in screen
    # pgserver's start-up chatter (initdb, pg_ctl) is in up.log, not on the terminal.
    assert "initdb" in (logs / "up.log").read_text()
    assert "initdb" not in screen and "pg_ctl" not in screen
    # A second run reuses the data (same database directory, rows still there).
    assert _count_after_restart(state_dir) >= raw_rows > 0
    assert "Failed to stop server" not in (logs / "up.log").read_text()


def _count_after_restart(tmp_path: Path) -> int:
    term = _up(tmp_path)
    try:
        wait_until(lambda: "event=embedded_postgres" in term.read(), 60, "embedded PostgreSQL again")
        url = re.search(r"event=embedded_postgres url=(\S+)", term.read()).group(1)
        wait_until(lambda: "Queues (dramatiq.queue)" in term.read(), 60, "the live view again")
        n = scalar(url, "SELECT count(*) FROM telemetry_raw")
        term.ctrl_c()
        assert term.wait(60) == 0
    finally:
        term.close()
    return int(n)


def test_status_watch_redraws_in_place_until_ctrl_c(db_url, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EDGE_")},
           "EDGE_DATABASE_URL": db_url, "EDGE_MEDIA_ROOT": str(tmp_path)}
    term = Terminal([sys.executable, "-m", "workers.cli", "status", "--watch", "--interval", "0.5"], env)
    try:
        wait_until(lambda: term.read().count("Queues (dramatiq.queue)") >= 1, 30, "the first frame")
        first = len(term.screen)
        wait_until(lambda: term.read() is not None and len(term.screen) > first + 200, 30, "a redraw")
        # Redrawn in place: rich moves the cursor up over the previous frame and erases it.
        assert re.search(rb"\x1b\[\d*A", term.screen) and b"\x1b[2K" in term.screen
        term.ctrl_c()
        assert term.wait(30) == 0
    finally:
        term.close()
