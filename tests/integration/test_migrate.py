"""`farmiq-edge migrate`: complete on an empty database, idempotent, safe concurrently."""

import subprocess
import sys

import psycopg2
from psycopg2.extras import Json

from schema.migrate import load_migrations, pending_migrations
from workers.dev.processes import ROOT

EXPECTED_TABLES = {"telemetry_raw", "telemetry_agg", "telemetry_agg_pending", "weight_sessions",
                   "media_objects", "inference_results", "sync_outbox", "sync_state", "ingress_dedupe",
                   "ingress_dead_letters", "schema_migrations", "telemetry_agg_failed"}
EXPECTED_INDEXES = {
    "telemetry_raw_tenant_device_time_idx", "telemetry_raw_tenant_time_idx",
    "telemetry_agg_tenant_device_window_idx", "telemetry_agg_bucket_key",
    "weight_sessions_tenant_device_start_idx", "weight_sessions_tenant_status_start_idx",
    "media_objects_tenant_session_idx", "media_objects_tenant_device_captured_idx",
    "inference_results_tenant_session_idx", "inference_results_tenant_device_time_idx",
    "sync_outbox_status_attempt_idx", "sync_outbox_tenant_time_idx", "sync_outbox_tenant_id_key",
    "ingress_dedupe_tenant_event_key", "ingress_dedupe_first_seen_idx", "queue_due_idx", "queue_consumed_idx", "consumers_pkey",
}


def farmiq_edge(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def snapshot(url: str) -> dict:
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT table_schema, table_name FROM information_schema.tables "
                    "WHERE table_schema IN ('public', 'dramatiq') ORDER BY 1, 2")
        tables = cur.fetchall()
        cur.execute("SELECT schemaname, indexname, indexdef FROM pg_indexes "
                    "WHERE schemaname IN ('public', 'dramatiq') ORDER BY 1, 2")
        indexes = cur.fetchall()
        cur.execute("SELECT version, checksum FROM schema_migrations ORDER BY 1")
        migrations = cur.fetchall()
    conn.close()
    return {"tables": tables, "indexes": indexes, "migrations": migrations}


def test_migrate_creates_everything_then_changes_nothing(empty_db_url, monkeypatch):
    env = {"PATH": "/usr/bin:/bin", "EDGE_DATABASE_URL": empty_db_url}
    first = farmiq_edge("migrate", env=env)
    assert first.returncode == 0, first.stderr
    after_first = snapshot(empty_db_url)
    names = {t for _, t in after_first["tables"]}
    assert EXPECTED_TABLES <= names and "queue" in names
    assert EXPECTED_INDEXES <= {i for _, i, _ in after_first["indexes"]}
    assert [v for v, _ in after_first["migrations"]] == [m.version for m in load_migrations()]
    # Monthly partitions exist around now, plus the default ones.
    assert {"telemetry_raw_default", "telemetry_agg_default"} <= names
    assert sum(1 for n in names if n.startswith("telemetry_raw_2")) >= 6

    second = farmiq_edge("migrate", env=env)
    assert second.returncode == 0 and "migrations applied: 0" in second.stdout
    assert snapshot(empty_db_url) == after_first
    assert pending_migrations(empty_db_url) == []


def test_two_concurrent_migrations_both_succeed(empty_db_url):
    env = {"PATH": "/usr/bin:/bin", "EDGE_DATABASE_URL": empty_db_url}
    procs = [subprocess.Popen([sys.executable, "-m", "workers.cli", "migrate"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        results.append((p.returncode, out, err))
    assert [code for code, _, _ in results] == [0, 0], results
    applied = sorted(out.strip() for _, out, _ in results)
    assert applied[0] == "migrations applied: 0"  # the loser waited on the lock, then found nothing
    assert applied[1].startswith(f"migrations applied: {len(load_migrations())}")


def test_a_bad_setting_stops_startup_naming_the_variable(empty_db_url):
    env = {"PATH": "/usr/bin:/bin", "EDGE_DATABASE_URL": empty_db_url, "EDGE_RETENTION_RAW_DAYS": "5"}
    result = farmiq_edge("migrate", env=env)
    assert result.returncode == 2
    assert "EDGE_RETENTION_RAW_DAYS" in result.stderr
    assert pending_migrations(empty_db_url)  # nothing ran


def test_cannot_connect_exits_3():
    env = {"PATH": "/usr/bin:/bin", "EDGE_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"}
    result = farmiq_edge("migrate", env=env)
    assert result.returncode == 3
    assert "cannot connect" in result.stderr


def test_usage_error_exits_2():
    result = farmiq_edge("worker", "--queues", "nonsense", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2


def test_an_ingest_message_queued_before_0010_is_consumed_after_it(empty_db_url, monkeypatch):
    """0010 turns queue bodies from jsonb into json: a backlog queued by the
    older bridge (payloads as base64 in the body) keeps its bytes."""
    import uuid
    from datetime import datetime, timezone

    import schema.migrate
    from actors.broker import EdgeBroker
    from models.messages import validate_message
    from models.queue_events import decode, received_bytes, telemetry_row
    from models.settings import load_settings
    from tests.support import corpus

    every = schema.migrate.load_migrations
    monkeypatch.setattr(schema.migrate, "load_migrations",
                        lambda: [m for m in every() if m.version < "0010"])
    schema.migrate.migrate(empty_db_url)
    s, now = load_settings(database_url=empty_db_url), datetime.now(timezone.utc)
    payload = b'{"readings": [{"metric_type": "t", "metric_value": 7, "unit": "C"}],  "event_id": "%s",' \
              b' "occurred_at": "%s"}' % (str(uuid.uuid4()).encode(), corpus.timestamp(now).encode())
    ids, validated = validate_message(corpus.topic("telemetry"), payload, now=now,
                                      max_clock_skew=s.max_clock_skew, media_max_bytes=s.media_max_bytes,
                                      max_payload_bytes=s.max_payload_bytes)
    row = telemetry_row(ids, validated, payload)  # the older bridge's form: base64 in the body
    body = {"queue_name": "ingest", "actor_name": "ingest_batch", "args": [[row]], "kwargs": {},
            "options": {}, "message_id": str(uuid.uuid4()), "message_timestamp": 1}
    conn = psycopg2.connect(empty_db_url)
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO dramatiq.queue (queue_name, message_id, state, message)"
                    " VALUES ('ingest', %s, 'queued', %s)", (body["message_id"], Json(body)))
    conn.close()

    monkeypatch.setattr(schema.migrate, "load_migrations", every)
    assert "0010_queue_body_storage" in schema.migrate.migrate(empty_db_url)
    broker = EdgeBroker(url=empty_db_url)
    consumer = broker.consume("ingest", prefetch=1, timeout=50)
    try:
        message = next(consumer)
        assert (message.message_id, message.args) == (body["message_id"], tuple(body["args"]))
        [event] = decode(message.args[0])
        assert received_bytes(event) == (payload, len(payload))
    finally:
        consumer.close()
        broker.close()
