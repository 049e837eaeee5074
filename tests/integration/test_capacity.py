"""`farmiq-edge capacity`: its built-in bytes per row re-measured on a real database.

100,000 readings (200 devices × 125 messages × 4 readings, 15 s apart) go
through the real ingest code path (actors.ingest.ingest_events, batches of
500 in transactions), the real aggregation (merge + close-out with
telemetry.aggregated events) and the real queue store (ingest batch messages
enqueued with broker.enqueue_in); `measure()` — what `--measure` runs — must
then agree with the built-in figures within 20 %, so they cannot go stale.
"""

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from actors.aggregate import CLOSE_OUT_PAGE, close_out_buckets, merge_pending
from actors.broker import broker
from actors.ingest import ingest_batch, ingest_events
from models.messages import parse_message
from schema.db import raw_cursor, transaction
from tests.support import corpus
from workers.capacity import BUILTIN, Assumptions, measure, plan, pvc_size
from workers.cli import main

DEVICES, MESSAGES_PER_DEVICE, READINGS = 200, 125, 4
METRICS = (("temperature", "C"), ("humidity", "%"), ("co2", "ppm"), ("nh3", "ppm"))
BATCH = 500
MEASURED = ("telemetry_raw", "telemetry_agg", "ingress_dedupe", "sync_outbox", "queue")


def _events(now: datetime) -> list:
    start = now - timedelta(days=1)
    events = []
    for m in range(MESSAGES_PER_DEVICE):
        for d in range(DEVICES):
            at = start + timedelta(seconds=15 * m, milliseconds=d)
            readings = [{"metric_type": t, "metric_value": round(20 + (m * d) % 97 / 7, 2), "unit": u}
                        for t, u in METRICS]
            payload = corpus.telemetry_payload(f"0199a0b2-{d:04x}-7d3a-9f10-{m:012x}", at, readings)
            events.append(parse_message(
                corpus.topic("telemetry", tenant_id="tenant-01", farm_id="farm-01", barn_id="barn-01",
                             device_id=f"sensor-{d:04d}"),
                payload, now=now, max_clock_skew=timedelta(hours=24),
                media_max_bytes=corpus.DEFAULT_MEDIA_MAX_BYTES,
                max_payload_bytes=corpus.default_max_payload_bytes(corpus.DEFAULT_MEDIA_MAX_BYTES)))
    return events


def test_builtin_bytes_per_row_match_a_measured_run(db_url: str) -> None:
    events = _events(datetime.now(timezone.utc))
    for i in range(0, len(events), BATCH):
        with transaction(db_url) as conn:
            ingest_events(conn, events[i:i + BATCH], sync_telemetry="agg")
    while True:
        with transaction(db_url) as conn:
            if merge_pending(conn) == 0:
                break
    while True:
        with transaction(db_url) as conn:
            if close_out_buckets(conn, emit_events=True) < CLOSE_OUT_PAGE:
                break
    # The queue store holding the same events as ingest batch messages (a backlog).
    with transaction(db_url) as conn, raw_cursor(conn) as cursor:
        for i in range(0, len(events), BATCH):
            broker.enqueue_in(cursor, ingest_batch.message([e.model_dump(mode="json") for e in events[i:i + BATCH]]))
    with transaction(db_url) as conn:
        conn.execute(text("ANALYZE"))
        sizes, frame = measure(conn)
        raw_rows = conn.execute(text("SELECT count(*) FROM telemetry_raw")).scalar_one()

    assert raw_rows == DEVICES * MESSAGES_PER_DEVICE * READINGS == 100_000
    assert frame is None  # no media in this run: --frame-kb stays
    stale = []
    for table in MEASURED:
        got, builtin = sizes[table], BUILTIN[table]
        print(f"{table}: measured {got.heap:.0f} + {got.index:.0f} = {got.total:.0f} B/row "
              f"({got.source}); built-in {builtin.heap:.0f} + {builtin.index:.0f} = {builtin.total:.0f}")
        if builtin.total != pytest.approx(got.total, rel=0.20):
            stale.append(table)
    assert stale == [], "built-in bytes per row off by more than 20 %"


def test_plan_for_200_devices_10_cameras_7_days_offline() -> None:
    a = Assumptions(devices=200, interval_seconds=15, readings=4, cameras=10, frames_per_session=20,
                    sessions_per_day=24, offline_days=7, frame_bytes=60 * 1024, retention_raw_days=30,
                    retention_agg_days=365, retention_media_days=30, retention_outbox_days=14,
                    dedupe_ttl_hours=72, sync_telemetry="agg")
    p = plan(a, BUILTIN)
    rows = {line.what: line.rows for line in p.database}
    assert rows["telemetry_raw"] == 200 * 4 * (86_400 / 15) * (30 + 7)
    assert rows["telemetry_agg"] == 200 * 4 * (1440 + 24 + 1) * (365 + 7)
    assert rows["media_objects"] == 10 * 24 * 20 * (30 + 7)
    assert p.media_bytes == 10 * 24 * 20 * (30 + 7) * 60 * 1024
    assert p.database_bytes == sum(line.rows * BUILTIN[line.what].total for line in p.database)
    assert p.database_volume_bytes == pytest.approx(p.database_bytes * 1.3)
    assert pvc_size(p.media_pvc_bytes) == "14Gi"  # 10.2 GiB of frames + 30 %


def test_capacity_command_prints_assumptions_results_and_settings(db_url, monkeypatch, capsys) -> None:
    monkeypatch.setenv("EDGE_DATABASE_URL", db_url)
    assert main(["capacity", "--devices", "200", "--interval", "15s", "--readings", "4", "--cameras", "10",
                 "--frames-per-session", "20", "--sessions-per-day", "24", "--offline-days", "7"]) == 0
    out = capsys.readouterr().out
    for expected in ("Assumptions", "200 × 4 / 15s", "Bytes per row", "Needed at the end of the offline window",
                     "PostgreSQL data volume:", "media PVC (farmiq-media, /data/media): 14Gi",
                     "EDGE_RETENTION_RAW_DAYS=30", "EDGE_SYNC_TELEMETRY=agg"):
        assert expected in out, expected
    # --measure on an empty database keeps the built-in figures.
    assert main(["capacity", "--measure"]) == 0
    assert "measured (" not in capsys.readouterr().out
