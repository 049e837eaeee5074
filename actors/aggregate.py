"""Queue `aggregate`: merge pending partial aggregates into telemetry_agg (1m, 1h, 1d).

The ingest transaction writes one telemetry_agg_pending row per (tenant, device,
metric, minute) it touched, so the work list is durable. A run claims a page of
pending rows, merges them into the three windows and deletes them, all in one
transaction (commit point): a crash before it leaves the rows pending, after it
they are gone and counted exactly once. Merging sums, counts, mins and maxes is
associative, so late data and any arrival order give what a GROUP BY over
telemetry_raw gives. Cost follows the number of touched buckets.
"""

from actors.broker import broker  # noqa: F401,I001 - the broker is set before any actor

from datetime import datetime, timedelta, timezone

import dramatiq
from sqlalchemy import Connection, bindparam, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from actors.metrics import AGG_BUCKETS_WRITTEN, AGG_LAG
from models.ids import new_id
from models.outbox_events import outbox_row
from models.settings import get_settings
from models.tables import sync_outbox, telemetry_agg
from schema.db import transaction

PENDING_PAGE = 5000
CLOSE_OUT_PAGE = 2000
MAX_PAGES_PER_RUN = 20
WINDOWS = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}

# Claim a page of pending partials (skipping rows another run holds) and return
# them merged per minute bucket, with how many pending rows each one merged.
CLAIM_PENDING = text("""
    WITH claimed AS (
        DELETE FROM telemetry_agg_pending
         WHERE id IN (SELECT id FROM telemetry_agg_pending
                       ORDER BY id LIMIT :page FOR UPDATE SKIP LOCKED)
     RETURNING tenant_id, farm_id, barn_id, device_id, metric_type, bucket_start_at,
               count, sum_value, min_value, max_value)
    SELECT tenant_id, farm_id, barn_id, device_id, metric_type, bucket_start_at,
           sum(count)::bigint AS count, sum(sum_value) AS sum_value,
           min(min_value) AS min_value, max(max_value) AS max_value, count(*) AS pending_rows
      FROM claimed
     GROUP BY tenant_id, farm_id, barn_id, device_id, metric_type, bucket_start_at
""")
OLDEST_PENDING_AGE = text("""
    SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)
      FROM telemetry_agg_pending
""")


@dramatiq.actor(queue_name="aggregate", max_retries=10, time_limit=300_000)
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
    minutes = conn.execute(CLAIM_PENDING, {"page": page}).all()
    buckets: dict[tuple, list] = {}
    for m in minutes:
        for window in WINDOWS:
            key = (m.tenant_id, m.device_id, m.metric_type, window, bucket_start(m.bucket_start_at, window))
            b = buckets.get(key)
            if b is None:
                # farm/barn are carried along (a device belongs to one barn).
                buckets[key] = [m.count, m.sum_value, m.min_value, m.max_value, m.farm_id, m.barn_id]
            else:
                b[0] += m.count
                b[1] += m.sum_value
                b[2] = min(b[2], m.min_value)
                b[3] = max(b[3], m.max_value)
    if not buckets:
        return 0
    # Sorted: two runs updating overlapping buckets take row locks in one order.
    rows = [{"id": new_id(), "tenant_id": t, "farm_id": farm, "barn_id": barn, "device_id": d,
             "metric_type": metric, "window": w, "bucket_start_at": start,
             "bucket_end_at": start + WINDOWS[w], "count": n, "sum_value": s, "avg_value": s / n,
             "min_value": lo, "max_value": hi}
            for (t, d, metric, w, start), (n, s, lo, hi, farm, barn) in sorted(buckets.items())]
    stmt = pg_insert(telemetry_agg)
    old, new = telemetry_agg.c, stmt.excluded
    conn.execute(stmt.on_conflict_do_update(
        constraint="telemetry_agg_bucket_key",
        set_={"count": old.count + new.count,
              "sum_value": old.sum_value + new.sum_value,
              "avg_value": (old.sum_value + new.sum_value) / (old.count + new.count),
              "min_value": func.least(old.min_value, new.min_value),
              "max_value": func.greatest(old.max_value, new.max_value),
              "farm_id": new.farm_id, "barn_id": new.barn_id,
              "needs_sync": True, "updated_at": func.now()}), rows)
    for (_, _, _, window, _) in buckets:
        AGG_BUCKETS_WRITTEN.labels(window).inc()
    return sum(m.pending_rows for m in minutes)


def close_out_buckets(conn: Connection, *, emit_events: bool, page: int = CLOSE_OUT_PAGE) -> int:
    """Write one telemetry.aggregated event per changed bucket once it has closed.

    An open bucket changes every few seconds; waiting for its end sends it once
    (and again only if late data changes it), which is the reduced sync volume
    the design asks of aggregates.
    """
    agg = telemetry_agg.c
    closed = conn.execute(
        select(telemetry_agg).where(agg.needs_sync, agg.bucket_end_at <= func.now())
        .order_by(agg.bucket_end_at).limit(page).with_for_update(skip_locked=True)).all()
    if not closed:
        return 0
    if emit_events:
        conn.execute(pg_insert(sync_outbox), [outbox_row(
            "telemetry.aggregated", tenant_id=r.tenant_id, farm_id=r.farm_id, barn_id=r.barn_id,
            device_id=r.device_id,
            occurred_at=r.bucket_end_at,
            payload={"window": r.window, "metric_type": r.metric_type,
                     "bucket_start_at": r.bucket_start_at.isoformat(),
                     "bucket_end_at": r.bucket_end_at.isoformat(), "count": r.count,
                     "avg_value": r.avg_value, "min_value": r.min_value, "max_value": r.max_value})
            for r in closed])
    conn.execute(update(telemetry_agg)
                 .where(agg.id == bindparam("b_id"), agg.bucket_start_at == bindparam("b_start"))
                 .values(needs_sync=False),
                 [{"b_id": r.id, "b_start": r.bucket_start_at} for r in closed])
    return len(closed)


def bucket_start(minute: datetime, window: str) -> datetime:
    """Start of the UTC bucket of `window` containing `minute`."""
    minute = minute.astimezone(timezone.utc)
    if window == "1m":
        return minute
    if window == "1h":
        return minute.replace(minute=0)
    return minute.replace(hour=0, minute=0)
