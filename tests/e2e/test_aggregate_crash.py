"""Issue 4: kill -9 of the aggregate worker mid-run loses no bucket.

A real `farmiq-edge worker --queues aggregate` drains a backlog of pending
partials several pages long; it is killed (SIGKILL to its process group) once
some but not all pages have committed, restarted, and sent the work again.
"""

from datetime import datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID

from actors.aggregate import PENDING_PAGE, aggregate_pending
from actors.ingest import ingest_events
from models.messages import parse_message
from schema.db import engine_for, transaction
from tests.integration.test_aggregate import REFERENCE, assert_agg_equals_group_by
from tests.support import corpus
from tests.support.processes import edge_env, enqueue, queue_idle, scalar, wait_until
from workers.dev.processes import EdgeProcess, edge_command

NOW = datetime.now(timezone.utc)
DEVICES, MINUTES, METRICS = 4, 30, 100
# Live data: every bucket is still open (within the accepted clock skew), as the
# current minute's are under steady ingest, so close-out has nothing to send and
# the run's length is the merge alone. Starts 15 minutes before an hour boundary.
START = (NOW + timedelta(hours=2)).replace(minute=0, second=0, microsecond=0) - timedelta(minutes=15)
NO_MQTT = "mqtt://127.0.0.1:1"  # the aggregate worker never talks to MQTT

# Crash consistency at a quiet moment: for every bucket, what telemetry_agg holds
# plus what is still pending adds up to the raw count (nothing lost, nothing twice).
AGG_PLUS_PENDING_MISMATCHES = f"""
    WITH ref AS ({REFERENCE}),
    pending AS (
        SELECT p.tenant_id, p.device_id, p.metric_type, w.name AS "window",
               date_trunc(w.unit, p.bucket_start_at, 'UTC') AS bucket_start_at, sum(p.count) AS n
          FROM telemetry_agg_pending p
         CROSS JOIN (VALUES ('1m', 'minute'), ('1h', 'hour'), ('1d', 'day')) AS w(name, unit)
         GROUP BY 1, 2, 3, 4, 5),
    seen AS (
        SELECT tenant_id, device_id, metric_type, "window", bucket_start_at, sum(n) AS n
          FROM (SELECT tenant_id, device_id, metric_type, "window", bucket_start_at, count AS n
                  FROM telemetry_agg
                UNION ALL SELECT * FROM pending) AS parts
         GROUP BY 1, 2, 3, 4, 5)
    SELECT count(*)
      FROM ref FULL JOIN seen USING (tenant_id, device_id, metric_type, "window", bucket_start_at)
     WHERE ref.count IS DISTINCT FROM seen.n
"""


def backlog(db_url: str) -> int:
    """Ingest two messages per (device, minute), each with METRICS readings, in
    consecutive batches: the two pending partials of a minute bucket sit side by
    side in a page (as under steady ingest). Returns the number of pending rows."""
    readings = [(f"m{i}", float(i) - 37.5, "u") for i in range(METRICS)]

    def message(device: int, minute: int, half: int):
        at = START + timedelta(minutes=minute, seconds=10 + 30 * half, microseconds=device)
        return parse_message(
            corpus.topic("telemetry", device_id=f"device-{device}"),
            corpus.telemetry_payload(UUID(int=(device << 32) + 2 * minute + half + 1), at, readings),
            now=NOW, max_clock_skew=timedelta(hours=24), media_max_bytes=corpus.DEFAULT_MEDIA_MAX_BYTES,
            max_payload_bytes=corpus.default_max_payload_bytes(corpus.DEFAULT_MEDIA_MAX_BYTES))

    for minute in range(0, MINUTES, 2):
        for half in (0, 1):  # one batch each: a batch merges its own partials per minute
            batch = [message(d, m, half) for m in (minute, minute + 1) for d in range(DEVICES)]
            with transaction(db_url) as conn:
                ingest_events(conn, batch, sync_telemetry="agg")
    engine_for(db_url).dispose()  # only the worker's connections remain on this database
    return DEVICES * MINUTES * 2 * METRICS


def send_aggregate(db_url: str) -> None:
    """What the scheduler does every second: one `aggregate_pending` queue message."""
    enqueue(db_url, aggregate_pending.message())


def pending(db_url: str) -> int:
    return int(scalar(db_url, "SELECT count(*) FROM telemetry_agg_pending"))


def other_backends(db_url: str) -> int:
    return int(scalar(db_url, "SELECT count(*) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid()"))


def test_kill9_mid_run_loses_no_bucket(db_url: str, tmp_path: Path) -> None:
    total = backlog(db_url)
    assert pending(db_url) == total >= 4 * PENDING_PAGE  # several pages: a run takes seconds
    env = edge_env(db_url, NO_MQTT, tmp_path)

    worker = EdgeProcess("worker-1", edge_command("worker", "--queues", "aggregate"), env, tmp_path / "worker-1.log").start()
    try:
        send_aggregate(db_url)
        wait_until(lambda: pending(db_url) < total, 60, "the first page to commit", interval=0.02)
        worker.kill9()
    finally:
        worker.kill9()
    wait_until(lambda: other_backends(db_url) == 0, 30, "the killed worker's sessions to end")
    left = pending(db_url)
    assert 0 < left < total, f"not killed mid-run ({left} of {total} pending)\n{worker.log()}"
    # The quiet moment after the crash: merged + pending = raw, bucket by bucket.
    assert scalar(db_url, AGG_PLUS_PENDING_MISMATCHES) == 0

    worker = EdgeProcess("worker-2", edge_command("worker", "--queues", "aggregate"), env, tmp_path / "worker-2.log").start()
    try:
        send_aggregate(db_url)
        wait_until(lambda: pending(db_url) == 0 and queue_idle(db_url), 60,
                   "the restarted worker to drain the backlog")
    finally:
        worker.stop()
    assert "Traceback" not in worker.log(), worker.log()

    # Every bucket of all three windows equals the GROUP BY over telemetry_raw.
    minutes = [START + timedelta(minutes=m) for m in range(MINUTES)]
    per_series = (len(minutes) + len({m.replace(minute=0) for m in minutes})
                  + len({m.replace(hour=0, minute=0) for m in minutes}))
    assert assert_agg_equals_group_by(db_url) == DEVICES * METRICS * per_series
    # Open buckets: changed (needs_sync) but not sent yet.
    assert scalar(db_url, "SELECT bool_and(needs_sync) FROM telemetry_agg") is True
    assert scalar(db_url, "SELECT count(*) FROM sync_outbox") == 0
