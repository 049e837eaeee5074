"""The bridge against a scripted broker: what Mosquitto will not send on demand.

- A topic that is not UTF-8 (Mosquitto refuses it from the publisher; other
  brokers pass it on): dead-lettered as bad_topic, and paho's network thread
  keeps running (an exception in its callback would end it).
- A reconnect with session_present=0 that reuses a packet id for another
  message: the PUBACK for that id goes out only once the NEW message is
  committed, never for the old one (MQTT 3.1.1 here; the check is the same for 5).
"""

import queue
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import psycopg2
import pytest

import workers.bridge as bridge_module
from models.settings import load_settings
from tests.support.corpus import telemetry_payload, topic
from tests.support.fake_broker import FakeBroker
from tests.support.processes import QUEUED_EVENT_IDS, scalar, wait_until
from workers.bridge import Bridge



def telemetry(value: float) -> bytes:
    return telemetry_payload(uuid.uuid4(), datetime.now(timezone.utc),
                             [{"metric_type": "t", "metric_value": value, "unit": "C"}])


@pytest.fixture
def fake_broker() -> Iterator[FakeBroker]:
    broker = FakeBroker()
    yield broker
    broker.close()


@pytest.fixture
def run_bridge(db_url: str, fake_broker: FakeBroker, tmp_path: Path) -> Iterator:
    started: list[tuple[Bridge, threading.Thread]] = []

    def start() -> Bridge:
        settings = load_settings(database_url=db_url, mqtt_url=fake_broker.url, mqtt_protocol="3.1.1",
                                 metrics_port=0, batch_max_ms=10, mqtt_client_id=f"t-{tmp_path.name}"[:64],
                                 bridge_heartbeat_path=str(tmp_path / "heartbeat"))
        bridge = Bridge(settings)
        thread = threading.Thread(target=bridge.run, daemon=True)
        thread.start()
        started.append((bridge, thread))
        return bridge

    yield start
    for bridge, thread in started:
        bridge.stop()
        thread.join(30)


def test_topic_that_is_not_utf8_is_dead_lettered_and_the_bridge_keeps_receiving(
        db_url, fake_broker, run_bridge, tmp_path):
    bridge = run_bridge()
    conn = fake_broker.accept()
    bad_topic = b"farmiq/v1/t\xff\xfe/farm-1/barn-1/device-1/telemetry"
    bad_payload = b'{"not": "\xc3\x28 even utf-8"}'
    conn.publish(1, bad_topic, bad_payload)
    conn.publish(2, topic("telemetry").encode(), telemetry(1.0))
    assert {conn.pubacks.get(timeout=30), conn.pubacks.get(timeout=30)} == {1, 2}

    with psycopg2.connect(db_url) as pg, pg.cursor() as cur:
        cur.execute("SELECT topic, reason, payload, payload_size_bytes FROM ingress_dead_letters")
        rows = cur.fetchall()
    pg.close()
    assert [(t, r, bytes(p), n) for t, r, p, n in rows] == [
        (bad_topic.decode("utf-8", "backslashreplace"), "bad_topic", bad_payload, len(bad_payload))]
    assert scalar(db_url, QUEUED_EVENT_IDS) == 1

    # paho's thread survived the callback: more messages flow, the heartbeat beats.
    conn.publish(3, topic("telemetry").encode(), telemetry(2.0))
    assert conn.pubacks.get(timeout=30) == 3
    assert scalar(db_url, QUEUED_EVENT_IDS) == 2
    assert bridge.client._thread.is_alive() and bridge.mqtt_alive()
    wait_until(lambda: (tmp_path / "heartbeat").exists(), 10, "the heartbeat")


def test_ack_never_crosses_a_reconnect_to_a_reused_packet_id(db_url, fake_broker, run_bridge, monkeypatch):
    committed: list[bytes] = []
    in_commit, release = threading.Event(), threading.Event()
    real_commit = bridge_module.commit_batch

    def slow_commit(settings, deliveries):  # the first commit waits until the test says so
        in_commit.set()
        release.wait(60)
        held = real_commit(settings, deliveries)
        committed.extend(d.payload for d in deliveries)
        return held

    monkeypatch.setattr(bridge_module, "commit_batch", slow_commit)
    run_bridge()
    first = fake_broker.accept()
    old, new = telemetry(1.0), telemetry(2.0)
    first.publish(1, topic("telemetry").encode(), old)
    assert in_commit.wait(30)
    first.close()  # the connection drops while packet id 1 is in hand, uncommitted

    # The broker lost the session: packet id 1 now names another message.
    second = fake_broker.accept(session_present=False)
    second.publish(1, topic("telemetry").encode(), new)
    release.set()
    assert second.pubacks.get(timeout=30) == 1
    seen_at_ack = list(committed)
    assert new in seen_at_ack, "PUBACK 1 on the new connection was sent for the old message"
    wait_until(lambda: scalar(db_url, QUEUED_EVENT_IDS) == 2, 30, "both messages committed")
    assert second.pubacks.empty()


FAIL_ENQUEUE = """
    CREATE TABLE test_fail_with (errcode text);
    CREATE FUNCTION test_fail_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE code text;
    BEGIN
        SELECT errcode INTO code FROM test_fail_with;
        IF code IS NOT NULL THEN RAISE EXCEPTION 'failing on purpose' USING ERRCODE = code; END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER fail_enqueue BEFORE INSERT ON dramatiq.queue
        FOR EACH ROW EXECUTE FUNCTION test_fail_enqueue();
"""


@pytest.mark.parametrize("errcode", ["disk_full", "query_canceled", "internal_error"])
def test_every_database_error_is_retried_without_ack_then_flows(db_url, fake_broker, run_bridge, errcode):
    # Raised inside the enqueue, through psycopg2's own cursor: not wrapped by SQLAlchemy.
    with psycopg2.connect(db_url) as pg, pg.cursor() as cur:
        cur.execute(FAIL_ENQUEUE)
        cur.execute("INSERT INTO test_fail_with VALUES (%s)", (errcode,))
    pg.close()
    bridge = run_bridge()
    conn = fake_broker.accept()
    conn.publish(1, topic("telemetry").encode(), telemetry(1.0))
    with pytest.raises(queue.Empty):
        conn.pubacks.get(timeout=3)  # failing: no ack, and the bridge retries (does not die)
    assert bridge.client._thread.is_alive()
    with psycopg2.connect(db_url) as pg, pg.cursor() as cur:
        cur.execute("DELETE FROM test_fail_with")
    pg.close()
    assert conn.pubacks.get(timeout=30) == 1
    assert scalar(db_url, QUEUED_EVENT_IDS) == 1
