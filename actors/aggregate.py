"""Queue `aggregate`: merge pending partial aggregates into telemetry_agg (1m, 1h, 1d).

The ingest transaction writes one telemetry_agg_pending row per (tenant, device,
metric, minute) it touched, so the work list is durable. A run claims a page of
pending rows, merges them into the three windows and deletes them, all in one
transaction (commit point): a crash before it leaves the rows pending, after it
they are gone and counted exactly once. Merging sums, counts, mins and maxes is
associative, so late data and any arrival order give what a GROUP BY over
telemetry_raw gives. Cost follows the number of touched buckets.

Poison isolation: one bad item never blocks the others. A pending partial
outside SPEC §1.2's bounds, a bucket whose write fails with a data error, or
a closed bucket whose telemetry.aggregated event cannot be written goes to
telemetry_agg_failed with a reason (and farmiq_edge_aggregation_failures_total);
the page commits without it. Writes run in a savepoint per page and, only when
that fails, one savepoint per item. Connection-level errors (OperationalError:
database gone, disk full, query cancelled) are not the item's fault: they fail
the run, which is retried. With |metric_value| <= 1e15 every sum of accepted
values is finite (a bucket would need ~1e293 readings to overflow).
"""

from actors.broker import broker  # noqa: F401,I001 - the broker is set before any actor

import math
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import dramatiq

from sqlalchemy import Connection, func, insert, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert

from actors.database_outage import ride_out_database_outage
from actors.metrics import AGG_BUCKETS_WRITTEN, AGG_FAILURES, AGG_LAG
from models.ids import new_id
from models.messages import METRIC_VALUE_BOUND
from models.outbox_events import outbox_row
from models.settings import get_settings
from models.tables import sync_outbox, telemetry_agg, telemetry_agg_failed
from schema.db import DB_ERRORS, db_error_class, is_connection_error, transaction

T = TypeVar("T")

PENDING_PAGE = 5000
CLOSE_OUT_PAGE = 2000
MAX_PAGES_PER_RUN = 20
WINDOWS = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}

# Claim a page of pending partials (skipping rows another run holds). They are
# merged in Python, where each one is checked before it can poison a bucket.
CLAIM_PENDING = text("""
    DELETE FROM telemetry_agg_pending
     WHERE id IN (SELECT id FROM telemetry_agg_pending
                   ORDER BY id LIMIT :page FOR UPDATE SKIP LOCKED)
 RETURNING tenant_id, farm_id, barn_id, device_id, metric_type, bucket_start_at,
           count, sum_value, min_value, max_value
""")
OLDEST_PENDING_AGE = text("""
    SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)
      FROM telemetry_agg_pending
""")
# Closed buckets written to the outbox (or set aside): one statement for the page.
MARK_SENT = text("""
    UPDATE telemetry_agg SET needs_sync = false
     WHERE (id, bucket_start_at) IN (SELECT *
                                       FROM unnest(CAST(:ids AS uuid[]), CAST(:starts AS timestamptz[])))
""")
# Merge a page's buckets into telemetry_agg: one statement, its rows as column
# arrays (a row per statement cost PostgreSQL a parse and plan per bucket).
MERGE_BUCKETS = text("""
    INSERT INTO telemetry_agg AS old
           (id, tenant_id, farm_id, barn_id, device_id, metric_type, "window", bucket_start_at,
            bucket_end_at, count, sum_value, avg_value, min_value, max_value)
    SELECT b.id, b.tenant_id, b.farm_id, b.barn_id, b.device_id, b.metric_type, b."window",
           b.bucket_start_at, b.bucket_end_at, b.count, b.sum_value, b.sum_value / b.count,
           b.min_value, b.max_value
      FROM unnest(CAST(:id AS uuid[]), CAST(:tenant_id AS text[]), CAST(:farm_id AS text[]),
                  CAST(:barn_id AS text[]), CAST(:device_id AS text[]), CAST(:metric_type AS text[]),
                  CAST(:window AS text[]), CAST(:bucket_start_at AS timestamptz[]),
                  CAST(:bucket_end_at AS timestamptz[]), CAST(:count AS bigint[]),
                  CAST(:sum_value AS float8[]), CAST(:min_value AS float8[]), CAST(:max_value AS float8[]))
           WITH ORDINALITY AS b(id, tenant_id, farm_id, barn_id, device_id, metric_type, "window",
                                bucket_start_at, bucket_end_at, count, sum_value, min_value, max_value, n)
     ORDER BY b.n
    ON CONFLICT ON CONSTRAINT telemetry_agg_bucket_key DO UPDATE
       SET count      = old.count + EXCLUDED.count,
           sum_value  = old.sum_value + EXCLUDED.sum_value,
           avg_value  = (old.sum_value + EXCLUDED.sum_value) / (old.count + EXCLUDED.count),
           min_value  = least(old.min_value, EXCLUDED.min_value),
           max_value  = greatest(old.max_value, EXCLUDED.max_value),
           farm_id    = EXCLUDED.farm_id,
           barn_id    = EXCLUDED.barn_id,
           needs_sync = true,
           updated_at = now()
""")


@dramatiq.actor(queue_name="aggregate", max_retries=10, time_limit=300_000)
@ride_out_database_outage
def aggregate_pending() -> None:
    settings = get_settings()
    emit = settings.sync_telemetry in ("agg", "both")
    # Merge what is pending first, then close out: closing out between pages
    # would send a bucket spanning two pages twice. Bounded, so a backlog
    # cannot starve close-out; the scheduler's next tick carries on.
    for _ in range(MAX_PAGES_PER_RUN):
        with transaction(settings.database_url) as conn:
            if merge_pending(conn) < PENDING_PAGE:
                break
    for _ in range(MAX_PAGES_PER_RUN):
        with transaction(settings.database_url) as conn:
            if close_out_buckets(conn, emit_events=emit) < CLOSE_OUT_PAGE:
                break
    with transaction(settings.database_url) as conn:
        AGG_LAG.set(conn.execute(OLDEST_PENDING_AGE).scalar_one())


def merge_pending(conn: Connection, page: int = PENDING_PAGE) -> int:
    """Claim up to `page` pending rows and merge them; return how many pending rows.

    Rows, not minute buckets: the caller compares it with the page size to know
    whether more is pending (many rows of one busy minute merge into one bucket).
    """
    partials = conn.execute(CLAIM_PENDING, {"page": page}).all()
    minutes: dict[tuple, list] = {}
    failures = []
    for m in partials:
        if not partial_in_bounds(m.count, m.sum_value, m.min_value, m.max_value):
            failures.append(_failure("merge", m._asdict(), "out_of_range", "partial beyond SPEC 1.2 bounds"))
            continue
        # farm/barn are carried along (a device belongs to one barn).
        minute = bucket_start(m.bucket_start_at, "1m")
        _merge(minutes, (m.tenant_id, m.device_id, m.metric_type, "1m", minute),
               [m.count, m.sum_value, m.min_value, m.max_value, m.farm_id, m.barn_id])
    # The hours and days from the merged minutes (fewer than the partials).
    buckets = dict(minutes)
    for (tenant, device, metric, _, minute), b in minutes.items():
        for window in ("1h", "1d"):
            _merge(buckets, (tenant, device, metric, window, bucket_start(minute, window)), list(b))
    # Sorted: two runs updating overlapping buckets take row locks in one order.
    rows = [{"id": new_id(), "tenant_id": t, "farm_id": farm, "barn_id": barn, "device_id": d,
             "metric_type": metric, "window": w, "bucket_start_at": start,
             "bucket_end_at": start + WINDOWS[w], "count": n, "sum_value": s,
             "min_value": lo, "max_value": hi}
            for (t, d, metric, w, start), (n, s, lo, hi, farm, barn) in sorted(buckets.items())]

    def write(page_rows: Sequence[dict[str, Any]]) -> None:
        conn.execute(MERGE_BUCKETS, _columns(page_rows))

    for row, exc in write_isolated(conn, write, rows):
        failures.append(_failure("merge", row, "write_failed", db_error_class(exc)))
    _set_aside(conn, failures)
    failed_buckets = {(f["window"], f["bucket_start_at"], f["device_id"], f["metric_type"])
                      for f in failures}
    for row in rows:
        if (row["window"], row["bucket_start_at"], row["device_id"], row["metric_type"]) not in failed_buckets:
            AGG_BUCKETS_WRITTEN.labels(row["window"]).inc()
    return len(partials)


def close_out_buckets(conn: Connection, *, emit_events: bool, page: int = CLOSE_OUT_PAGE) -> int:
    """Write one telemetry.aggregated event per changed bucket once it has closed.

    An open bucket changes every few seconds; waiting for its end sends it once
    (and again only if late data changes it), which is the reduced sync volume
    the design asks of aggregates. A bucket whose event cannot be written is
    set aside (telemetry_agg_failed) and the others are sent.
    """
    agg = telemetry_agg.c
    closed = conn.execute(
        select(telemetry_agg).where(agg.needs_sync, agg.bucket_end_at <= func.now())
        .order_by(agg.bucket_end_at).limit(page).with_for_update(skip_locked=True)).all()
    if not closed:
        return 0
    failures = []
    if emit_events:
        sendable = []
        for r in closed:
            if all(math.isfinite(v) for v in (r.avg_value, r.min_value, r.max_value, r.sum_value)):
                sendable.append(r)
            else:
                failures.append(_failure("close_out", r._asdict(), "non_finite", "aggregate is not finite"))
        for r, exc in write_isolated(conn, lambda page_rows: conn.execute(
                pg_insert(sync_outbox), [_aggregated_event(r) for r in page_rows]), sendable):
            failures.append(_failure("close_out", r._asdict(), "write_failed", db_error_class(exc)))
    # Failed ones too: they are recorded, and must not be picked again every second.
    conn.execute(MARK_SENT, {"ids": [r.id for r in closed], "starts": [r.bucket_start_at for r in closed]})
    _set_aside(conn, failures)
    return len(closed)


def _merge(buckets: dict[tuple, list], key: tuple, partial: list) -> None:
    """Add `partial` ([count, sum, min, max, farm, barn]) into the bucket at `key`."""
    b = buckets.get(key)
    if b is None:
        buckets[key] = partial
    else:
        b[0] += partial[0]
        b[1] += partial[1]
        b[2] = min(b[2], partial[2])
        b[3] = max(b[3], partial[3])


def _columns(rows: Sequence[dict[str, Any]]) -> dict[str, list]:
    """MERGE_BUCKETS' parameters: one array per column, in row order."""
    return {column: [row[column] for row in rows] for column in rows[0]}


def partial_in_bounds(n: int, total: float, lo: float, hi: float) -> bool:
    """A partial aggregate that accepted readings (SPEC §1.2) can produce."""
    values = (total, lo, hi)
    return (n >= 1 and all(math.isfinite(v) for v in values) and lo <= hi
            and abs(lo) <= METRIC_VALUE_BOUND and abs(hi) <= METRIC_VALUE_BOUND
            and abs(total) <= METRIC_VALUE_BOUND * n)


def write_isolated(conn: Connection, write: Callable[[Sequence[T]], Any],
                   items: Sequence[T]) -> list[tuple[T, Exception]]:
    """`write(items)` in a savepoint; if it fails on the data, each item in its own
    savepoint. Returns the items that failed alone, with their error. Connection-level
    errors (is_connection_error) are raised: they are no item's fault."""
    if not items:
        return []
    try:
        with conn.begin_nested():  # savepoint: the common case, one round trip
            write(items)
        return []
    except DB_ERRORS as exc:
        if is_connection_error(exc):
            raise
    failed = []
    for item in items:
        try:
            with conn.begin_nested():
                write([item])
        except DB_ERRORS as exc:
            if is_connection_error(exc):
                raise
            failed.append((item, exc))
    return failed


def _aggregated_event(r: Any) -> dict[str, Any]:
    return outbox_row(
        "telemetry.aggregated", tenant_id=r.tenant_id, farm_id=r.farm_id, barn_id=r.barn_id,
        device_id=r.device_id, occurred_at=r.bucket_end_at,
        payload={"window": r.window, "metric_type": r.metric_type,
                 "bucket_start_at": r.bucket_start_at.isoformat(),
                 "bucket_end_at": r.bucket_end_at.isoformat(), "count": r.count,
                 "avg_value": r.avg_value, "min_value": r.min_value, "max_value": r.max_value})


_FAILURE_COLUMNS = ("tenant_id", "farm_id", "barn_id", "device_id", "metric_type", "bucket_start_at",
                    "count", "sum_value", "min_value", "max_value")


def _failure(stage: str, item: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return {"stage": stage, "window": item.get("window"), "reason": reason, "detail": detail,
            **{c: item[c] for c in _FAILURE_COLUMNS}}


def _set_aside(conn: Connection, failures: list[dict[str, Any]]) -> None:
    if failures:
        conn.execute(insert(telemetry_agg_failed), failures)
    for f in failures:
        AGG_FAILURES.labels(f["stage"], f["reason"]).inc()


def bucket_start(minute: datetime, window: str) -> datetime:
    """Start of the UTC bucket of `window` containing `minute`."""
    minute = minute.astimezone(timezone.utc)
    if window == "1m":
        return minute
    if window == "1h":
        return minute.replace(minute=0)
    return minute.replace(hour=0, minute=0)
