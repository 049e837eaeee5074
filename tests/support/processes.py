"""Start farmiq-edge processes the way an operator would, kill them the way a crash would."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parents[2]


class EdgeProcess:
    """`farmiq-edge <args>` as a child process with its own EDGE_* environment."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args, self.env, self.log_path = args, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "EdgeProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "workers.cli", *self.args], cwd=ROOT,
                                     env={**os.environ, **self.env}, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    def kill9(self) -> None:
        """A crash: SIGKILL to the whole process group (dramatiq forks workers)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        """A clean shutdown: SIGTERM, then wait."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the main process; dramatiq forwards it
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def edge_env(db_url: str, mqtt_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    env = {"EDGE_DATABASE_URL": db_url, "EDGE_MQTT_URL": mqtt_url, "EDGE_METRICS_PORT": "0",
           "EDGE_MEDIA_ROOT": str(tmp / "media"), "EDGE_BRIDGE_HEARTBEAT_PATH": str(tmp / "heartbeat"),
           "EDGE_WORKER_THREADS": "4", "EDGE_MQTT_CLIENT_ID": f"bridge-{tmp.name}"[:64]}
    env.update(extra)
    return env


def scalar(db_url: str, sql: str, params: tuple = ()) -> object:
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()[0]
    finally:
        conn.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def queue_idle(db_url: str) -> bool:
    """No unfinished queue message (queued or being processed)."""
    return scalar(db_url, "SELECT count(*) FROM dramatiq.queue WHERE state IN ('queued', 'consumed')") == 0
