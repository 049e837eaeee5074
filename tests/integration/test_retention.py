"""Maintenance jobs (actors/retention.py) on a movable clock: a year of data, then the windows.

No sleeping: every job takes `now`; file ages are set with os.utime.
"""

import json
import re
import os
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2
import pytest
from psycopg2.extras import execute_values

from actors.retention import Limits, run_job
from models.settings import load_settings
from tests.integration.test_operator import cli  # noqa: F401 - the `farmiq-edge` fixture

NOW = datetime(2027, 6, 15, 12, 0, tzinfo=timezone.utc)
DEVICES = ("dev-a", "dev-b", "dev-c")
WINDOWS = dict(retention_raw_days=30, retention_agg_days=180, retention_media_days=30,
               retention_outbox_days=7, dedupe_ttl_hours=24, retention_queue_done_minutes=5,
               retention_queue_rejected_days=30, retention_temp_file_hours=6)
SMALL = Limits(batch_rows=97, pause_seconds=0, media_batch=2)  # many batches, odd sizes


def settings_for(db_url: str, media: Path, **over):
    return load_settings(database_url=db_url, media_root=str(media), **{**WINDOWS, **over})


class Db:
    def __init__(self, url: str) -> None:
        self.conn = psycopg2.connect(url)
        self.conn.autocommit = True

    def all(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def one(self, sql: str, params: tuple = ()):
        return self.all(sql, params)[0][0]

    def values(self, sql: str, rows: list[tuple]) -> None:
        with self.conn.cursor() as cur:
            execute_values(cur, sql, rows, page_size=2000)

    def bounded(self, parent: str, *, before: datetime) -> set[str]:
        """Partitions of `parent` whose upper bound is at or before `before`."""
        from actors.retention import LIST_PARTITIONS
        return {r[0] for r in self.all(str(LIST_PARTITIONS).replace(":parent", "%s"), (parent,))
                if r[2] is not None and r[2] <= before}

    def partitions(self, parent: str) -> set[str]:
        return {r[0] for r in self.all("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                       "WHERE i.inhparent = %s::regclass", (parent,))}


@pytest.fixture
def db(db_url):
    d = Db(db_url)
    yield d
    d.conn.close()


def ids(n: int = 1):
    return [uuid.uuid4() for _ in range(n)] if n > 1 else uuid.uuid4()


def load_a_year(db: Db) -> None:
    """Raw rows every 6 h, 1d aggregates every day, for three devices, a year back from NOW."""
    raw, agg = [], []
    t = NOW - timedelta(days=365)
    while t < NOW:
        for d in DEVICES:
            raw.append((str(uuid.uuid4()), "t1", "f1", "b1", d, t, "temperature", 20.0, "C"))
        t += timedelta(hours=6)
    day = (NOW - timedelta(days=365)).replace(hour=0)
    while day < NOW:
        for d in DEVICES:
            agg.append((str(uuid.uuid4()), "t1", "f1", "b1", d, "1d", day, day + timedelta(days=1),
                        "temperature", 20.0, 20.0, 20.0, 4, 80.0, False))
        day += timedelta(days=1)
    db.values("INSERT INTO telemetry_raw (id, tenant_id, farm_id, barn_id, device_id, occurred_at, "
              "metric_type, metric_value, unit) VALUES %s", raw)
    db.values("INSERT INTO telemetry_agg (id, tenant_id, farm_id, barn_id, device_id, \"window\", "
              "bucket_start_at, bucket_end_at, metric_type, avg_value, min_value, max_value, count, "
              "sum_value, needs_sync) VALUES %s", agg)


def outbox(db: Db, event_type: str, device: str, occurred_at: datetime, status: str, *,
           payload: dict | None = None, last_attempt_at: datetime | None = None,
           created_at: datetime | None = None) -> uuid.UUID:
    event_id = uuid.uuid4()
    db.all("INSERT INTO sync_outbox (id, tenant_id, farm_id, barn_id, device_id, event_type, occurred_at, "
           "payload_json, status, last_attempt_at, created_at) "
           "VALUES (%s, 't1', 'f1', 'b1', %s, %s, %s, %s, %s, %s, coalesce(%s, now()))",
           (str(event_id), device, event_type, occurred_at, json.dumps(payload or {}), status,
            last_attempt_at, created_at))
    return event_id


def test_a_year_of_telemetry_keeps_exactly_the_windows(db, db_url, tmp_path):
    load_a_year(db)
    raw_cutoff, agg_cutoff = NOW - timedelta(days=30), NOW - timedelta(days=180)
    # Not yet in the cloud: dev-a's aggregates from 40 days ago (agg sync),
    # dev-b's raw event from 35 days ago (a raw-sync leftover counts too).
    held_a = NOW - timedelta(days=40)
    agg_event = outbox(db, "telemetry.aggregated", "dev-a", held_a + timedelta(days=1), "pending",
                       payload={"bucket_start_at": held_a.isoformat(), "window": "1d"})
    outbox(db, "telemetry.ingested", "dev-b", NOW - timedelta(days=35), "failed")
    total_raw = db.one("SELECT count(*) FROM telemetry_raw")
    before = db.partitions("telemetry_raw") | db.partitions("telemetry_agg")

    report = run_job(settings_for(db_url, tmp_path), "partitions", now=NOW, limits=SMALL)

    # Exactly the rows inside the window, plus what the gate holds, remain.
    assert db.one("SELECT count(*) FROM telemetry_raw WHERE occurred_at < %s AND device_id = 'dev-c'",
                  (raw_cutoff,)) == 0
    for device, since in (("dev-a", held_a), ("dev-b", NOW - timedelta(days=35))):
        assert db.one("SELECT min(occurred_at) FROM telemetry_raw WHERE device_id = %s", (device,)) >= since
        assert db.one("SELECT min(occurred_at) FROM telemetry_raw WHERE device_id = %s", (device,)) \
            < since + timedelta(hours=6)
    inside = db.one("SELECT count(*) FROM telemetry_raw WHERE occurred_at >= %s", (raw_cutoff,))
    assert inside == 30 * 4 * len(DEVICES)  # every row inside the window survived
    held = db.one("SELECT count(*) FROM telemetry_raw WHERE occurred_at < %s", (raw_cutoff,))
    assert held == report.held_rows["telemetry_raw"] == (10 + 5) * 4
    assert report.held_since["telemetry_raw"] == held_a.isoformat()
    assert report.rows["telemetry_raw"] == total_raw - inside - held
    assert db.one("SELECT count(*) FROM telemetry_agg WHERE bucket_start_at < %s", (agg_cutoff,)) == 0
    assert db.one("SELECT count(*) FROM telemetry_agg") == 180 * len(DEVICES)  # whole days inside
    # Partitions: the coming months exist; wholly expired ones are gone (raw:
    # those wholly before the oldest hold too); a partly expired one stays.
    for parent in ("telemetry_raw", "telemetry_agg"):
        assert {f"{parent}_{m}" for m in ("202706", "202707", "202708", "202709")} <= db.partitions(parent)
        assert f"{parent}_default" in db.partitions(parent)
    assert not db.bounded("telemetry_agg", before=agg_cutoff)
    assert not db.bounded("telemetry_raw", before=held_a)
    assert set(report.dropped_partitions) == before - db.partitions("telemetry_raw") - db.partitions("telemetry_agg")
    assert report.dropped_partitions
    # The cloud acks dev-a's event: its rows go on the next run; dev-b's failed one still holds.
    db.all("UPDATE sync_outbox SET status = 'acked' WHERE id = %s", (str(agg_event),))
    report = run_job(settings_for(db_url, tmp_path), "partitions", now=NOW, limits=SMALL)
    assert db.one("SELECT count(*) FROM telemetry_raw WHERE occurred_at < %s", (raw_cutoff,)) == 5 * 4
    assert report.rows["telemetry_raw"] == 10 * 4
    # With the gate off, held rows go as well.
    report = run_job(settings_for(db_url, tmp_path, retention_require_sync=False), "partitions",
                     now=NOW, limits=SMALL)
    assert db.one("SELECT count(*) FROM telemetry_raw WHERE occurred_at < %s", (raw_cutoff,)) == 0
    assert report.rows["telemetry_raw"] == 5 * 4 and report.held_rows["telemetry_raw"] == 0
    assert db.one("SELECT count(*) FROM telemetry_raw") == inside

    # The clock moves on (gate on, everything acked): the windows move with it.
    db.all("UPDATE sync_outbox SET status = 'acked'")
    for days in (10, 31):
        later = NOW + timedelta(days=days)
        run_job(settings_for(db_url, tmp_path), "partitions", now=later, limits=SMALL)
        assert db.one("SELECT count(*) FROM telemetry_raw") == max(0, 30 - days) * 4 * len(DEVICES)
        assert db.one("SELECT count(*) FROM telemetry_agg") == (180 - days) * len(DEVICES)
    assert "telemetry_raw_202710" in db.partitions("telemetry_raw")
    # Idempotent: a second run at the same time deletes nothing.
    again = run_job(settings_for(db_url, tmp_path), "partitions", now=later, limits=SMALL)
    assert sum(again.rows.values()) == 0 and not again.dropped_partitions and not again.created_partitions


def test_unsynced_aggregates_hold_raw_rows_and_their_own_rows(db, db_url, tmp_path):
    """agg mode: a bucket not yet written to the outbox (needs_sync) holds its raw rows and itself."""
    old = NOW - timedelta(days=200)
    db.values("INSERT INTO telemetry_raw (id, tenant_id, farm_id, barn_id, device_id, occurred_at, "
              "metric_type, metric_value, unit) VALUES %s",
              [(str(uuid.uuid4()), "t1", "f1", "b1", d, old, "temperature", 1.0, "C") for d in ("dev-a", "dev-b")])
    db.values("INSERT INTO telemetry_agg (id, tenant_id, farm_id, barn_id, device_id, \"window\", "
              "bucket_start_at, bucket_end_at, metric_type, avg_value, min_value, max_value, count, "
              "sum_value, needs_sync) VALUES %s",
              [(str(uuid.uuid4()), "t1", "f1", "b1", d, "1m", old, old + timedelta(minutes=1), "temperature",
                1.0, 1.0, 1.0, 1, 1.0, d == "dev-a") for d in ("dev-a", "dev-b")])
    report = run_job(settings_for(db_url, tmp_path), "partitions", now=NOW, limits=SMALL)
    assert db.all("SELECT device_id FROM telemetry_raw") == [("dev-a",)]
    assert db.all("SELECT device_id FROM telemetry_agg") == [("dev-a",)]
    assert report.held_rows["telemetry_raw"] == 1
    # In raw mode nobody writes aggregated events: needs_sync holds no raw row.
    run_job(settings_for(db_url, tmp_path, sync_telemetry="raw"), "partitions", now=NOW, limits=SMALL)
    assert db.one("SELECT count(*) FROM telemetry_raw") == 0


def write_frame(db: Db, root: Path, session_id, status: str | None, captured_at: datetime, *,
                with_file: bool = True) -> Path:
    media_id = uuid.uuid4()
    if session_id and status:
        db.all("INSERT INTO weight_sessions (id, tenant_id, farm_id, barn_id, device_id, status) "
               "VALUES (%s, 't1', 'f1', 'b1', 'cam', %s) ON CONFLICT DO NOTHING", (str(session_id), status))
    rel = f"t1/f1/b1/{session_id or 'monitoring/cam'}/{captured_at:%Y%m%dT%H%M%S}_{media_id}.jpg"
    path = root / rel
    if with_file:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff\xd8" + b"x" * 998)
    db.all("INSERT INTO media_objects (id, tenant_id, farm_id, barn_id, device_id, session_id, path, "
           "mime_type, size_bytes, sha256, captured_at) VALUES (%s, 't1', 'f1', 'b1', 'cam', %s, %s, "
           "'image/jpeg', 1000, 'x', %s)", (str(media_id), session_id and str(session_id), str(path), captured_at))
    return path


def aged_file(path: Path, age: timedelta) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"tmp")
    t = (NOW - age).timestamp()
    os.utime(path, (t, t))
    return path


def test_media_expire_file_first_and_open_sessions_survive(db, db_url, tmp_path):
    root = tmp_path / "media"
    old, recent = NOW - timedelta(days=60), NOW - timedelta(days=5)
    finalized, cancelled, open_, unknown = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    gone = [write_frame(db, root, finalized, "finalized", old), write_frame(db, root, None, None, old),
            write_frame(db, root, cancelled, "cancelled", old)]
    gone += [write_frame(db, root, finalized, "finalized", old + timedelta(seconds=i)) for i in range(1, 4)]
    missing = write_frame(db, root, finalized, "finalized", old, with_file=False)
    kept = [write_frame(db, root, open_, "created", old), write_frame(db, root, unknown, None, old),
            write_frame(db, root, finalized, "finalized", recent)]
    stale = [aged_file(root / ".staging" / "abc" / "part-1", timedelta(hours=7)),
             aged_file(root / "t1" / "f1" / "b1" / "x" / ".frame.jpg.tmp", timedelta(days=2))]
    fresh = [aged_file(root / ".staging" / "def", timedelta(hours=1)),
             aged_file(root / "t1" / "f1" / "b1" / "x" / "new.tmp", timedelta(minutes=5)),
             aged_file(root / "t1" / "orphan-not-ours.jpg", timedelta(days=400))]

    dry = run_job(settings_for(db_url, root), "media", now=NOW, dry_run=True, limits=SMALL)
    assert (dry.rows["media_objects"], dry.files, dry.bytes) == (7, 7 + 2, 7000 + 6)
    assert all(p.exists() for p in gone + kept + stale) and db.one("SELECT count(*) FROM media_objects") == 10

    report = run_job(settings_for(db_url, root), "media", now=NOW, limits=SMALL)
    assert not any(p.exists() for p in gone + stale)
    assert all(p.exists() for p in kept + fresh)
    assert {r[0] for r in db.all("SELECT path FROM media_objects")} == {str(p) for p in kept}
    assert report.rows["media_objects"] == 7 and report.missing_files == 1 and not missing.exists()
    assert (report.files, report.bytes) == (6 + 2, 6000 + 6)
    assert report.held_rows["media_objects"] == 2  # the open session and the unknown one
    assert not (root / "t1/f1/b1" / str(cancelled)).exists()  # empty session folder removed

    report = run_job(settings_for(db_url, root, retention_media_include_open=True), "media", now=NOW)
    assert {r[0] for r in db.all("SELECT path FROM media_objects")} == {str(kept[2])}
    assert report.rows["media_objects"] == 2


def test_outbox_dedupe_and_queue_windows(db, db_url, tmp_path):
    d = timedelta(days=1)
    expired = {outbox(db, "telemetry.aggregated", "dev-a", NOW - 20 * d, "acked", last_attempt_at=NOW - 8 * d),
               outbox(db, "media.stored", "dev-a", NOW - 20 * d, "acked", created_at=NOW - 9 * d)}
    kept = {outbox(db, "telemetry.aggregated", "dev-a", NOW - 20 * d, "acked", last_attempt_at=NOW - 6 * d),
            outbox(db, "telemetry.aggregated", "dev-a", NOW - 20 * d, "failed", last_attempt_at=NOW - 20 * d),
            outbox(db, "telemetry.aggregated", "dev-a", NOW - 20 * d, "pending", created_at=NOW - 20 * d)}
    db.values("INSERT INTO ingress_dedupe (tenant_id, event_id, first_seen_at) VALUES %s",
              [("t1", str(uuid.uuid4()), NOW - timedelta(hours=h)) for h in (25, 25, 30, 100, 23, 1)])
    queue = {("done", timedelta(minutes=10)): False, ("done", timedelta(minutes=1)): True,
             ("rejected", 40 * d): False, ("rejected", d): True, ("queued", 40 * d): True,
             ("consumed", 40 * d): True}
    db.values("INSERT INTO dramatiq.queue (message_id, queue_name, state, mtime, message) VALUES %s",
              [(str(uuid.uuid4()), "ingest", state, NOW - age, "{}") for state, age in queue])
    s = settings_for(db_url, tmp_path)
    dry = {job: run_job(s, job, now=NOW, dry_run=True) for job in ("outbox", "dedupe", "queue")}
    assert [sum(r.rows.values()) for r in dry.values()] == [2, 4, 2]
    reports = {job: run_job(s, job, now=NOW, limits=SMALL) for job in ("outbox", "dedupe", "queue")}
    assert {uuid.UUID(r[0]) for r in db.all("SELECT id FROM sync_outbox")} == kept
    assert sorted(r[0] for r in db.all("SELECT first_seen_at FROM ingress_dedupe")) == \
        [NOW - timedelta(hours=23), NOW - timedelta(hours=1)]
    assert sorted(db.all("SELECT state::text, %s - mtime FROM dramatiq.queue", (NOW,))) == \
        sorted((state, age) for (state, age), stays in queue.items() if stays)
    assert [sum(r.rows.values()) for r in reports.values()] == [2, 4, 2]


def test_batches_are_bounded_and_a_run_stops_at_its_budget(db, db_url, tmp_path):
    old = NOW - timedelta(days=3)
    db.all("INSERT INTO ingress_dedupe (tenant_id, event_id, first_seen_at) "
           "SELECT 't1', gen_random_uuid(), %s - g * interval '1 ms' FROM generate_series(1, 25000) g", (old,))
    db.all("INSERT INTO dramatiq.queue (message_id, queue_name, state, mtime, message) "
           "SELECT gen_random_uuid(), 'ingest', 'done', %s, '{}' FROM generate_series(1, 5000)", (old,))
    s = settings_for(db_url, tmp_path)
    # A budget of zero still does one batch, of exactly batch_rows, and says more is left.
    report = run_job(s, "dedupe", now=NOW, limits=Limits(batch_rows=1000, max_seconds=0))
    assert report.rows["ingress_dedupe"] == 1000 and report.more_left
    assert db.one("SELECT count(*) FROM ingress_dedupe") == 24000
    # The oldest go first (index order).
    assert db.one("SELECT min(first_seen_at) FROM ingress_dedupe") > old - timedelta(milliseconds=24001)
    report = run_job(s, "dedupe", now=NOW, limits=Limits(batch_rows=1000, pause_seconds=0))
    assert report.rows["ingress_dedupe"] == 24000 and not report.more_left
    assert db.one("SELECT count(*) FROM ingress_dedupe") == 0
    report = run_job(s, "queue", now=NOW, limits=Limits(batch_rows=700, pause_seconds=0))
    assert report.rows["dramatiq.queue"] == 5000 and db.one("SELECT count(*) FROM dramatiq.queue") == 0


def test_success_is_recorded_for_the_staleness_alert(db, db_url, tmp_path):
    db.all("INSERT INTO scheduled_jobs (job, every_seconds, last_slot_at) VALUES ('retention.dedupe', 900, %s)",
           (NOW,))
    run_job(settings_for(db_url, tmp_path), "dedupe", now=NOW)
    at, report = db.all("SELECT last_success_at, last_report FROM scheduled_jobs")[0]
    assert at == NOW and report["job"] == "dedupe" and report["rows"] == {"ingress_dedupe": 0}
    run_job(settings_for(db_url, tmp_path), "dedupe", now=NOW + timedelta(hours=1), dry_run=True)
    assert db.one("SELECT last_success_at FROM scheduled_jobs") == NOW  # a dry run is not a run


def test_a_job_already_running_elsewhere_is_skipped(db, db_url, tmp_path):
    db.all("SELECT pg_advisory_lock(hashtext('farmiq-edge:retention:queue'))")
    assert run_job(settings_for(db_url, tmp_path), "queue", now=NOW) is None
    assert run_job(settings_for(db_url, tmp_path), "dedupe", now=NOW) is not None


def test_operator_commands_dry_run_run_and_status(db, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_MEDIA_ROOT", str(tmp_path))
    db.all("INSERT INTO ingress_dedupe (tenant_id, event_id, first_seen_at) "
           "SELECT 't1', gen_random_uuid(), now() - interval '80 hours' FROM generate_series(1, 30)")
    db.all("INSERT INTO telemetry_raw (id, tenant_id, farm_id, barn_id, device_id, occurred_at, metric_type, "
           "metric_value, unit) SELECT gen_random_uuid(), 't1', 'f1', 'b1', 'dev-a', "
           "now() - interval '39 days 12 hours' + g * interval '1 day', 'x', 1, 'C' FROM generate_series(1, 20) g")
    outbox(db, "telemetry.ingested", "dev-a", datetime.now(timezone.utc) - timedelta(days=35), "pending")

    rc, out, _ = cli("retention", "run", "--dry-run")
    assert rc == 0
    assert "dedupe: would delete ingress_dedupe 30 rows" in out
    assert "partitions: would delete telemetry_raw 4 rows" in out and "held back: telemetry_raw 5 expired rows" in out
    assert db.one("SELECT count(*) FROM ingress_dedupe") == 30  # nothing changed

    rc, out, _ = cli("retention", "run", "--job", "dedupe")
    assert rc == 0 and out.startswith("dedupe: deleted ingress_dedupe 30 rows in ")
    assert db.one("SELECT count(*) FROM ingress_dedupe") == 0

    rc, out, _ = cli("retention", "status")
    assert rc == 0
    assert re.search(r"^telemetry_raw\s+20\s+\S+Z\s+[\d,]+$", out, re.M)
    assert re.search(r"^ingress_dedupe\s+0\s+-\s+[\d,]+$", out, re.M)
    assert "telemetry_raw: 5 rows of 1 device not yet acked by the cloud, since" in out
    with pytest.raises(SystemExit) as usage:
        cli("retention", "run", "--job", "nope")
    assert usage.value.code == 2
