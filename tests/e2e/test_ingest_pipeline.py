"""SPEC §1–§2 end to end: real Mosquitto, real bridge and worker processes, real PostgreSQL."""

import json
import random
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import psycopg2

from tests.support.corpus import invalid_cases, session_payload, telemetry_payload, topic
from tests.support.processes import queue_idle, scalar, wait_until
from tests.support.publisher import publish_all

MEDIA_MAX = 64 * 1024


def deliverable_invalid_cases(now: datetime) -> list[tuple[str, bytes, str]]:
    """Invalid messages a device can actually publish under the bridge's `farmiq/#`."""
    return [(t, p, r) for t, p, r in invalid_cases(now, media_max_bytes=MEDIA_MAX)
            if t.startswith("farmiq/") and "+" not in t and "#" not in t
            and not any(ord(c) < 32 for c in t)]


def telemetry_messages(devices: int, per_device: int, now: datetime) -> list[tuple[str, bytes]]:
    messages = []
    for d in range(devices):
        for i in range(per_device):
            occurred = now - timedelta(seconds=per_device - i)
            readings = [{"metric_type": "temperature", "metric_value": 20 + i % 7, "unit": "C"},
                        {"metric_type": "humidity", "metric_value": 50.5 + d, "unit": "%"}]
            messages.append((topic("telemetry", device_id=f"dev-{d:02d}"),
                             telemetry_payload(uuid.uuid4(), occurred, readings)))
    return messages


def table_counts(db_url: str) -> dict[str, int]:
    tables = ["telemetry_raw", "ingress_dedupe", "sync_outbox", "ingress_dead_letters", "weight_sessions",
              "media_objects", "inference_results", "telemetry_agg"]
    return {t: scalar(db_url, f"SELECT count(*) FROM {t}") for t in tables}


def test_burst_with_redeliveries_and_invalid_messages(pipeline, db_url):
    p = pipeline(EDGE_SYNC_TELEMETRY="raw", EDGE_MEDIA_MAX_BYTES=str(MEDIA_MAX))
    p.bridge()
    p.worker()
    now = datetime.now(timezone.utc)
    valid = telemetry_messages(devices=20, per_device=100, now=now)
    cases = deliverable_invalid_cases(now)
    invalid = [cases[i % len(cases)] for i in range(200)]
    stream = valid * 3 + [(t, pl) for t, pl, _ in invalid]
    random.Random(7).shuffle(stream)

    publish_all(p.env["EDGE_MQTT_URL"], stream)
    wait_until(lambda: scalar(db_url, "SELECT count(*) FROM ingress_dedupe") == 2_000
               and scalar(db_url, "SELECT count(*) FROM ingress_dead_letters") == 200
               and queue_idle(db_url), 90, "2,000 events and 200 dead letters")

    counts = table_counts(db_url)
    assert counts == {"telemetry_raw": 4_000, "ingress_dedupe": 2_000, "sync_outbox": 2_000,
                      "ingress_dead_letters": 200, "weight_sessions": 0, "media_objects": 0,
                      "inference_results": 0, "telemetry_agg": 0}
    assert scalar(db_url, "SELECT count(DISTINCT payload_json->>'source_event_id') FROM sync_outbox "
                          "WHERE event_type = 'telemetry.ingested'") == 2_000
    conn = psycopg2.connect(db_url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT topic, reason FROM ingress_dead_letters")
        stored = Counter(cur.fetchall())
    conn.close()
    assert stored == Counter((t, r) for t, _, r in invalid)
    assert {r for _, r in stored} >= {"bad_topic", "bad_id", "invalid_json", "schema", "clock_skew",
                                      "too_large", "bad_image"}
    # Nothing was rejected inside the pipeline either.
    assert scalar(db_url, "SELECT count(*) FROM dramatiq.queue") == 0  # acked messages are deleted


def test_session_lifecycle_out_of_order_and_repeated(pipeline, db_url):
    p = pipeline()
    p.bridge()
    p.worker()
    session = uuid.uuid4()
    t0 = datetime.now(timezone.utc) - timedelta(minutes=10)
    t = lambda minutes: t0 + timedelta(minutes=minutes)  # noqa: E731
    scale = topic("session", device_id="scale-01")
    # Arrival order: finalize before start, a later duplicate finalize, a cancel after finalize.
    arrivals = [
        session_payload(uuid.uuid4(), t(5), session, "finalize", weight_kg=2.31),
        session_payload(uuid.uuid4(), t(0), session, "start", batch_id="batch-7", weight_kg=1.90),
        session_payload(uuid.uuid4(), t(6), session, "finalize", weight_kg=2.40),
        session_payload(uuid.uuid4(), t(8), session, "cancel"),
    ]
    for n, payload in enumerate(arrivals, start=1):
        publish_all(p.env["EDGE_MQTT_URL"], [(scale, payload), (scale, payload)])  # and a redelivery
        wait_until(lambda: scalar(db_url, "SELECT count(*) FROM ingress_dedupe") == n
                   and queue_idle(db_url), 30, f"session event {n}")

    conn = psycopg2.connect(db_url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT status, start_at, end_at, initial_weight_kg, final_weight_kg, batch_id, "
                    "device_id FROM weight_sessions WHERE id = %s", (str(session),))
        row = cur.fetchone()
        cur.execute("SELECT event_type, payload_json FROM sync_outbox ORDER BY created_at, occurred_at")
        outbox = cur.fetchall()
    conn.close()
    assert row == ("finalized", t(0), t(5), 1.90, 2.31, "batch-7", "scale-01")
    # One event per state change: the finalize, then the start; the later
    # finalize and the cancel changed nothing.
    assert [e for e, _ in outbox] == ["weighvision.session.finalized", "weighvision.session.created"]
    assert outbox[-1][1]["status"] == "finalized" and outbox[-1][1]["start_at"] is not None
    assert json.dumps(outbox[0][1])  # payloads are JSON documents
