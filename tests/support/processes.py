"""Helpers for tests that run farmiq-edge processes (workers.dev.processes.EdgeProcess)."""

import time
from collections.abc import Callable
from pathlib import Path

import psycopg2



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


def rows(db_url: str, sql: str, params: tuple | dict | None = None) -> list[tuple]:
    """All rows of one statement in its own transaction ([] for a statement that returns none)."""
    conn = psycopg2.connect(db_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def enqueue(db_url: str, message) -> None:  # noqa: ANN001 - a dramatiq Message
    """Put `message` in the queue as the scheduler does (one transaction of its own)."""
    from actors.broker import broker
    conn = psycopg2.connect(db_url)
    try:
        with conn, conn.cursor() as cur:
            broker.enqueue_in(cur, message)
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
    """No unfinished data-path queue message (queued or being processed).

    The scheduler's maintenance and outbox messages are left out: data-path
    tests run no such worker, so they would wait for one forever.
    """
    return scalar(db_url, "SELECT count(*) FROM dramatiq.queue WHERE state IN ('queued', 'consumed') "
                          "AND queue_name NOT IN ('maintenance', 'outbox')") == 0


# The scheduled slot (workers/scheduler.py) of every queue message, as a list.
# Distinct event ids waiting in the ingest queue (a compact telemetry row has its id at index 5).
QUEUED_EVENT_IDS = ("SELECT count(DISTINCT coalesce(e->>'event_id', e->>5)) FROM dramatiq.queue q, "
                    "json_array_elements(q.message->'args'->0) e WHERE q.queue_name = 'ingest'")
SCHEDULED_SLOTS = ("SELECT coalesce(array_agg(message->'options'->>'scheduled_slot' ORDER BY 1), '{}') "
                   "FROM dramatiq.queue")
