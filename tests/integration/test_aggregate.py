"""Aggregation (`actors.aggregate`) against real PostgreSQL: exact, incremental, synced once.

The reference for "exact" is always SPEC §2's: a `GROUP BY` over telemetry_raw
with UTC bucket boundaries.
"""

import math
import random
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import psycopg2
import psycopg2.extras
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, text

import actors.aggregate
from actors.aggregate import WINDOWS, aggregate_pending, close_out_buckets, merge_pending
from actors.ingest import ingest_events
from models.messages import parse_message
from models.settings import load_settings
from schema.db import engine_for, transaction
from tests.support import corpus

NOW = datetime.now(timezone.utc)
UTC = timezone.utc

# --- helpers ----------------------------------------------------------------------------


def parse_telemetry(event_id: UUID, at: datetime, readings: list, **topic_ids: str) -> Any:
    return parse_message(corpus.topic("telemetry", **topic_ids),
                         corpus.telemetry_payload(event_id, at, readings), now=NOW,
                         max_clock_skew=timedelta(hours=24),
                         media_max_bytes=corpus.DEFAULT_MEDIA_MAX_BYTES,
                         max_payload_bytes=corpus.default_max_payload_bytes(corpus.DEFAULT_MEDIA_MAX_BYTES))


def ingest(db_url: str, events: list, sync_telemetry: str = "agg") -> None:
    with transaction(db_url) as conn:
        ingest_events(conn, events, sync_telemetry=sync_telemetry)


def settle(db_url: str) -> None:
    """Run merges until no pending partial is left (a quiet moment)."""
    for _ in range(10_000):
        with transaction(db_url) as conn:
            if merge_pending(conn) == 0:
                return
    raise AssertionError("merge_pending never reached 0")


def query(db_url: str, sql: str, params: Any = ()) -> list[dict]:
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(sql, params)
            return [dict(r) for r in cur.fetchall()]
    finally:
        conn.close()


def count(db_url: str, table: str, where: str = "true") -> int:
    return query(db_url, f"SELECT count(*) AS n FROM {table} WHERE {where}")[0]["n"]


REFERENCE = """
    SELECT r.tenant_id, r.device_id, r.metric_type, w.name AS "window",
           date_trunc(w.unit, r.occurred_at, 'UTC') AS bucket_start_at,
           date_trunc(w.unit, r.occurred_at, 'UTC') + w.width AS bucket_end_at,
           min(r.farm_id) AS farm_id, min(r.barn_id) AS barn_id,
           count(*) AS count, sum(r.metric_value) AS sum_value, avg(r.metric_value) AS avg_value,
           min(r.metric_value) AS min_value, max(r.metric_value) AS max_value,
           sum(abs(r.metric_value)) AS abs_sum
      FROM telemetry_raw r
     CROSS JOIN (VALUES ('1m', 'minute', interval '1 minute'),
                        ('1h', 'hour', interval '1 hour'),
                        ('1d', 'day', interval '1 day')) AS w(name, unit, width)
     GROUP BY 1, 2, 3, 4, 5, 6
"""
KEY = ("tenant_id", "device_id", "metric_type", "window", "bucket_start_at")
# The same comparison as `assert_agg_equals_group_by`, in the database (for large tables).
MISMATCHES = f"""
    WITH ref AS ({REFERENCE})
    SELECT count(*)
      FROM ref FULL JOIN telemetry_agg a USING (tenant_id, device_id, metric_type, "window", bucket_start_at)
     WHERE a.count IS DISTINCT FROM ref.count
        OR a.min_value IS DISTINCT FROM ref.min_value OR a.max_value IS DISTINCT FROM ref.max_value
        OR a.bucket_end_at IS DISTINCT FROM ref.bucket_end_at
        OR abs(a.sum_value - ref.sum_value) > 1e-9 * greatest(abs(ref.sum_value), ref.abs_sum)
        OR abs(a.avg_value - ref.avg_value) > 1e-9 * greatest(abs(ref.avg_value), ref.abs_sum / ref.count)
"""


def assert_agg_equals_group_by(db_url: str) -> int:
    """Every telemetry_agg row equals the GROUP BY over telemetry_raw; same set of buckets."""
    ref = {tuple(r[k] for k in KEY): r for r in query(db_url, REFERENCE)}
    agg = {tuple(r[k] for k in KEY): r for r in query(db_url, "SELECT * FROM telemetry_agg")}
    missing, extra = ref.keys() - agg.keys(), agg.keys() - ref.keys()
    assert not missing and not extra, f"missing buckets {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
    for key, want in ref.items():
        got = agg[key]
        assert (got["count"], got["min_value"], got["max_value"]) == (
            want["count"], want["min_value"], want["max_value"]), key
        assert (got["bucket_end_at"], got["farm_id"], got["barn_id"]) == (
            want["bucket_end_at"], want["farm_id"], want["barn_id"]), key
        # Float sums depend on the order of addition; 1e-9 relative to the
        # magnitude of what was added (with cancellation, |sum| can be ~0).
        scale = want["abs_sum"]
        assert math.isclose(got["sum_value"], want["sum_value"], rel_tol=1e-9, abs_tol=1e-9 * scale), key
        assert math.isclose(got["avg_value"], want["avg_value"], rel_tol=1e-9,
                            abs_tol=1e-9 * scale / want["count"]), key
    return len(ref)


# --- the property test (issue 4) --------------------------------------------------------

TENANTS, DEVICES, METRICS = ("t1", "t2", "t3"), ("d1", "d2", "d3"), ("temperature", "humidity", "co2")
_month_start = NOW.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
# Around midnights, month and year ends (leap day included), now's month
# boundary (a real monthly partition beside DEFAULT) and the recent past.
ANCHORS = (datetime(2024, 2, 29, 23, 59, 30, tzinfo=UTC), datetime(2024, 12, 31, 23, 59, 58, tzinfo=UTC),
           datetime(2025, 3, 31, 23, 30, tzinfo=UTC), datetime(2025, 6, 15, 0, 0, 1, tzinfo=UTC),
           _month_start, NOW - timedelta(days=4))

offsets = st.one_of(st.integers(-90, 90), st.integers(-3 * 3600, 3 * 3600),
                    st.integers(-3 * 86400, 3 * 86400))
moments = st.builds(lambda a, s, us: min(a + timedelta(seconds=s, microseconds=us), NOW - timedelta(seconds=1)),
                    st.sampled_from(ANCHORS), offsets, st.integers(0, 999_999))  # never in the future
values = st.one_of(st.floats(-1e15, 1e15, allow_nan=False, allow_infinity=False),
                   st.integers(-1000, 1000).map(float),
                   st.sampled_from([0.0, -0.0, 0.1, -273.15, 5e-324, 1e15, -1e15, 123456789.123]))
# (device index, occurred_at, [(metric index, value), ...]); indexes are taken modulo the drawn counts.
events_st = st.lists(st.tuples(st.integers(0, 8), moments,
                               st.lists(st.tuples(st.integers(0, 2), values), min_size=1, max_size=4)),
                     min_size=1, max_size=25)


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n_tenants=st.integers(1, 3), n_devices=st.integers(1, 3), n_metrics=st.integers(1, 3),
       early=events_st, late=st.lists(st.tuples(st.integers(0, 8), moments,
                                                st.lists(st.tuples(st.integers(0, 2), values),
                                                         min_size=1, max_size=4)), max_size=8),
       rnd=st.randoms(use_true_random=False))
def test_aggregates_equal_group_by_over_raw(db_url: str, n_tenants: int, n_devices: int, n_metrics: int,
                                            early: list, late: list, rnd: random.Random) -> None:
    with transaction(db_url) as conn:  # a fresh database per example
        conn.exec_driver_sql("TRUNCATE telemetry_raw, telemetry_agg, telemetry_agg_pending, "
                             "ingress_dedupe, sync_outbox")
    devices = [(t, d) for t in TENANTS[:n_tenants] for d in DEVICES[:n_devices]]

    def build(spec: list, first_id: int) -> list:
        out = []
        for i, (dev, at, readings) in enumerate(spec):
            tenant, device = devices[dev % len(devices)]
            out.append(parse_telemetry(UUID(int=first_id + i), at,
                                       [(METRICS[m % n_metrics], v, "u") for m, v in readings],
                                       tenant_id=tenant, farm_id=f"farm-{tenant}", device_id=device))
        return out

    # Late data certainly hitting aggregated buckets too: new readings (new event
    # ids, other values within the bounds) at the times and devices of the first early events.
    late = late + [(dev, at, [(m, -v / 2 - 1.0) for m, v in readings]) for dev, at, readings in early[:2]]
    early_events, late_events = build(early, 1), build(late, 1 + len(early))

    def deliver(events: list, redeliveries: list) -> None:
        copies = [e for e in events for _ in range(rnd.randint(1, 3))] + redeliveries
        rnd.shuffle(copies)
        while copies:
            n = rnd.randint(1, 8)
            batch, copies = copies[:n], copies[n:]
            ingest(db_url, batch)
            if rnd.random() < 0.5:
                with transaction(db_url) as conn:
                    merge_pending(conn, page=rnd.choice([1, 2, 7, 5000]))

    deliver(early_events, [])
    settle(db_url)
    readings = sum(len(e.readings) for e in early_events)
    assert count(db_url, "telemetry_raw") == readings  # duplicates are invisible
    assert assert_agg_equals_group_by(db_url) > 0

    # Late arrivals: old buckets that were already aggregated, among redeliveries.
    deliver(late_events, rnd.sample(early_events, min(len(early_events), 5)))
    settle(db_url)
    readings += sum(len(e.readings) for e in late_events)
    assert count(db_url, "telemetry_raw") == readings
    assert count(db_url, "telemetry_agg_pending") == 0
    assert_agg_equals_group_by(db_url)


# --- close-out: one telemetry.aggregated event per closed, changed bucket ---------------

CLOCK_SQL = """
    CREATE SCHEMA testclock;
    CREATE FUNCTION testclock.now() RETURNS timestamptz LANGUAGE sql STABLE
        AS $$ SELECT current_setting('farmiq.test_now')::timestamptz $$;
"""


@pytest.fixture
def clock_db(db_url: str) -> str:
    """A database where close-out can run at a chosen `now()` (see `close_at`)."""
    with transaction(db_url) as conn:
        conn.exec_driver_sql(CLOCK_SQL)
    return db_url


def close_at(db_url: str, when: datetime | None, *, emit: bool = True) -> int:
    """close_out_buckets in a transaction whose now() is `when` (None: the real clock).

    testclock.now() shadows pg_catalog.now() by search_path order, which is
    what the unqualified `now()` that SQLAlchemy's func.now() renders finds.
    """
    with transaction(db_url) as conn:
        if when is not None:
            conn.exec_driver_sql("SET LOCAL search_path = testclock, public, pg_catalog")
            conn.execute(text("SELECT set_config('farmiq.test_now', :t, true)"), {"t": when.isoformat()})
            assert conn.execute(text("SELECT now()")).scalar_one() == when
        return close_out_buckets(conn, emit_events=emit)


def aggregated_events(db_url: str) -> list[dict]:
    return query(db_url, "SELECT * FROM sync_outbox WHERE event_type = 'telemetry.aggregated' ORDER BY id")


T = datetime(2025, 6, 15, 10, 30, 20, tzinfo=UTC)
MINUTE = T.replace(second=0)


def payload(window: str, start: datetime, n: int, avg: float, lo: float, hi: float,
            metric: str = "temperature") -> dict:
    return {"window": window, "metric_type": metric, "bucket_start_at": start.isoformat(),
            "bucket_end_at": (start + WINDOWS[window]).isoformat(), "count": n,
            "avg_value": avg, "min_value": lo, "max_value": hi}


def test_close_out_sends_each_bucket_once_it_closes_and_again_after_late_data(clock_db: str) -> None:
    db = clock_db
    ingest(db, [parse_telemetry(UUID(int=1), T, [("temperature", 1.0, "C"), ("humidity", 50.0, "%")]),
                parse_telemetry(UUID(int=2), T + timedelta(seconds=30), [("temperature", 3.0, "C")])])
    settle(db)
    assert count(db, "telemetry_agg", "needs_sync") == 6

    # Open buckets: nothing until each one's end.
    assert close_at(db, MINUTE + timedelta(seconds=59, microseconds=999_999)) == 0
    assert aggregated_events(db) == []
    assert close_at(db, MINUTE + timedelta(minutes=1)) == 2  # the 1m buckets, both metrics
    assert close_at(db, MINUTE + timedelta(minutes=15)) == 0
    assert close_at(db, MINUTE.replace(minute=0) + timedelta(hours=1)) == 2  # 1h
    assert close_at(db, datetime(2025, 6, 15, 23, 59, 59, tzinfo=UTC)) == 0
    assert close_at(db, datetime(2025, 6, 16, tzinfo=UTC)) == 2  # 1d (UTC day)
    assert close_at(db, None) == 0
    assert count(db, "telemetry_agg", "needs_sync") == 0

    events = aggregated_events(db)
    temperature = [e for e in events if e["payload_json"]["metric_type"] == "temperature"]
    hour, day = MINUTE.replace(minute=0), MINUTE.replace(hour=0, minute=0)
    assert [e["payload_json"] for e in temperature] == [payload("1m", MINUTE, 2, 2.0, 1.0, 3.0),
                                                        payload("1h", hour, 2, 2.0, 1.0, 3.0),
                                                        payload("1d", day, 2, 2.0, 1.0, 3.0)]
    for e in events:
        assert (e["tenant_id"], e["farm_id"], e["barn_id"], e["device_id"]) == (
            corpus.TENANT, corpus.FARM, corpus.BARN, corpus.DEVICE)
        assert e["occurred_at"] == datetime.fromisoformat(e["payload_json"]["bucket_end_at"])
        assert e["status"] == "pending" and e["session_id"] is None

    # Late data for the closed temperature buckets: one more event each, humidity untouched.
    ingest(db, [parse_telemetry(UUID(int=3), T + timedelta(seconds=20), [("temperature", 8.0, "C")])])
    settle(db)
    assert close_at(db, None) == 3
    assert close_at(db, None) == 0
    late = aggregated_events(db)[len(events):]
    assert sorted((e["payload_json"]["window"], e["payload_json"]["count"], e["payload_json"]["avg_value"],
                   e["payload_json"]["max_value"], e["payload_json"]["metric_type"]) for e in late) == [
        ("1d", 3, 4.0, 8.0, "temperature"), ("1h", 3, 4.0, 8.0, "temperature"),
        ("1m", 3, 4.0, 8.0, "temperature")]
    assert len(aggregated_events(db)) == 9


def test_open_bucket_of_recent_data_sends_nothing(db_url: str) -> None:
    # Within the accepted clock skew: every bucket of this reading ends in the future.
    ingest(db_url, [parse_telemetry(UUID(int=1), NOW + timedelta(hours=2), [("temperature", 1.0, "C")])])
    settle(db_url)
    assert count(db_url, "telemetry_agg") == 3
    assert close_at(db_url, None) == 0
    assert aggregated_events(db_url) == []
    assert count(db_url, "telemetry_agg", "needs_sync") == 3


def test_raw_mode_sends_no_aggregates_but_clears_needs_sync(clock_db: str) -> None:
    db = clock_db
    ingest(db, [parse_telemetry(UUID(int=1), T, [("temperature", 1.0, "C")])], sync_telemetry="raw")
    settle(db)
    assert close_at(db, None, emit=False) == 3
    assert count(db, "telemetry_agg", "needs_sync") == 0
    assert close_at(db, None, emit=False) == 0
    ingest(db, [parse_telemetry(UUID(int=2), T, [("temperature", 2.0, "C")])], sync_telemetry="raw")
    settle(db)
    assert count(db, "telemetry_agg", "needs_sync") == 3
    assert close_at(db, None, emit=False) == 3
    assert aggregated_events(db) == []
    # What raw mode did send: one telemetry.ingested per message.
    assert count(db, "sync_outbox") == count(db, "sync_outbox", "event_type = 'telemetry.ingested'") == 2
    # Switching to agg later does not replay buckets raw mode already closed out.
    assert close_at(db, None, emit=True) == 0


# --- cost follows touched buckets ---------------------------------------------------------

BIG_RAW = """
    INSERT INTO telemetry_raw (id, tenant_id, farm_id, barn_id, device_id, occurred_at,
                               metric_type, metric_value, unit)
    SELECT gen_random_uuid(), 'tenant-a', 'farm-1', 'barn-1', 'device-1',
           timestamptz '2025-05-01 00:00:00+00' + g * interval '13 seconds',
           'temperature', mod(g, 1000) / 10.0, 'C'
      FROM generate_series(1, 200000) AS g
"""
AGG_FROM_RAW = """
    INSERT INTO telemetry_agg (id, tenant_id, farm_id, barn_id, device_id, "window", bucket_start_at,
                               bucket_end_at, metric_type, avg_value, min_value, max_value, count,
                               sum_value, needs_sync)
    SELECT gen_random_uuid(), tenant_id, farm_id, barn_id, device_id, "window", bucket_start_at,
           bucket_end_at, metric_type, avg_value, min_value, max_value, count, sum_value, false
      FROM ({reference}) AS ref
"""


def test_merge_cost_follows_touched_buckets_not_raw_size(db_url: str) -> None:
    with transaction(db_url) as conn:
        conn.exec_driver_sql(BIG_RAW)
        conn.exec_driver_sql(AGG_FROM_RAW.format(reference=REFERENCE))
    agg_before = count(db_url, "telemetry_agg")
    assert count(db_url, "telemetry_raw") == 200_000 and agg_before > 40_000

    # Two batches of two messages, two metrics, two minutes of one hour and day:
    # 8 pending partials for 4 minute buckets (humidity is new, temperature exists).
    at = datetime(2025, 5, 10, 12, 0, 5, tzinfo=UTC)
    r = [("temperature", 99.5, "C"), ("humidity", 40.0, "%")]
    ingest(db_url, [parse_telemetry(UUID(int=1), at, r),
                    parse_telemetry(UUID(int=2), at + timedelta(seconds=65), r)])
    ingest(db_url, [parse_telemetry(UUID(int=3), at + timedelta(seconds=35), r),
                    parse_telemetry(UUID(int=4), at + timedelta(seconds=70), r)])
    assert count(db_url, "telemetry_agg_pending") == 8

    statements: list[str] = []

    def listener(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        statements.append(sql)

    engine = engine_for(db_url)
    event.listen(engine, "before_cursor_execute", listener)
    try:
        with transaction(db_url) as conn:
            started = conn.execute(text("SELECT now()")).scalar_one()
            statements.clear()
            claimed = merge_pending(conn)
            n_statements = len(statements)
            raw_reads = conn.execute(text("""
                SELECT coalesce(sum(coalesce(seq_scan, 0) + coalesce(idx_scan, 0)), 0) AS scans,
                       coalesce(sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)), 0) AS tuples
                  FROM pg_stat_xact_user_tables WHERE relname LIKE 'telemetry_raw%'""")).one()
    finally:
        event.remove(engine, "before_cursor_execute", listener)

    assert claimed == 8  # pending partials merged
    # The upsert runs in a savepoint (poison isolation): SAVEPOINT/RELEASE are not queries.
    merge_sql = [s for s in statements[:n_statements] if not s.startswith(("SAVEPOINT", "RELEASE"))]
    assert len(merge_sql) <= 2, merge_sql  # claim, one upsert
    assert not any("telemetry_raw" in s for s in merge_sql)
    assert (raw_reads.scans, raw_reads.tuples) == (0, 0)  # not one row of telemetry_raw read
    # Rows written = touched buckets: 2 minutes x 2 metrics (1m) + 2 metrics (1h) + 2 metrics (1d).
    assert count(db_url, "telemetry_agg", f"updated_at >= '{started.isoformat()}'") == 8
    assert count(db_url, "telemetry_agg") == agg_before + 4  # humidity's new buckets
    assert count(db_url, "telemetry_agg_pending") == 0
    assert query(db_url, MISMATCHES)[0]["count"] == 0


# --- the actor drains everything in one run -------------------------------------------------


def test_one_aggregate_run_drains_all_pending_rows(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """More pending partials than a page, sharing few minute buckets (many batches
    of the same busy minute, as under steady ingest): one run must leave none."""
    at = NOW - timedelta(days=1)
    readings = [(f"m{i}", float(i), "u") for i in range(100)]
    page = actors.aggregate.PENDING_PAGE
    batches = page // 100 + 10
    for b in range(batches):
        ingest(db_url, [parse_telemetry(UUID(int=b + 1), at + timedelta(microseconds=b), readings)])
    assert count(db_url, "telemetry_agg_pending") == batches * 100 > page

    monkeypatch.setattr(actors.aggregate, "get_settings", lambda: load_settings(database_url=db_url))
    aggregate_pending.fn()
    assert count(db_url, "telemetry_agg_pending") == 0
    assert assert_agg_equals_group_by(db_url) == 300
    assert {r["count"] for r in query(db_url, "SELECT count FROM telemetry_agg")} == {batches}
    # agg mode: every closed bucket (1m, 1h, 1d of yesterday) was sent, and the
    # last event of each carries its final state (an earlier one may carry the
    # state after the first page: the run closes out between pages).
    assert count(db_url, "telemetry_agg", "needs_sync") == 0
    last: dict[tuple, dict] = {}
    for e in aggregated_events(db_url):
        p = e["payload_json"]
        last[(p["metric_type"], p["window"])] = p
    assert len(last) == 300
    assert {p["count"] for p in last.values()} == {batches}
