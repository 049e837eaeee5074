"""`farmiq-edge cloud-sink`: a reference cloud receiver for SPEC §3, with faults on demand.

Tooling, not a production process: used by the tests, the outbox benchmark,
`farmiq-edge up` when EDGE_CLOUD_URL is not set, and operators for staging.

    POST /v1/edge/events:batch   checks the bearer token (when --token is set),
                                 gzip (required over 1 KiB), Idempotency-Key ==
                                 batch_id and every event's fields; stores each
                                 event once by event_id; answers 200 with
                                 `acked` (stored now or before) and `rejected`
    GET  /v1/edge/ping           200 while the link is up

Storage: one SQLite file (stdlib), three tables a test can read directly:
`events` (one row per event id, first batch, arrival order, `out_of_order`
set when a device's event arrives after a later one of that device),
`deliveries` (every event of every batch answered 200, so a resend shows as a
second row and batch membership is recorded), `batches` (every POST: its
arrival and answer times, tenant, status, size, gzip), `bodies` (each stored
batch's body as it came over the wire: the payloads, byte for byte).

Faults: --fail-rate (share of batches answered --status, default 503, with
Retry-After --retry-after), --latency-ms, --reject-type (events of that type
come back rejected), --outage-seconds (the link is down for that long after
start: nothing listens, kept connections are cut). The same, at runtime, on
the admin port (never down):

    GET  /admin/stats            counts and the current faults
    GET  /admin/counters         events stored since start (from memory: cheap to poll)
    POST /admin/faults           {"fail_rate":…, "status":…, "retry_after":…,
                                  "latency_ms":…, "reject_types":[…]} (any subset)
    POST /admin/down             {"seconds": N} (omit for "until /admin/up")
    POST /admin/up               the link is back; answers {"up_at": unix time}
"""

from __future__ import annotations

import gzip
import hmac
import json
import logging
import random
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("farmiq_edge.cloud_sink")

BATCH_PATH, PING_PATH = "/v1/edge/events:batch", "/v1/edge/ping"
GZIP_OVER_BYTES = 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
EVENT_FIELDS = frozenset({"event_id", "tenant_id", "farm_id", "barn_id", "device_id", "session_id",
                          "event_type", "occurred_at", "trace_id", "payload"})

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY, tenant_id TEXT, farm_id TEXT, barn_id TEXT, device_id TEXT,
    session_id TEXT, event_type TEXT, occurred_at TEXT, trace_id TEXT,
    first_batch_id TEXT, received_at REAL, out_of_order INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS deliveries (batch_id TEXT NOT NULL, event_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT, idempotency_key TEXT, edge_id TEXT, tenant_id TEXT, received_at REAL, answered_at REAL,
    status INTEGER, events INTEGER, wire_bytes INTEGER, body_bytes INTEGER, gzip INTEGER,
    retry_after REAL);
-- The body of every batch answered 200, as received (gzip'd or not): the payloads.
CREATE TABLE IF NOT EXISTS bodies (batch_id TEXT PRIMARY KEY, gzip INTEGER, wire BLOB);
"""


@dataclass
class Faults:
    fail_rate: float = 0.0
    status: int = 503
    retry_after: float | None = 1.0
    latency_ms: int = 0
    reject_types: list[str] = field(default_factory=list)

    def update(self, changes: dict[str, Any]) -> None:
        for name, value in changes.items():
            if name not in self.__dataclass_fields__:
                raise ValueError(f"unknown fault {name!r}")
            setattr(self, name, value)


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class Store:
    """The sink's SQLite file; one connection, one writer at a time."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA cache_size=-65536")  # 64 MiB: the event_id index of a big backlog stays hot
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()
        self.stored = 0  # events stored since this process started (no query needed)
        # Latest occurred_at seen per (tenant, device), for the order check.
        self.latest: dict[tuple[str, str], datetime] = {}
        for t, d, o in self.db.execute("SELECT tenant_id, device_id, occurred_at FROM events"):
            o = datetime.fromisoformat(o)
            self.latest[t, d] = max(o, self.latest.get((t, d), o))

    def store(self, batch_id: str, events: list[dict[str, Any]], times: list[datetime], wire: bytes,
              gzipped: bool, rejected_types: set[str], now: float) -> tuple[list[str], list[dict[str, str]]]:
        acked, rejected, rows = [], [], []
        for e, occurred in zip(events, times):
            if e["event_type"] in rejected_types:
                rejected.append({"event_id": e["event_id"],
                                 "reason": f"event type {e['event_type']} not accepted (sink --reject-type)"})
                continue
            acked.append(e["event_id"])
            rows.append((e, occurred))
        with self.lock:
            self.db.execute("BEGIN")
            try:
                self.db.execute("INSERT OR IGNORE INTO bodies VALUES (?, ?, ?)", (batch_id, int(gzipped), wire))
                self.db.executemany("INSERT INTO deliveries (batch_id, event_id) VALUES (?, ?)",
                                    [(batch_id, e["event_id"]) for e in events])
                known = {r[0] for r in self.db.execute(
                    f"SELECT event_id FROM events WHERE event_id IN ({','.join('?' * len(rows))})",
                    [e["event_id"] for e, _ in rows])} if rows else set()
                fresh = []
                for e, occurred in rows:
                    if e["event_id"] in known:
                        continue
                    known.add(e["event_id"])
                    key = (e["tenant_id"], e["device_id"])
                    late = key in self.latest and occurred < self.latest[key]
                    if not late:
                        self.latest[key] = occurred
                    fresh.append((e["event_id"], e["tenant_id"], e["farm_id"], e["barn_id"], e["device_id"],
                                  e["session_id"], e["event_type"], e["occurred_at"], e["trace_id"],
                                  batch_id, now, int(late)))
                self.db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", fresh)
                self.db.execute("COMMIT")
                self.stored += len(fresh)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return acked, rejected

    def record_batch(self, row: tuple) -> None:
        with self.lock:
            self.db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            q = self.db.execute
            return {"events": q("SELECT count(*) FROM events").fetchone()[0],
                    "deliveries": q("SELECT count(*) FROM deliveries").fetchone()[0],
                    "out_of_order": q("SELECT count(*) FROM events WHERE out_of_order = 1").fetchone()[0],
                    "batches": dict(q("SELECT status, count(*) FROM batches GROUP BY status").fetchall())}


def parse_batch(body: bytes, idempotency_key: str | None
                ) -> tuple[str, str, list[dict[str, Any]], list[datetime]]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise BadRequest(400, "body is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"edge_id", "batch_id", "events"}:
        raise BadRequest(400, "body must have exactly edge_id, batch_id, events")
    if idempotency_key != doc["batch_id"]:
        raise BadRequest(400, "Idempotency-Key must equal batch_id")
    events = doc["events"]
    if not isinstance(events, list) or not 1 <= len(events) <= 1000:
        raise BadRequest(400, "events must be a list of 1..1000")
    times = []
    for e in events:
        if not isinstance(e, dict) or set(e) != EVENT_FIELDS:
            raise BadRequest(400, "an event must have exactly " + ", ".join(sorted(EVENT_FIELDS)))
        try:
            times.append(datetime.fromisoformat(e["occurred_at"]))
        except (TypeError, ValueError):
            raise BadRequest(400, "occurred_at must be an RFC 3339 time") from None
    return doc["edge_id"], doc["batch_id"], events, times


class Sink:
    """The running sink: the data server (goes down on demand) and the admin server."""

    def __init__(self, db_path: Path, host: str, port: int, token: str, faults: Faults) -> None:
        self.store = Store(db_path)
        self.host, self.port, self.token, self.faults = host, port, token, faults
        self.down = threading.Event()
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.up_timer: threading.Timer | None = None

    # --- link up / down -------------------------------------------------------

    def link_up(self) -> float:
        with self.lock:
            if self.up_timer is not None:
                self.up_timer.cancel()
                self.up_timer = None
            if self.server is None:
                self.server = _Server((self.host, self.port), _handler(self, admin=False))
                threading.Thread(target=self.server.serve_forever, daemon=True, name="sink-data").start()
            self.down.clear()
            up_at = time.time()
        log.info("event=sink_up port=%d", self.port)
        return up_at

    def link_down(self, seconds: float | None) -> None:
        with self.lock:
            self.down.set()  # kept connections are cut at their next request
            if self.server is not None:
                self.server.shutdown()
                self.server.server_close()
                self.server = None
            if seconds is not None:
                self.up_timer = threading.Timer(seconds, self.link_up)
                self.up_timer.daemon = True
                self.up_timer.start()
        log.info("event=sink_down seconds=%s", seconds)

    # --- requests -----------------------------------------------------------------

    def handle_batch(self, headers: Any, raw: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        received = time.time()
        faults = self.faults
        if faults.latency_ms:
            time.sleep(faults.latency_ms / 1000)
        status, answer, extra, batch_id, edge_id, events = 200, {}, {}, None, None, []
        gzipped = (headers.get("Content-Encoding") or "").lower() == "gzip"
        body = raw
        try:
            if self.token and not hmac.compare_digest(headers.get("Authorization") or "",
                                                      f"Bearer {self.token}"):
                raise BadRequest(401, "bad or missing bearer token")
            if gzipped:
                try:
                    body = gzip.decompress(raw)
                except (OSError, EOFError):
                    raise BadRequest(400, "Content-Encoding gzip but the body is not gzip") from None
            elif len(raw) > GZIP_OVER_BYTES:
                raise BadRequest(400, f"bodies over {GZIP_OVER_BYTES} bytes must be gzip'd")
            edge_id, batch_id, events, times = parse_batch(body, headers.get("Idempotency-Key"))
            if faults.fail_rate and random.random() < faults.fail_rate:
                status, answer = faults.status, {"error": "injected failure"}
                if faults.retry_after is not None and faults.status in (429, 503):
                    extra["Retry-After"] = f"{faults.retry_after:g}"
            else:
                acked, rejected = self.store.store(batch_id, events, times, raw, gzipped,
                                                   set(faults.reject_types), received)
                answer = {"acked": acked, "rejected": rejected}
        except BadRequest as exc:
            status, answer = exc.status, {"error": exc.reason}
        tenant = events[0].get("tenant_id") if events else None  # the edge sends one tenant per batch
        self.store.record_batch((batch_id, headers.get("Idempotency-Key"), edge_id, tenant, received, time.time(),
                                 status, len(events), len(raw), len(body), int(gzipped),
                                 float(extra["Retry-After"]) if "Retry-After" in extra else None))
        return status, answer, extra

    def handle_admin(self, method: str, path: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if method == "GET" and path == "/admin/counters":
            return 200, {"stored": self.store.stored, "down": self.down.is_set()}
        if method == "GET" and path == "/admin/stats":
            return 200, {**self.store.stats(), "down": self.down.is_set(), "faults": asdict(self.faults)}
        if method == "POST" and path == "/admin/faults":
            try:
                self.faults.update(doc)
            except ValueError as exc:
                return 400, {"error": str(exc)}
            return 200, asdict(self.faults)
        if method == "POST" and path == "/admin/down":
            self.link_down(doc.get("seconds"))
            return 200, {"down_at": time.time()}
        if method == "POST" and path == "/admin/up":
            return 200, {"up_at": self.link_up()}
        return 404, {"error": "not found"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def _handler(sink: Sink, *, admin: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the forwarder reuses its connections

        def log_message(self, fmt: str, *args: Any) -> None:  # one line per request is too many
            pass

        def _read(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise BadRequest(413, "body too large")
            return self.rfile.read(length)

        def _reply(self, status: int, doc: dict[str, Any], extra: dict[str, str] | None = None) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _cut_if_down(self) -> bool:
            if not admin and sink.down.is_set():
                self.close_connection = True  # the link is gone: no answer at all
                return True
            return False

        def do_GET(self) -> None:
            if self._cut_if_down():
                return
            if admin:
                self._reply(*sink.handle_admin("GET", self.path, {}))
            elif self.path == PING_PATH:
                self._reply(200, {"ok": True})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            try:
                raw = self._read()
            except BadRequest as exc:
                self.close_connection = True
                self._reply(exc.status, {"error": exc.reason})
                return
            if self._cut_if_down():
                return
            if admin:
                try:
                    doc = json.loads(raw or b"{}")
                except ValueError:
                    doc = None
                if not isinstance(doc, dict):
                    self._reply(400, {"error": "admin bodies are JSON objects"})
                    return
                self._reply(*sink.handle_admin("POST", self.path, doc))
            elif self.path == BATCH_PATH:
                self._reply(*sink.handle_batch(self.headers, raw))
            else:
                self._reply(404, {"error": "not found"})

    return Handler


def run_sink(*, db_path: Path, host: str, port: int, admin_port: int | None, token: str,
             faults: Faults, outage_seconds: float) -> int:
    import signal
    sink = Sink(db_path, host, port, token, faults)
    if admin_port is not None:
        admin = _Server((host, admin_port), _handler(sink, admin=True))
        threading.Thread(target=admin.serve_forever, daemon=True, name="sink-admin").start()
    if outage_seconds > 0:
        sink.link_down(outage_seconds)
    else:
        sink.link_up()
    log.info("event=sink_started url=http://%s:%d admin=%s db=%s faults=%s", host, port,
             f"http://{host}:{admin_port}" if admin_port is not None else "-", db_path,
             json.dumps(asdict(faults)))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    stopping.wait()
    log.info("event=sink_stopped")
    return 0
