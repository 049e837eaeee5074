"""The bridge while its database is gone (a PRIVATE PostgreSQL, stopped and restarted here).

- Under steady load, PostgreSQL stopped for EDGE_TEST_DB_OUTAGE_SECONDS (15 in
  CI; 60 run by hand, see README): the bridge does not crash, acks nothing,
  and once the database is back every published message is enqueued exactly
  once (counted by event id).
- 10 MiB camera frames queued behind the stopped database: the bridge's RSS
  stays bounded (EDGE_BRIDGE_INBOX_MAX_BYTES), the rest waits in the broker.

No ingest worker runs: the queue rows stay, and are what is counted.
"""

import base64
import os
import random
import threading
import time
import uuid
from datetime import datetime, timezone

import psutil

from models.settings import Settings
from tests.e2e.conftest import Pipeline
from tests.support.corpus import media_payload, telemetry_payload, topic
from tests.support.processes import QUEUED_EVENT_IDS, scalar, wait_until
from tests.support.publisher import PacedPublisher, publish_all

OUTAGE_SECONDS = float(os.environ.get("EDGE_TEST_DB_OUTAGE_SECONDS", "15"))
RATE = 200  # messages/s, before, during and after the outage
QUEUED_EVENTS = ("SELECT coalesce(sum(json_array_length(message->'args'->0)), 0) "
                 "FROM dramatiq.queue WHERE queue_name = 'ingest'")


def test_database_stopped_under_load_no_crash_no_loss(private_pg, mqtt_broker, tmp_path):
    url = private_pg["service"].url
    p = Pipeline(url, mqtt_broker.url, tmp_path)
    try:
        bridge = p.bridge()
        now = datetime.now(timezone.utc)
        n = int(RATE * (OUTAGE_SECONDS + 8))
        publisher = PacedPublisher(mqtt_broker.url, [
            (topic("telemetry", device_id=f"dev-{i % 20}"),
             telemetry_payload(uuid.uuid4(), now, [{"metric_type": "seq", "metric_value": float(i), "unit": "n"}]))
            for i in range(n)], RATE)
        publisher.start()
        wait_until(lambda: scalar(url, QUEUED_EVENTS) > 0, 30, "flow before the outage")

        private_pg["service"].stop()  # PostgreSQL is gone
        time.sleep(OUTAGE_SECONDS)
        assert bridge.alive(), "the bridge died during the outage"
        private_pg["service"] = private_pg["restart"]()  # accepts connections now
        back = time.monotonic()
        before = scalar(url, QUEUED_EVENTS)
        wait_until(lambda: scalar(url, QUEUED_EVENTS) > before, 60, "flow after the outage", interval=0.05)
        resumed = time.monotonic() - back

        publisher.finish()
        wait_until(lambda: scalar(url, QUEUED_EVENT_IDS) == n, 120, f"all {n} events enqueued")
        print(f"outage {OUTAGE_SECONDS:.0f}s, {n} messages, flow resumed {resumed:.2f}s after the "
              f"database accepted connections, events enqueued {scalar(url, QUEUED_EVENTS)}")
        assert bridge.alive()
        log = bridge.log()
        assert "event=db_unavailable" in log and "event=db_available" in log
        assert "Traceback" not in log
        # Nothing was acked before its commit: every event is there; copies only
        # from redelivery of batches committed but not acked (dedupe drops them).
        assert scalar(url, QUEUED_EVENT_IDS) == n
    finally:
        p.stop_all()


def test_inbox_bytes_bounded_with_10mib_frames_behind_a_stopped_database(private_pg, mqtt_broker, tmp_path):
    url = private_pg["service"].url
    inbox_max = Settings().bridge_inbox_max_bytes  # the default
    p = Pipeline(url, mqtt_broker.url, tmp_path)
    try:
        bridge = p.bridge()
        baseline = psutil.Process(bridge.pid).memory_info().rss
        private_pg["service"].stop()
        frames = 12  # ~168 MB of payload: far more than a 256 MiB pod could hold
        rng = random.Random(7)
        frame = rng.randbytes(10 * 1024 * 1024 - 1024)  # not an image: each becomes a bad_image dead letter
        now = datetime.now(timezone.utc)
        payloads = [(topic("media"), media_payload(uuid.uuid4(), now, b"", image_b64=base64.b64encode(frame).decode()))
                    for _ in range(frames)]
        peak = [baseline]
        sampling = threading.Event()

        def sample() -> None:
            proc = psutil.Process(bridge.pid)
            while not sampling.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        publish_all(mqtt_broker.url, payloads, timeout=120)
        time.sleep(5)  # the bridge takes what its bound allows, then holds
        held_peak = peak[0]
        private_pg["service"] = private_pg["restart"]()
        wait_until(lambda: scalar(url, "SELECT count(*) FROM ingress_dead_letters") == frames, 180,
                   "every frame dead-lettered after the outage")
        sampling.set()
        sampler.join()
        mib = 1024 * 1024
        print(f"bridge RSS: baseline {baseline / mib:.0f} MiB, peak while the database was down "
              f"{held_peak / mib:.0f} MiB, peak overall {peak[0] / mib:.0f} MiB; "
              f"{frames} frames of {len(payloads[0][1]) / mib:.1f} MiB published")
        assert bridge.alive()
        # The bound, the frame that crossed it (held in paho's read buffers, ~3
        # copies) and the frame being parsed: far under the 168 MB published.
        assert held_peak - baseline < inbox_max + 6 * len(payloads[0][1])
        assert peak[0] < 256 * mib
        assert scalar(url, "SELECT count(*) FROM ingress_dead_letters WHERE reason = 'bad_image' "
                           "AND payload_size_bytes = %s", (len(payloads[0][1]),)) == frames
    finally:
        p.stop_all()


def test_held_network_thread_keeps_the_session_past_the_keepalive(private_pg, mqtt_broker, tmp_path):
    """Backpressure holds paho's thread far longer than the broker's keepalive
    timeout (1.5 x 5 s): the bridge pings from the held callback, so the broker
    keeps the connection, and everything arrives once the database is back."""
    url = private_pg["service"].url
    p = Pipeline(url, mqtt_broker.url, tmp_path, EDGE_BRIDGE_INBOX_MAX_BYTES=str(1024 * 1024),
                 EDGE_MQTT_KEEPALIVE_SECONDS="5")
    try:
        bridge = p.bridge()
        private_pg["service"].stop()
        now = datetime.now(timezone.utc)
        frames = [(topic("media"), media_payload(uuid.uuid4(), now, b"", image_b64="A" * 600_000))
                  for _ in range(8)]
        publish_all(mqtt_broker.url, frames)
        time.sleep(20)  # held: the inbox is over 1 MiB and nothing can commit
        private_pg["service"] = private_pg["restart"]()
        # Distinct frames (by their first bytes, which hold the event id): a frame
        # redelivered after a reconnect is dead-lettered again.
        wait_until(lambda: scalar(url, "SELECT count(DISTINCT substring(payload FROM 1 FOR 64)) "
                                       "FROM ingress_dead_letters") == len(frames), 120,
                   "every frame dead-lettered")
        log = bridge.log()
        assert "event=mqtt_disconnected" not in log, log[-2000:]
        assert log.count("event=mqtt_connected") == 1
        assert bridge.alive()
    finally:
        p.stop_all()


def test_nothing_is_acked_while_the_database_is_down(private_pg, mqtt_broker, tmp_path):
    """Kill -9 the bridge in the middle of the outage: had it acked anything it had
    not committed, the broker would have forgotten it and a new bridge could not get it."""
    url = private_pg["service"].url
    p = Pipeline(url, mqtt_broker.url, tmp_path)
    try:
        first = p.bridge("bridge-1")
        private_pg["service"].stop()
        now = datetime.now(timezone.utc)
        n = 300
        publish_all(mqtt_broker.url, [
            (topic("telemetry"), telemetry_payload(uuid.uuid4(), now, [("seq", float(i), "n")])) for i in range(n)])
        wait_until(lambda: "event=db_unavailable" in first.log(), 30, "the bridge to hit the outage")
        time.sleep(3)
        first.kill9()
        private_pg["service"] = private_pg["restart"]()
        p.bridge("bridge-2")  # same client id: the persistent session
        wait_until(lambda: scalar(url, QUEUED_EVENT_IDS) == n, 60, f"all {n} events enqueued")
    finally:
        p.stop_all()
