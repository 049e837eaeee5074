"""`farmiq-edge retention run|status`: the maintenance jobs, by hand.

`run [--job NAME] [--dry-run]` runs the jobs of actors/retention.py in this
process, exactly as the `maintenance` worker would (same limits, same job
lock: a job already running elsewhere is reported as skipped), and prints per
job what it deleted — or, with --dry-run, what it would delete. `status`
prints per table its rows (an estimate, marked ~, above ESTIMATE_ABOVE rows),
oldest row, bytes on disk, what the sync gate and open sessions hold back,
and each maintenance job's last success.

Exit codes: 0 ok, 1 a job failed, 2 usage error, 3 cannot connect.
"""

import argparse
from datetime import datetime, timedelta, timezone

from sqlalchemy import text

from models.settings import Settings
from schema.db import transaction
from workers.exit_codes import EXIT_FAILURE, EXIT_OK
from workers.operator import _plural, _print_table, format_age, format_time

ESTIMATE_ABOVE = 1_000_000

# Tables retention keeps bounded, each with the column its window is measured on.
TABLES = (("telemetry_raw", "occurred_at"), ("telemetry_agg", "bucket_start_at"),
          ("media_objects", "captured_at"), ("sync_outbox", "created_at"),
          ("ingress_dedupe", "first_seen_at"), ("dramatiq.queue", "mtime"))

# table_size: bytes (with indexes and TOAST) and planner row estimate: the
# table itself, or for a partitioned one its partitions (it has no storage).
TABLE_SIZE = text("""
    SELECT coalesce(sum(pg_total_relation_size(r.relid)), 0) AS bytes,
           coalesce(sum(greatest(c.reltuples, 0)), 0) AS estimate
      FROM (SELECT relid FROM pg_partition_tree(CAST(:table AS regclass)) WHERE isleaf
            UNION SELECT CAST(:table AS regclass)) AS r
      JOIN pg_class c ON c.oid = r.relid
""")
# job_runs: the maintenance jobs' schedule and last success.
JOB_RUNS = text("""
    SELECT job, every_seconds, last_enqueued_at, last_success_at
      FROM scheduled_jobs WHERE job LIKE 'retention.%' ORDER BY job
""")


def retention(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "status":
        return status(settings)
    return run(settings, jobs=[args.job] if args.job else None, dry_run=args.dry_run)


def run(settings: Settings, *, jobs: list[str] | None, dry_run: bool) -> int:
    from actors.retention import JOBS, run_job
    failed = False
    for job in jobs or JOBS:
        try:
            report = run_job(settings, job, now=datetime.now(timezone.utc), dry_run=dry_run)
        except Exception as exc:  # noqa: BLE001 - reported, the other jobs still run
            print(f"{job}: FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}")
            failed = True
            continue
        if report is None:
            print(f"{job}: skipped (a run of this job is in progress elsewhere)")
            continue
        for line in describe(report):
            print(line)
    return EXIT_FAILURE if failed else EXIT_OK


def describe(report) -> list[str]:  # noqa: ANN001 - actors.retention.Report
    verb = "would delete" if report.dry_run else "deleted"
    parts = [f"{table} {_plural(n, 'row')}" for table, n in report.rows.items()]
    if report.files or report.bytes or report.job == "media":
        parts.append(f"{_plural(report.files, 'file')} ({report.bytes:,} bytes)")
    if report.missing_files:
        parts.append(f"{report.missing_files} already missing")
    lines = [f"{report.job}: {verb} " + (", ".join(parts) if parts else "nothing")
             + ("" if report.dry_run else f" in {report.seconds:.1f}s")
             + (" (time budget reached: more left for the next run)" if report.more_left else "")]
    if report.dropped_partitions:
        lines.append(f"  partitions {'to drop' if report.dry_run else 'dropped'}: "
                     + ", ".join(report.dropped_partitions))
    if report.created_partitions:
        lines.append(f"  partitions {'to create' if report.dry_run else 'created'}: "
                     + ", ".join(report.created_partitions))
    for table, n in report.held_rows.items():
        if n:
            lines.append(f"  held back: {table} {_plural(n, 'expired row')} since "
                         f"{report.held_since.get(table) or '-'}")
    return lines


def status(settings: Settings) -> int:
    from actors.retention import (EXPIRED_MEDIA_TOTALS, HELD_RAW_ROWS, LIST_PARTITIONS, SYNC_HOLDS)
    now = datetime.now(timezone.utc)
    rows = []
    with transaction(settings.database_url) as conn:
        for table, key in TABLES:
            size = conn.execute(TABLE_SIZE, {"table": table}).one()
            if size.estimate > ESTIMATE_ABOVE:
                count = f"~{int(size.estimate):,}"
            else:
                count = f"{conn.execute(text(f'SELECT count(*) FROM {table}')).scalar_one():,}"
            rows.append((table, count, format_time(_oldest(conn, table, key, LIST_PARTITIONS)),
                         f"{int(size.bytes):,}"))
        raw_cutoff = now - timedelta(days=settings.retention_raw_days)
        holds = conn.execute(SYNC_HOLDS, {"agg_synced": settings.sync_telemetry in ("agg", "both")}).all()
        held_raw = conn.execute(HELD_RAW_ROWS, {
            "h_tenants": [h.tenant_id for h in holds], "h_devices": [h.device_id for h in holds],
            "h_from": [h.held_from for h in holds], "cutoff": raw_cutoff}).scalar_one()
        media = conn.execute(EXPIRED_MEDIA_TOTALS, {
            "cutoff": now - timedelta(days=settings.retention_media_days),
            "include_open": settings.retention_media_include_open}).one()
        jobs = conn.execute(JOB_RUNS).all()
    print("Tables:")
    _print_table(("TABLE", "ROWS", "OLDEST", "BYTES"), rows, numeric={1, 3})
    print()
    gate = "on" if settings.retention_require_sync else "OFF (EDGE_RETENTION_REQUIRE_SYNC=false)"
    print(f"Held back past their window (sync gate {gate}):")
    since = min((h.held_from for h in holds if h.held_from < raw_cutoff), default=None)
    print(f"  telemetry_raw: {_plural(held_raw, 'row')} of "
          f"{_plural(sum(1 for h in holds if h.held_from < raw_cutoff), 'device')} not yet acked by the cloud"
          + (f", since {format_time(since)} ({format_age(now - since)})" if since and held_raw else ""))
    print(f"  media_objects: {_plural(media.held, 'frame')} of open sessions"
          + (f", since {format_time(media.held_since)}" if media.held_since else ""))
    print()
    print("Maintenance jobs (scheduled_jobs):")
    if jobs:
        _print_table(("JOB", "EVERY", "LAST_ENQUEUED", "LAST_SUCCESS"),
                     [(j.job, format_age(timedelta(seconds=j.every_seconds)), format_time(j.last_enqueued_at),
                       (f"{format_time(j.last_success_at)} ({format_age(now - j.last_success_at)} ago)"
                        if j.last_success_at else "never")) for j in jobs])
    else:
        print("never scheduled (is `farmiq-edge scheduler` running?)")
    return EXIT_OK


def _oldest(conn, table: str, key: str, list_partitions) -> datetime | None:  # noqa: ANN001
    """Oldest key; partition by partition, oldest first, so only the oldest non-empty is scanned."""
    parts = conn.execute(list_partitions, {"parent": table}).all() if table.startswith("telemetry_") else []
    if not parts:
        return conn.execute(text(f"SELECT min({key}) FROM {table}")).scalar_one()
    found = []
    for part in parts:  # DEFAULT first (its rows can be of any time), then by bounds
        oldest = conn.execute(text(f'SELECT min({key}) FROM "{part.name}"')).scalar_one()
        if oldest is not None:
            found.append(oldest)
            if part.lo is not None:
                break
    return min(found, default=None)
