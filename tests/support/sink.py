"""The reference cloud sink (`farmiq-edge cloud-sink`) as a real process, and outbox fixtures."""

import json
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import psycopg2

from workers.dev.embedded import free_port
from workers.dev.processes import EdgeProcess, NotReady, edge_command

TOKEN = "test-token"


class SinkProcess:
    """A running sink with its admin port; what it stored is read from its SQLite file."""

    def __init__(self, tmp: Path, *args: str, name: str = "cloud-sink") -> None:
        self.db = tmp / f"{name}.sqlite3"
        for attempt in range(3):
            # A free port can be taken (by anything on the machine) before the sink binds it.
            self.port, self.admin_port = free_port(), free_port()
            self.proc = EdgeProcess(name, edge_command(
                "cloud-sink", "--port", str(self.port), "--admin-port", str(self.admin_port),
                "--db", str(self.db), "--token", TOKEN, *args), {"EDGE_METRICS_PORT": "0"},
                tmp / f"{name}.log").start()
            try:
                self.proc.wait_for_log("event=sink_started", 30)
                return
            except NotReady:
                if attempt == 2 or "Address already in use" not in self.proc.log():
                    raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def admin(self, method: str, path: str, doc: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(doc).encode() if doc is not None else (b"{}" if method == "POST" else None)
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict[str, Any]:
        return self.admin("GET", "/admin/stats")

    def faults(self, **changes: Any) -> dict[str, Any]:
        return self.admin("POST", "/admin/faults", changes)

    def down(self, seconds: float | None = None) -> None:
        self.admin("POST", "/admin/down", {} if seconds is None else {"seconds": seconds})

    def up(self) -> float:
        return self.admin("POST", "/admin/up")["up_at"]

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.stop()


def outbox_env(db_url: str, sink: SinkProcess, **extra: str) -> dict[str, str]:
    """Environment of forwarder and scheduler processes talking to `sink`."""
    env = {"EDGE_DATABASE_URL": db_url, "EDGE_CLOUD_URL": sink.url, "EDGE_CLOUD_TOKEN": TOKEN,
           "EDGE_METRICS_PORT": "0", "EDGE_EDGE_ID": "test-edge", "EDGE_WORKER_THREADS": "4"}
    env.update(extra)
    return env


def add_pending(db_url: str, n: int, *, tenants: int = 1, devices: int = 20,
                event_type: str = "telemetry.aggregated", tenant_prefix: str = "tenant") -> None:
    """`n` pending outbox events spread over tenants and devices, occurred_at increasing."""
    conn = psycopg2.connect(db_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("""
                INSERT INTO sync_outbox (id, tenant_id, farm_id, barn_id, device_id, event_type,
                                         occurred_at, payload_json)
                SELECT gen_random_uuid(), %s || '-' || (i %% %s), 'farm-1', 'barn-1',
                       'dev-' || lpad((i %% %s)::text, 4, '0'), %s,
                       now() - interval '7 days' + i * interval '10 ms',
                       jsonb_build_object('window', '1m', 'metric_type', 'temperature', 'count', 60,
                                          'avg_value', 21.5, 'seq', i)
                  FROM generate_series(1, %s) AS i""", (tenant_prefix, tenants, devices, event_type, n))
    finally:
        conn.close()
