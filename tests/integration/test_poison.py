"""Poison isolation (issue 12): one bad item never blocks the others.

Readings at SPEC §1.2's bounds (±1e15) aggregate and sync exactly; buckets made
to fail on purpose — a partial beyond the bounds (written before the bound
existed), a bucket whose write fails, a non-finite bucket, a bucket whose
outbox event fails — are set aside in telemetry_agg_failed with their reason,
and every other bucket reaches the outbox in the same run.
"""

from datetime import datetime, timedelta, timezone
from uuid import UUID

import pytest

import actors.aggregate
from actors.aggregate import WINDOWS, aggregate_pending, partial_in_bounds
from models.settings import load_settings
from schema.db import transaction
from tests.integration.test_aggregate import count, ingest, parse_telemetry, query

YESTERDAY = (datetime.now(timezone.utc) - timedelta(days=1)).replace(hour=10, minute=30, second=5)
GOOD_DEVICES = ["max-dev", "min-dev", "dev-1", "dev-2", "dev-3"]

# Failures on purpose, by device: a trigger refuses its aggregate write, or its outbox event.
FAIL_ON_PURPOSE = """
    CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.device_id = TG_ARGV[0] THEN
            RAISE EXCEPTION 'refused on purpose';
        END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER refuse_agg BEFORE INSERT OR UPDATE ON telemetry_agg
        FOR EACH ROW EXECUTE FUNCTION test_refuse('poison-merge');
    CREATE TRIGGER refuse_outbox BEFORE INSERT ON sync_outbox
        FOR EACH ROW EXECUTE FUNCTION test_refuse('poison-outbox');
"""


def test_float_bounds_and_buckets_failing_on_purpose(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with transaction(db_url) as conn:
        conn.exec_driver_sql(FAIL_ON_PURPOSE)
    events = []
    n = 0
    for device in GOOD_DEVICES + ["poison-merge", "poison-outbox"]:
        value = {"max-dev": 1e15, "min-dev": -1e15}.get(device, 21.5)
        for i in range(50):  # 50 events x 2 readings at the bound: sum 1e17, no overflow
            n += 1
            events.append(parse_telemetry(UUID(int=n), YESTERDAY + timedelta(milliseconds=i),
                                          [("temperature", value, "C"), ("temperature", value, "C")],
                                          device_id=device))
    ingest(db_url, events)
    with transaction(db_url) as conn:
        # A partial beyond the bounds (e.g. written before SPEC bounded metric_value):
        # its sum would overflow to Infinity and poison close-out.
        conn.exec_driver_sql(
            "INSERT INTO telemetry_agg_pending (tenant_id, farm_id, barn_id, device_id, metric_type, "
            "bucket_start_at, count, sum_value, min_value, max_value) VALUES "
            "('tenant-a', 'farm-1', 'barn-1', 'poison-pending', 'temperature', %s, 2, 'Infinity', 1e308, 1.7e308)",
            (YESTERDAY.replace(second=0, microsecond=0),))
        # A bucket that is already non-finite in telemetry_agg (same story).
        conn.exec_driver_sql(
            "INSERT INTO telemetry_agg (id, tenant_id, farm_id, barn_id, device_id, \"window\", "
            "bucket_start_at, bucket_end_at, metric_type, avg_value, min_value, max_value, count, "
            "sum_value, needs_sync) VALUES (gen_random_uuid(), 'tenant-a', 'farm-1', 'barn-1', "
            "'poison-agg', '1h', %s, %s, 'temperature', 'Infinity', 1.7e308, 1.7e308, 2, 'Infinity', true)",
            (YESTERDAY.replace(minute=0, second=0, microsecond=0),
             YESTERDAY.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)))

    monkeypatch.setattr(actors.aggregate, "get_settings", lambda: load_settings(database_url=db_url))
    aggregate_pending.fn()  # one run; it raises nothing

    # Every other bucket reached the outbox: 3 windows for each good device.
    sent = query(db_url, "SELECT device_id, payload_json AS p FROM sync_outbox "
                         "WHERE event_type = 'telemetry.aggregated'")
    assert sorted((r["device_id"], r["p"]["window"]) for r in sent) == sorted(
        (d, w) for d in GOOD_DEVICES for w in WINDOWS)
    at_bound = {(r["device_id"], r["p"]["window"]): r["p"] for r in sent}
    for window in WINDOWS:
        assert (at_bound[("max-dev", window)]["count"], at_bound[("max-dev", window)]["avg_value"],
                at_bound[("max-dev", window)]["max_value"]) == (100, 1e15, 1e15)
        assert (at_bound[("min-dev", window)]["avg_value"], at_bound[("min-dev", window)]["min_value"]) == (-1e15, -1e15)
    sums = {r["device_id"]: r["sum_value"] for r in query(
        db_url, "SELECT device_id, sum_value FROM telemetry_agg WHERE \"window\" = '1d'")}
    assert sums["max-dev"] == 1e17 and sums["min-dev"] == -1e17

    # The failed ones are visible with their reasons.
    failed = query(db_url, "SELECT stage, device_id, \"window\", reason, detail FROM telemetry_agg_failed")
    by_device = {}
    for f in failed:
        by_device.setdefault(f["device_id"], set()).add((f["stage"], f["window"], f["reason"]))
    assert by_device == {
        "poison-pending": {("merge", None, "out_of_range")},
        "poison-merge": {("merge", w, "write_failed") for w in WINDOWS},
        "poison-agg": {("close_out", "1h", "non_finite")},
        "poison-outbox": {("close_out", w, "write_failed") for w in WINDOWS},
    }
    assert all(f["detail"] == "RaiseException P0001" for f in failed if f["reason"] == "write_failed")
    assert count(db_url, "telemetry_agg_pending") == 0

    # A second run sends nothing again and sets nothing aside again: nothing is stuck.
    aggregate_pending.fn()
    assert count(db_url, "sync_outbox", "event_type = 'telemetry.aggregated'") == len(sent)
    assert count(db_url, "telemetry_agg_failed") == len(failed)


@pytest.mark.parametrize("partial, ok", [
    ((1, 1e15, 1e15, 1e15), True),
    ((3, -3e15, -1e15, -1e15), True),
    ((2, 0.0, -1e15, 1e15), True),
    ((1, float("inf"), 1.0, 1.0), False),
    ((1, float("nan"), 1.0, 1.0), False),
    ((2, 1.7e308, 1e308, 1e308), False),
    ((1, 2e15, 2e15, 2e15), False),
    ((0, 0.0, 0.0, 0.0), False),
    ((1, 1.0, 2.0, 1.0), False),
])
def test_partial_bounds(partial: tuple, ok: bool) -> None:
    assert partial_in_bounds(*partial) is ok
