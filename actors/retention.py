"""Queue `maintenance`: retention and cleanup jobs (edge-persistence.md, "Retention and cleanup jobs").

One actor, `retention_job(job)`, sent by the scheduler for each job in JOBS:

- partitions: monthly partitions of telemetry_raw / telemetry_agg created
  PARTITION_MONTHS_AHEAD months ahead; a partition wholly past its window
  (EDGE_RETENTION_RAW_DAYS / _AGG_DAYS) is dropped; rows past the window in a
  partly expired partition, or in a DEFAULT partition, are deleted in batches.
  Raw rows pass the sync gate first (below); aggregates whose
  `telemetry.aggregated` event is not yet written (needs_sync) are kept.
- media: expired media_objects by captured_at, file first (a missing one is
  fine, and counted), then the row; frames of a session that is still open
  (status 'created', or no session row yet) are kept unless
  EDGE_RETENTION_MEDIA_INCLUDE_OPEN=true — a finalized or cancelled session
  is over. Also stale temporary files (STAGING_DIR, TEMP_FILE_PATTERNS).
- outbox: `acked` events older than EDGE_RETENTION_OUTBOX_DAYS after their
  ack. The forwarder sets last_attempt_at when it acks, so that is the ack
  time; an acked row without one falls back to created_at. Failed events stay.
- dedupe: ingress_dedupe rows older than EDGE_DEDUPE_TTL_HOURS.
- queue: dramatiq.queue rows 'done' for EDGE_RETENTION_QUEUE_DONE_MINUTES
  (the current broker deletes a message when it is acked; the old one, and
  a database migrated from it, left them), 'rejected' ones after
  EDGE_RETENTION_QUEUE_REJECTED_DAYS.

Sync gate (EDGE_RETENTION_REQUIRE_SYNC, default true): raw telemetry the cloud
may not have yet is kept past its window. The rule is conservative and per
device: nothing at or after the oldest time any not-yet-acked telemetry event
of the device covers — a `telemetry.ingested` event's occurred_at, a
`telemetry.aggregated` event's bucket_start_at — and, when aggregates are
synced (`agg`, `both`), the oldest bucket not yet written to the outbox
(telemetry_agg.needs_sync, telemetry_agg_pending). Both event types count in
every mode, so switching EDGE_SYNC_TELEMETRY never frees unsynced rows.
Failed events hold too, until re-driven and acked or purged.

Every job is idempotent and bounded: deletes go in batches of
Limits.batch_rows, one short transaction each (commit point: each batch),
keyed so that a run reads each row once (an index range for keyed tables,
a TID range for partitions); a run stops after Limits.max_seconds and the
next slot carries on. A table that lost many rows is vacuumed (without
truncation, which would need an exclusive lock). DDL waits at most
DDL_LOCK_TIMEOUT for its lock. Jobs take `now` (a movable clock for tests);
no predicate uses the database's now(). Two runs of one job never overlap
(a per-job advisory lock; the second one skips).

A failed run is logged and counted, never retried or dead-lettered: the next
slot is the retry, and the alert on last success says when that is not enough.
"""

from actors.broker import broker  # noqa: F401,I001 - the broker is set before any actor

import fnmatch
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dramatiq
import psycopg2
from prometheus_client import Counter
from sqlalchemy import Connection, text

from actors import metrics
from actors.faults import crash_point
from models.settings import Settings, get_settings
from schema.db import transaction
from schema.migrate import PARTITION_MONTHS_AHEAD

log = logging.getLogger("farmiq_edge.retention")

JOBS = ("partitions", "media", "outbox", "dedupe", "queue")
PARTITIONED = {"telemetry_raw": "occurred_at", "telemetry_agg": "bucket_start_at"}
# Temporary media files: everything under {media_root}/STAGING_DIR, and files
# matching TEMP_FILE_PATTERNS anywhere under the root (align with the media
# actor's writer). Removed once older than EDGE_RETENTION_TEMP_FILE_HOURS.
STAGING_DIR = ".staging"
TEMP_FILE_PATTERNS = ("*.tmp",)
VACUUM_AFTER_ROWS = 10_000
DDL_LOCK_TIMEOUT = "2s"
JOB_LOCK_KEY = "farmiq-edge:retention:"

FAILURES = Counter("farmiq_edge_retention_failures_total", "Maintenance job runs that failed.", ["job"])


@dataclass(frozen=True)
class Limits:
    batch_rows: int = 5000
    max_seconds: float = 300.0
    pause_seconds: float = 0.01   # between batches: room for the hot path
    media_batch: int = 500


@dataclass
class Report:
    job: str
    dry_run: bool
    rows: dict[str, int] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    missing_files: int = 0
    created_partitions: list[str] = field(default_factory=list)
    dropped_partitions: list[str] = field(default_factory=list)
    held_rows: dict[str, int] = field(default_factory=dict)
    held_since: dict[str, str | None] = field(default_factory=dict)
    more_left: bool = False
    seconds: float = 0.0

    def add_rows(self, table: str, n: int) -> None:
        self.rows[table] = self.rows.get(table, 0) + n


@dataclass
class Run:
    settings: Settings
    now: datetime
    dry_run: bool
    limits: Limits
    report: Report
    started: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return self.settings.database_url

    def out_of_time(self) -> bool:
        if time.monotonic() - self.started > self.limits.max_seconds:
            self.report.more_left = True
            return True
        return False


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------

@dramatiq.actor(queue_name="maintenance", max_retries=0, time_limit=30 * 60_000)
def retention_job(job: str) -> None:
    try:
        run_job(get_settings(), job, now=datetime.now(timezone.utc))
    except Exception as exc:  # the next slot is the retry (module docstring)
        FAILURES.labels(job).inc()
        # No traceback: SQLAlchemy's error text carries the statement's parameters (ids).
        cause = getattr(exc, "orig", None) or exc
        log.error("event=retention_failed job=%s error=%s reason=%r", job, type(cause).__name__,
                  (str(cause).strip().splitlines() or [""])[0][:200])


def run_job(settings: Settings, job: str, *, now: datetime, dry_run: bool = False,
            limits: Limits = Limits()) -> Report | None:
    """Run one job as of `now`; None if another run of it holds the job lock."""
    if job not in JOBS:
        raise ValueError(f"unknown maintenance job {job!r} (one of {', '.join(JOBS)})")
    report = Report(job, dry_run)
    run = Run(settings, now, dry_run, limits, report)
    lock = psycopg2.connect(settings.database_url, application_name=f"farmiq-edge retention {job}")
    try:
        lock.autocommit = True
        with lock.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (JOB_LOCK_KEY + job,))
            if not cur.fetchone()[0]:
                log.info("event=retention_skipped job=%s reason=already_running", job)
                return None
        _export_schedule(run)
        JOB_FUNCTIONS[job](run)
    finally:
        lock.close()  # releases the job lock
    report.seconds = round(time.monotonic() - run.started, 3)
    if not dry_run:
        _record_success(run)
    log.info("event=retention_done job=%s dry_run=%s rows=%s files=%d bytes=%d missing_files=%d "
             "dropped=%d created=%d held=%s more_left=%s seconds=%.3f", job, dry_run,
             sum(report.rows.values()), report.files, report.bytes, report.missing_files,
             len(report.dropped_partitions), len(report.created_partitions),
             sum(report.held_rows.values()), report.more_left, report.seconds)
    return report


# last_success: the job's schedule row (written by the scheduler).
SCHEDULE_ROW = text("SELECT every_seconds, last_success_at FROM scheduled_jobs WHERE job = :job")
RECORD_SUCCESS = text("""
    UPDATE scheduled_jobs SET last_success_at = :at, last_report = CAST(:report AS jsonb) WHERE job = :job
""")


def _export_schedule(run: Run) -> None:
    # A fresh worker exports the stored last success at once, so the
    # staleness alert works even if this run fails.
    with transaction(run.url) as conn:
        row = conn.execute(SCHEDULE_ROW, {"job": f"retention.{run.report.job}"}).first()
    if row is not None:
        metrics.RETENTION_INTERVAL.labels(run.report.job).set(row.every_seconds)
        if row.last_success_at is not None:
            metrics.RETENTION_LAST_SUCCESS.labels(run.report.job).set(row.last_success_at.timestamp())


def _record_success(run: Run) -> None:
    r = run.report
    with transaction(run.url) as conn:
        conn.execute(RECORD_SUCCESS, {"job": f"retention.{r.job}", "at": run.now,
                                      "report": json.dumps(asdict(r))})
    metrics.RETENTION_LAST_SUCCESS.labels(r.job).set(run.now.timestamp())
    metrics.RETENTION_DURATION.labels(r.job).set(r.seconds)
    for table, n in r.rows.items():
        metrics.RETENTION_ROWS.labels(r.job, table).inc(n)
    metrics.RETENTION_FILES.labels(r.job).inc(r.files)
    metrics.RETENTION_BYTES.labels(r.job).inc(r.bytes)
    metrics.RETENTION_MISSING_FILES.labels(r.job).inc(r.missing_files)
    for table, n in r.held_rows.items():
        metrics.RETENTION_HELD_ROWS.labels(table).set(n)
        since = r.held_since.get(table)
        metrics.RETENTION_HELD_SINCE.labels(table).set(datetime.fromisoformat(since).timestamp() if since else 0)


# ---------------------------------------------------------------------------
# Batched deletes. Each batch is one transaction: pick up to :batch rows past
# the key reached so far (:after), delete them by ctid (a TID scan), re-check
# the predicate on delete (a row changed meanwhile is skipped), and return how
# many went and the highest key deleted: the next batch starts there.
# ---------------------------------------------------------------------------

def keyed_batch_sql(table: str, key: str, predicate: str) -> str:
    """Batch keyed by an indexed column `key` (the index serves `key >= :after ORDER BY key`)."""
    return f"""
        WITH gone AS (
            DELETE FROM {table} AS t
             WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} AS t
                                     WHERE {key} >= :after AND ({predicate})
                                     ORDER BY {key} LIMIT :batch))
               AND ({predicate})
            RETURNING {key} AS k)
        SELECT count(*) AS n, max(k) AS last FROM gone
    """


def tid_batch_sql(table: str, predicate: str) -> str:
    """Batch keyed by physical position (a TID range scan reads each page once per run)."""
    return f"""
        WITH gone AS (
            DELETE FROM {table} AS t
             WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} AS t
                                     WHERE ctid > CAST(:after AS tid) AND ({predicate})
                                     LIMIT :batch))
               AND ({predicate})
            RETURNING ctid AS k)
        SELECT count(*) AS n, max(k)::text AS last FROM gone
    """


def count_sql(table: str, predicate: str) -> str:
    return f"SELECT count(*) FROM {table} t WHERE {predicate}"


def delete_batches(run: Run, table: str, label: str, predicate: str, params: dict[str, Any], *,
                   key: str | None = None, vacuum_after: int = VACUUM_AFTER_ROWS) -> int:
    """Delete rows of `table` matching `predicate` (aliased `t` in TID mode) in batches; dry run counts."""
    if run.dry_run:
        with transaction(run.url) as conn:
            n = conn.execute(text(count_sql(table, predicate)), params).scalar_one()
        run.report.add_rows(label, n)
        return n
    sql = text(keyed_batch_sql(table, key, predicate) if key else tid_batch_sql(table, predicate))
    after: Any = datetime.min.replace(tzinfo=timezone.utc) if key else "(0,0)"
    total = 0
    while True:  # at least one batch per run, so every run makes progress
        with transaction(run.url) as conn:  # commit point: one batch
            n, last = conn.execute(sql, {**params, "after": after, "batch": run.limits.batch_rows}).one()
        total += n
        if n < run.limits.batch_rows or run.out_of_time():
            break
        after = last
        time.sleep(run.limits.pause_seconds)
    run.report.add_rows(label, total)
    if total and total >= vacuum_after:
        vacuum_table(run.url, table)
    return total


def vacuum_table(url: str, table: str) -> None:
    """Make the deleted rows' space reusable now; no truncation (it needs an exclusive lock)."""
    conn = psycopg2.connect(url, application_name="farmiq-edge retention vacuum")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"VACUUM (TRUNCATE false) {table}")
    finally:
        conn.close()


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# ---------------------------------------------------------------------------
# partitions (and the sync gate)
# ---------------------------------------------------------------------------

# list_partitions: a partitioned table's partitions and their bounds (NULL for DEFAULT).
LIST_PARTITIONS = text(r"""
    SELECT c.relname AS name,
           CAST(b[1] AS timestamptz) AS lo, CAST(b[2] AS timestamptz) AS hi
      FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid,
           LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                'FROM \(''([^'']*)''\) TO \(''([^'']*)''\)') AS b
     WHERE i.inhparent = CAST(:parent AS regclass)
     ORDER BY lo NULLS FIRST
""")
ENSURE_MONTH = text("SELECT farmiq_ensure_month_partition(CAST(:parent AS regclass), :key, :month)")

# sync_holds: per device, the oldest raw time not yet known to be in the cloud
# (module docstring). The outbox part uses sync_outbox_status_attempt_idx.
SYNC_HOLDS = text("""
    SELECT tenant_id, device_id, min(held_from) AS held_from
      FROM (SELECT tenant_id, device_id,
                   CASE WHEN event_type = 'telemetry.aggregated'
                        THEN CAST(payload_json->>'bucket_start_at' AS timestamptz)
                        ELSE occurred_at END AS held_from
              FROM sync_outbox
             WHERE status IN ('pending', 'claimed', 'sent', 'failed')
               AND event_type IN ('telemetry.ingested', 'telemetry.aggregated')
            UNION ALL
            SELECT tenant_id, device_id, bucket_start_at FROM telemetry_agg WHERE needs_sync AND :agg_synced
            UNION ALL
            SELECT tenant_id, device_id, bucket_start_at FROM telemetry_agg_pending WHERE :agg_synced
           ) AS h
     GROUP BY tenant_id, device_id
""")
# Holds as a relation `h` inside a batch predicate (arrays bound per run).
HOLDS_RELATION = """unnest(CAST(:h_tenants AS text[]), CAST(:h_devices AS text[]),
                           CAST(:h_from AS timestamptz[])) AS h(tenant_id, device_id, held_from)"""
RAW_UNHELD = f"""NOT EXISTS (SELECT 1 FROM {HOLDS_RELATION}
                            WHERE h.tenant_id = t.tenant_id AND h.device_id = t.device_id
                              AND t.occurred_at >= h.held_from)"""
# held_raw_rows: expired raw rows the gate keeps.
HELD_RAW_ROWS = text(f"""
    SELECT count(*) FROM {HOLDS_RELATION}
      JOIN telemetry_raw t ON t.tenant_id = h.tenant_id AND t.device_id = h.device_id
     WHERE t.occurred_at >= h.held_from AND t.occurred_at < :cutoff
""")


def month_starts(now: datetime, months_ahead: int) -> list[datetime]:
    first = now.astimezone(timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    out = []
    for m in range(months_ahead + 1):
        y, mo = divmod(first.month - 1 + m, 12)
        out.append(first.replace(year=first.year + y, month=mo + 1))
    return out


def partitions_job(run: Run) -> None:
    s = run.settings
    _create_ahead(run)
    raw_cutoff = run.now - timedelta(days=s.retention_raw_days)
    holds = []
    if s.retention_require_sync:
        with transaction(run.url) as conn:
            holds = conn.execute(SYNC_HOLDS, {"agg_synced": s.sync_telemetry in ("agg", "both")}).all()
    hold_params = {"h_tenants": [h.tenant_id for h in holds], "h_devices": [h.device_id for h in holds],
                   "h_from": [h.held_from for h in holds]}
    earliest_hold = min((h.held_from for h in holds), default=None)
    _expire(run, "telemetry_raw", raw_cutoff,
            extra=RAW_UNHELD if holds else "true", params=hold_params,
            blocked=lambda conn, part, hi: earliest_hold is not None and earliest_hold < hi)
    agg_cutoff = run.now - timedelta(days=s.retention_agg_days)
    _expire(run, "telemetry_agg", agg_cutoff, extra="NOT t.needs_sync", params={},
            blocked=lambda conn, part, hi: conn.execute(
                text(f"SELECT EXISTS (SELECT 1 FROM {_ident(part)} WHERE needs_sync)")).scalar_one())
    with transaction(run.url) as conn:
        held = conn.execute(HELD_RAW_ROWS, {**hold_params, "cutoff": raw_cutoff}).scalar_one() if holds else 0
    since = min((h.held_from for h in holds if h.held_from < raw_cutoff), default=None)
    run.report.held_rows["telemetry_raw"] = held
    run.report.held_since["telemetry_raw"] = since.isoformat() if since and held else None


def _create_ahead(run: Run) -> None:
    for parent, key in PARTITIONED.items():
        for month in month_starts(run.now, PARTITION_MONTHS_AHEAD):
            name = f"{parent}_{month:%Y%m}"
            with transaction(run.url) as conn:
                if conn.execute(text("SELECT to_regclass(:n) IS NOT NULL"), {"n": name}).scalar_one():
                    continue
                if not run.dry_run:
                    conn.execute(text(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'"))
                    conn.execute(ENSURE_MONTH, {"parent": parent, "key": key, "month": month.date()})
            run.report.created_partitions.append(name)


def _expire(run: Run, parent: str, cutoff: datetime, *, extra: str, params: dict[str, Any],
            blocked: Callable[[Connection, str, datetime], bool]) -> None:
    """Drop partitions wholly before `cutoff` (unless `blocked`); delete older rows from the rest."""
    key = PARTITIONED[parent]
    with transaction(run.url) as conn:
        parts = conn.execute(LIST_PARTITIONS, {"parent": parent}).all()
    for part in parts:
        if run.out_of_time():
            return
        if part.lo is not None and part.lo >= cutoff:
            continue  # nothing in it has expired
        if part.hi is not None and part.hi <= cutoff:
            with transaction(run.url) as conn:
                if not blocked(conn, part.name, part.hi):
                    n = conn.execute(text(f"SELECT count(*) FROM {_ident(part.name)}")).scalar_one()
                    if not run.dry_run:  # commit point: the whole partition goes at once
                        conn.execute(text(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'"))
                        conn.execute(text(f"DROP TABLE {_ident(part.name)}"))
                    run.report.dropped_partitions.append(part.name)
                    run.report.add_rows(parent, n)
                    continue
        delete_batches(run, _ident(part.name), parent, f"t.{key} < :cutoff AND {extra}",
                       {**params, "cutoff": cutoff})


# ---------------------------------------------------------------------------
# media
# ---------------------------------------------------------------------------

# expired_media: a page of expired frames, oldest first, that may go
# (media_objects_captured_idx); open sessions' frames only when configured.
EXPIRED_MEDIA = text("""
    SELECT m.id, m.path, m.size_bytes, m.captured_at
      FROM media_objects m
      LEFT JOIN weight_sessions s ON s.id = m.session_id
     WHERE m.captured_at < :cutoff
       AND (m.captured_at, m.id) > (:after_at, :after_id)
       AND (:include_open OR m.session_id IS NULL OR coalesce(s.status IN ('finalized', 'cancelled'), false))
     ORDER BY m.captured_at, m.id
     LIMIT :batch
""")
# expired_media_totals: what may go (count, bytes) and what open sessions hold.
EXPIRED_MEDIA_TOTALS = text("""
    SELECT count(*) FILTER (WHERE may_go) AS n, coalesce(sum(size_bytes) FILTER (WHERE may_go), 0) AS bytes,
           count(*) FILTER (WHERE NOT may_go) AS held, min(captured_at) FILTER (WHERE NOT may_go) AS held_since
      FROM (SELECT m.size_bytes, m.captured_at,
                   (:include_open OR m.session_id IS NULL OR coalesce(s.status IN ('finalized', 'cancelled'), false)) AS may_go
              FROM media_objects m
              LEFT JOIN weight_sessions s ON s.id = m.session_id
             WHERE m.captured_at < :cutoff) AS e
""")
DELETE_MEDIA = text("DELETE FROM media_objects WHERE id = ANY(CAST(:ids AS uuid[]))")


def media_job(run: Run) -> None:
    s = run.settings
    root = Path(s.media_root).resolve()
    cutoff = run.now - timedelta(days=s.retention_media_days)
    params = {"cutoff": cutoff, "include_open": s.retention_media_include_open}
    with transaction(run.url) as conn:
        totals = conn.execute(EXPIRED_MEDIA_TOTALS, params).one()
    run.report.held_rows["media_objects"] = totals.held
    run.report.held_since["media_objects"] = totals.held_since.isoformat() if totals.held_since else None
    if run.dry_run:
        run.report.add_rows("media_objects", totals.n)
        run.report.files += totals.n
        run.report.bytes += totals.bytes
    else:
        after = (datetime.min.replace(tzinfo=timezone.utc), "00000000-0000-0000-0000-000000000000")
        while True:
            with transaction(run.url) as conn:
                page = conn.execute(EXPIRED_MEDIA, {**params, "after_at": after[0], "after_id": after[1],
                                                    "batch": run.limits.media_batch}).all()
            if not page:
                break
            gone = [str(m.id) for m in page if _remove_media_file(run, root, m.path)]
            crash_point("retention.media_files_removed")  # a crash here: rows of missing files
            with transaction(run.url) as conn:  # commit point: files first, then their rows
                conn.execute(DELETE_MEDIA, {"ids": gone})
            run.report.add_rows("media_objects", len(gone))
            after = (page[-1].captured_at, str(page[-1].id))
            if len(page) < run.limits.media_batch or run.out_of_time():
                break
    _remove_temp_files(run, root)


def _remove_media_file(run: Run, root: Path, stored: str) -> bool:
    """Delete one frame's file; False (row kept) only for a path outside the media root."""
    path = (root / stored).resolve() if not os.path.isabs(stored) else Path(stored).resolve()
    if not path.is_relative_to(root):
        log.warning("event=retention_media_refused reason=outside_media_root")
        return False
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        run.report.missing_files += 1
        return True
    run.report.files += 1
    run.report.bytes += size
    try:
        path.parent.rmdir()  # the session's folder, once its last frame is gone
    except OSError:
        pass
    return True


def _remove_temp_files(run: Run, root: Path) -> None:
    limit = run.now.timestamp() - run.settings.retention_temp_file_hours * 3600
    staging = root / STAGING_DIR
    for dirpath, _dirs, names in os.walk(root):
        in_staging = Path(dirpath).is_relative_to(staging)
        for name in names:
            if not (in_staging or any(fnmatch.fnmatch(name, p) for p in TEMP_FILE_PATTERNS)):
                continue
            path = Path(dirpath, name)
            try:
                st = path.lstat()
                if st.st_mtime >= limit:
                    continue
                if not run.dry_run:
                    path.unlink()
            except FileNotFoundError:
                continue  # finished (renamed) or removed meanwhile
            run.report.files += 1
            run.report.bytes += st.st_size


# ---------------------------------------------------------------------------
# outbox, dedupe, queue
# ---------------------------------------------------------------------------

def outbox_job(run: Run) -> None:
    cutoff = run.now - timedelta(days=run.settings.retention_outbox_days)
    # Acked with an ack time: an index range of sync_outbox_status_attempt_idx.
    delete_batches(run, "sync_outbox", "sync_outbox", "status = 'acked' AND last_attempt_at < :cutoff",
                   {"cutoff": cutoff}, key="last_attempt_at")
    # Acked without one (a forwarder that did not set it): by creation time.
    null_acked = "t.status = 'acked' AND t.last_attempt_at IS NULL AND t.created_at < :cutoff"
    with transaction(run.url) as conn:
        any_left = conn.execute(text(f"SELECT EXISTS ({count_sql('sync_outbox', null_acked)} LIMIT 1)"),
                                {"cutoff": cutoff}).scalar_one()
    if any_left:
        delete_batches(run, "sync_outbox", "sync_outbox", null_acked, {"cutoff": cutoff})


def dedupe_job(run: Run) -> None:
    cutoff = run.now - timedelta(hours=run.settings.dedupe_ttl_hours)
    delete_batches(run, "ingress_dedupe", "ingress_dedupe", "first_seen_at < :cutoff",
                   {"cutoff": cutoff}, key="first_seen_at")


def queue_job(run: Run) -> None:
    s = run.settings
    for state, age in (("done", timedelta(minutes=s.retention_queue_done_minutes)),
                       ("rejected", timedelta(days=s.retention_queue_rejected_days))):
        delete_batches(run, "dramatiq.queue", "dramatiq.queue",
                       f"state = '{state}' AND mtime < :cutoff", {"cutoff": run.now - age}, key="mtime",
                       vacuum_after=1)
    if not run.dry_run:
        # Every acked message is a deleted row (and a TOASTed body): vacuum each run,
        # whatever autovacuum does, so the table reuses its pages instead of growing.
        vacuum_table(run.url, "dramatiq.queue")


JOB_FUNCTIONS: dict[str, Callable[[Run], None]] = {
    "partitions": partitions_job, "media": media_job, "outbox": outbox_job,
    "dedupe": dedupe_job, "queue": queue_job,
}
