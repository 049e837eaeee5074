"""`farmiq-edge status` on a real database: every figure comes from the tables."""

import uuid
from datetime import datetime, timedelta, timezone

from rich.console import Console
from sqlalchemy import insert, text

from actors.broker import broker
from actors.ingest import ingest_batch, ingest_events
from models.ingress_dead_letters import dead_letter_row
from models.messages import INGRESS_EVENTS
from models.tables import ingress_dead_letters
from schema.db import raw_cursor, transaction
from tests.support import corpus
from workers.cli import main
from workers.db_metrics import DatabaseCollector
from workers.status import collect, read_snapshot, render

NOW = datetime.now(timezone.utc)


def _telemetry(n: int) -> list:
    return INGRESS_EVENTS.validate_python([
        {"kind": "telemetry", "tenant_id": "t1", "farm_id": "f1", "barn_id": "b1", "device_id": f"d{i % 3}",
         "event_id": str(uuid.uuid4()), "occurred_at": (NOW - timedelta(seconds=i)).isoformat(),
         "readings": [{"metric_type": "temperature", "metric_value": 20.0, "unit": "C"}]} for i in range(n)])


def _populate(db_url: str) -> None:
    with transaction(db_url) as conn:
        ingest_events(conn, _telemetry(30), sync_telemetry="raw")  # 30 accepted, 30 outbox events pending
        conn.execute(insert(ingress_dead_letters), [dead_letter_row(corpus.topic("telemetry"), b"{", "invalid_json", "x")
                                                    for _ in range(2)])
        conn.execute(text("UPDATE ingress_dead_letters SET received_at = now() - interval '1 hour' "
                          "WHERE id = (SELECT id FROM ingress_dead_letters ORDER BY id LIMIT 1)"))
        with raw_cursor(conn) as cursor:
            broker.enqueue_in(cursor, ingest_batch.message([]))                 # due
            broker.enqueue_in(cursor, ingest_batch.message([]), delay=3_600_000)  # delayed an hour
        conn.execute(text("INSERT INTO dramatiq.queue (queue_name, message_id, state, message) "
                          "VALUES ('ingest', gen_random_uuid(), 'rejected', '{}')"))
        conn.execute(text("UPDATE sync_outbox SET status = 'acked' WHERE id IN (SELECT id FROM sync_outbox LIMIT 10)"))
        conn.execute(text("INSERT INTO sync_state (tenant_id, last_acked_at, consecutive_failures, paused_until) "
                          "VALUES ('t1', now() - interval '5 minutes', 4, now() + interval '1 minute'), "
                          "       ('t2', now() - interval '1 minute', 0, NULL)"))


def test_snapshot_reads_every_figure_from_the_database(db_url, tmp_path):
    _populate(db_url)
    with transaction(db_url) as conn:
        s = collect(conn, media_root=str(tmp_path))
    ingest = next(q for q in s.queues if q.queue == "ingest")
    assert (ingest.due, ingest.delayed, ingest.claimed, ingest.rejected) == (1, 1, 0, 1)
    assert ingest.oldest_due_seconds is not None and ingest.consumers == 0
    assert (s.accepted_1m, s.accepted_total) == (30, 30)
    assert (s.dead_1m, s.dead_total) == (1, 2)
    assert s.agg_pending in (3, 6) and s.agg_lag_seconds is not None  # three devices, one or two minutes
    assert s.outbox == {"pending": 20, "acked": 10}
    assert s.outbox_oldest_pending_seconds is not None
    assert 50 < s.last_ack_seconds < 300  # the newest ack: t2, a minute ago
    assert s.max_consecutive_failures == 4 and s.paused_tenants == ["t1"]
    assert s.retention == []  # no job has run yet
    assert s.inference_backlog == 0  # inference_pending (migration 0005), empty
    assert s.volume.exact and s.volume.free_bytes > 0

    console = Console(force_terminal=True, width=110, record=True)
    console.print(render(s))
    screen = console.export_text()
    for expected in ("Queues (dramatiq.queue)", "accepted events", "paused tenants", "1 (t1)",
                     "retention last runs", "no job has run yet", "media volume free"):
        assert expected in screen, expected


def test_retention_runs_show_from_the_scheduler_table(db_url, tmp_path):
    with transaction(db_url) as conn:
        conn.execute(text("INSERT INTO scheduled_jobs (job, every_seconds, last_slot_at, last_success_at) VALUES "
                          "('retention.dedupe', 900, now(), now() - interval '2 minutes'), "
                          "('retention.media', 3600, now(), NULL), ('aggregate', 1, now(), NULL)"))
    s = read_snapshot(db_url, str(tmp_path / "not-yet"))
    assert [(r.job, r.success_seconds is None) for r in s.retention] == [("dedupe", False), ("media", True)]
    assert not s.volume.exact  # the media root does not exist: its nearest parent is measured
    console = Console(force_terminal=True, width=110, record=True)
    console.print(render(s))
    screen = console.export_text()
    assert "retention dedupe" in screen and "ok 2m00s ago" in screen and "never succeeded" in screen


def test_status_command(db_url, empty_db_url, monkeypatch, capsys, tmp_path):
    _populate(db_url)
    monkeypatch.setenv("EDGE_MEDIA_ROOT", str(tmp_path))
    monkeypatch.setenv("EDGE_DATABASE_URL", db_url)
    assert main(["status"]) == 0
    assert "Cloud sync (outbox)" in capsys.readouterr().out
    monkeypatch.setenv("EDGE_DATABASE_URL", empty_db_url)
    assert main(["status"]) == 1
    assert "farmiq-edge migrate" in capsys.readouterr().err
    monkeypatch.setenv("EDGE_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/nowhere")
    assert main(["status"]) == 3


def test_database_gauges_for_prometheus(db_url, tmp_path):
    _populate(db_url)
    families = {f.name: f for f in DatabaseCollector(db_url, str(tmp_path)).collect()}
    queue = {tuple(s.labels.values()): s.value for s in families["farmiq_edge_queue_messages"].samples}
    assert queue[("ingest", "rejected")] == 1 and queue[("ingest", "delayed")] == 1
    assert families["farmiq_edge_outbox_pending_events"].samples[0].value == 20
    assert families["farmiq_edge_sync_consecutive_failures"].samples[0].value == 4
    assert families["farmiq_edge_media_volume_size_bytes"].samples[0].value > 0
    # A name another module registered is left to it; a database that is down gives no samples.
    skipped = DatabaseCollector(db_url, str(tmp_path), skip=frozenset({"farmiq_edge_outbox_pending_events"}))
    assert "farmiq_edge_outbox_pending_events" not in {f.name for f in skipped.collect()}
    assert list(DatabaseCollector("postgresql://postgres@127.0.0.1:1/x", str(tmp_path)).collect()) == []
