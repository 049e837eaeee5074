"""Embedded services for `farmiq-edge up`, and for tests when nothing is configured.

PostgreSQL comes from pgserver (a bundled PostgreSQL 16 on a unix socket). The
MQTT brokers run as child processes (amqtt, or the system Mosquitto with the
project's config), so a broker never shares the caller's GIL. Every start
function returns once the service accepts connections; `stop()` (or leaving a
`with` block, or interpreter exit) ends it.
"""

from __future__ import annotations

import atexit
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import psutil

from workers.dev.processes import die_with_parent

MOSQUITTO = Path("/usr/sbin/mosquitto")
START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 10.0
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class EmbeddedService:
    """A running service: `url` reaches it, `stop()` ends it (safe to repeat)."""

    url: str

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (start_* retry if it is taken)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- PostgreSQL -------------------------------------------------------------

class PostgresService(EmbeddedService):
    def __init__(self, server: Any, url: str) -> None:
        self._server = server
        self.url = url

    def stop(self) -> None:
        """Stop the server unless another live process still holds a handle on it."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None


def start_postgres(data_dir: Path) -> PostgresService:
    """PostgreSQL 16 on `data_dir` (initialised on first use, reused afterwards).

    `url` is `postgresql://postgres@/postgres?host=<socket dir>&port=5432`:
    psycopg2/libpq take it as is; SQLAlchemy needs the driver spelled out
    (`postgresql+psycopg2://`, as schema/db.py does) because SQLAlchemy 2.1
    maps a bare `postgresql://` to psycopg 3.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(data_dir)
    with warnings.catch_warnings():
        # platformdirs warns at pgserver's import when XDG_RUNTIME_DIR is unset
        # (containers, CI); pgserver then uses /tmp/runtime-<uid>, which is fine.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", category=UserWarning)
        import pgserver

    server = pgserver.get_server(data_dir, cleanup_mode="stop")
    info = server.get_postmaster_info()
    url = f"postgresql://postgres@/postgres?host={quote(str(info.socket_dir))}&port={info.port}"
    return PostgresService(server, url)


def _forget_dead_handles(data_dir: Path) -> None:
    # pgserver stops the server only when the last process holding a handle
    # lets go; a process that crashed never lets go. Drop dead ones so a re-run
    # on the same data_dir can stop the server again.
    handles = data_dir / ".handle_pids.json"
    if handles.exists():
        alive = [pid for pid in json.loads(handles.read_text()) if psutil.pid_exists(pid)]
        handles.write_text(json.dumps(alive))


# --- Brokers in child processes ---------------------------------------------

class BrokerProcess(EmbeddedService):
    """A broker child process listening on 127.0.0.1:`port`; restartable in place."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path,
                 env: Mapping[str, str] | None = None, keep_log: bool = True) -> None:
        self.name, self.argv, self.port, self.log_path = name, argv, port, log_path
        self.keep_log = keep_log
        self.env = dict(env) if env is not None else None
        self.url = f"mqtt://127.0.0.1:{port}"
        self._proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Self:
        """Start (again, on the same port and data) and wait until it listens."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"{self.name} already running (pid {self._proc.pid})")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True, preexec_fn=die_with_parent)
        try:
            _wait_listening(self._proc, self.port, self.name, self.log_path)
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM (Mosquitto saves its persistence file) and wait."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL and wait: a crash. Mosquitto keeps only its last autosave."""
        self._end(signal.SIGKILL)

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not self.keep_log:
            self.log_path.unlink(missing_ok=True)


def start_mqtt(port: int | None = None) -> BrokerProcess:
    """An amqtt broker (MQTT 3.1.1 only, in memory, anonymous) in a child process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(_PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}

    def make(p: int) -> BrokerProcess:
        argv = [sys.executable, "-m", "workers.dev.embedded", "amqtt", str(p)]
        log_path = Path(tempfile.gettempdir()) / f"farmiq-amqtt-{p}.log"
        return BrokerProcess("amqtt", argv, p, log_path, env, keep_log=False)

    return _start_on_port(make, port)


def start_mosquitto(config: Path, data_dir: Path, port: int | None = None,
                    settings: Mapping[str, str | None] | None = None) -> BrokerProcess:
    """Mosquitto running `config` with its listener moved to 127.0.0.1:`port` and
    its persistence in `data_dir`; `settings` override further options (e.g.
    `{"autosave_interval": "30"}` for a crash test). `.start()` after `.stop()`
    or `.kill()` resumes on the same port from the same persistence file."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    conf_path = data_dir / "mosquitto.conf"

    def make(p: int) -> BrokerProcess:
        conf_path.write_text(mosquitto_config(Path(config).read_text(), data_dir, p, settings or {}))
        argv = [str(MOSQUITTO), "-c", str(conf_path)]
        return BrokerProcess("mosquitto", argv, p, data_dir / "mosquitto.log")

    return _start_on_port(make, port)


_AUTH_AND_TLS_OPTIONS = ("password_file", "acl_file", "cafile", "capath", "certfile", "keyfile",
                         "tls_version", "require_certificate")


def mosquitto_config(text: str, data_dir: Path, port: int,
                     settings: Mapping[str, str | None]) -> str:
    """`text` (a mosquitto.conf) rewritten for a private broker on 127.0.0.1:`port`:
    its first listener moves there, further listeners (the production TLS one)
    are dropped, and so are authentication and TLS options (a private broker on
    loopback; a test of them passes its own). A `settings` value replaces that
    option's line, None drops it."""
    overrides: dict[str, str | None] = {
        "persistence_location": f"{data_dir}/",   # mosquitto wants the trailing slash
        "user": pwd.getpwuid(os.geteuid()).pw_name,  # as root it would switch to `mosquitto`
        "log_dest": "stdout",                     # captured in data_dir/mosquitto.log
        "pid_file": None,                         # dropped
        "allow_anonymous": "true",
        **{key: None for key in _AUTH_AND_TLS_OPTIONS},
        **settings,
    }
    lines: list[str] = []
    done: set[str] = set()
    listeners = 0
    for line in text.splitlines():
        words = line.split()
        key = words[0] if words and not words[0].startswith("#") else ""
        if key == "listener":
            listeners += 1
            if listeners == 1:
                lines.append(f"listener {port} 127.0.0.1")
        elif key not in overrides:
            lines.append(line)
        elif key not in done and overrides[key] is not None:
            lines.append(f"{key} {overrides[key]}")   # rewritten in place, once
        done.add(key)
    if listeners < 1:
        raise ValueError("expected a listener in the Mosquitto config, found none")
    lines += [f"{key} {value}" for key, value in overrides.items()
              if key not in done and value is not None]
    return "\n".join(lines) + "\n"


def _start_on_port(make: Callable[[int], BrokerProcess], port: int | None) -> BrokerProcess:
    # A port picked by free_port() can be taken before the broker binds it
    # (parallel test runs); then the broker exits and we try another port.
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        broker = make(port if port is not None else free_port())
        try:
            return broker.start()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _wait_listening(proc: subprocess.Popen[bytes], port: int, name: str, log_path: Path) -> None:
    # Ready when *this* process holds the listening socket: a bare connect()
    # could reach whoever else grabbed the port.
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening on "
                               f"{port}; last log lines:\n{_tail(log_path)}")
        try:
            conns = psutil.Process(proc.pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{name} not listening on {port} after {START_TIMEOUT_SECONDS:.0f}s; "
                       f"last log lines:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- amqtt child-process body -------------------------------------------------

def _serve_amqtt(port: int) -> None:
    import asyncio

    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        # Only anonymous auth: the default packet/event loggers cost throughput.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def serve() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        broker = Broker(config)
        await broker.start()
        await stopping.wait()
        await broker.shutdown()

    asyncio.run(serve())


if __name__ == "__main__":
    if sys.argv[1:2] == ["amqtt"] and len(sys.argv) == 3:
        _serve_amqtt(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m workers.dev.embedded amqtt PORT")
