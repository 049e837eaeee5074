"""kill -9 on both sides of each commit point: every message ends up in the database exactly once.

The commit points (see workers/bridge.py and actors/ingest.py):
- bridge: one transaction enqueues the batch; PUBACKs are sent only after it.
- ingest: one transaction applies the batch and records its dedupe keys.
"""

import time
import uuid
from datetime import datetime, timedelta, timezone

from tests.support.corpus import telemetry_payload, topic
from tests.support.processes import queue_idle, scalar, wait_until
from tests.support.publisher import publish_all

N = 600


def messages(n: int) -> list[tuple[str, bytes]]:
    now = datetime.now(timezone.utc)
    return [(topic("telemetry", device_id=f"dev-{i % 10}"),
             telemetry_payload(uuid.uuid4(), now - timedelta(milliseconds=i),
                               [{"metric_type": "weight", "metric_value": float(i), "unit": "kg"}]))
            for i in range(n)]


def events_enqueued(db_url: str) -> int:
    """Events carried by the ingest queue messages not yet processed (redeliveries included)."""
    return scalar(db_url, "SELECT coalesce(sum(json_array_length(message->'args'->0)), 0) "
                          "FROM dramatiq.queue WHERE queue_name = 'ingest'")


def assert_exactly_once(db_url: str) -> None:
    wait_until(lambda: scalar(db_url, "SELECT count(*) FROM ingress_dedupe") == N and queue_idle(db_url),
               90, f"{N} events")
    assert scalar(db_url, "SELECT count(*) FROM telemetry_raw") == N
    assert scalar(db_url, "SELECT count(DISTINCT metric_value) FROM telemetry_raw") == N
    assert scalar(db_url, "SELECT count(*) FROM sync_outbox") == N
    assert scalar(db_url, "SELECT count(*) FROM dramatiq.queue") == 0  # acked messages are deleted


def crash_then_restart_bridge(pipeline, crash_at: str) -> int:
    """Crash the bridge at `crash_at`, restart it; return the events it enqueued in all.

    The ingest worker starts only after the count: processed messages leave the queue.
    """
    p = pipeline(EDGE_SYNC_TELEMETRY="raw", EDGE_BATCH_MAX_MESSAGES="100")
    crashing = p.bridge(EDGE_CRASH_AT=crash_at)
    publish_all(p.env["EDGE_MQTT_URL"], messages(N))
    wait_until(lambda: crashing.proc.poll() is not None, 30, "the bridge to crash")
    assert crashing.proc.returncode == -9
    p.bridge()  # same client id: the persistent session redelivers what was not acked
    wait_until(lambda: events_enqueued(pipeline_db(p)) >= N, 60, "every message enqueued")
    time.sleep(1.0)  # nothing more is on its way
    enqueued = events_enqueued(pipeline_db(p))
    p.worker()
    return enqueued


def pipeline_db(p) -> str:
    return p.env["EDGE_DATABASE_URL"]


def test_bridge_killed_after_commit_before_pubacks(pipeline, db_url):
    enqueued = crash_then_restart_bridge(pipeline, "bridge.after_commit")
    assert_exactly_once(db_url)
    # The first batch was committed and then redelivered: dedupe absorbed it.
    assert enqueued > N


def test_bridge_killed_before_commit(pipeline, db_url):
    enqueued = crash_then_restart_bridge(pipeline, "bridge.before_commit")
    assert_exactly_once(db_url)
    # The crashed transaction left nothing behind: each event was enqueued once.
    assert enqueued == N


def test_ingest_worker_killed_mid_batch(pipeline, db_url):
    p = pipeline(EDGE_SYNC_TELEMETRY="raw", EDGE_BATCH_MAX_MESSAGES="100")
    p.bridge()
    crashing = p.worker(EDGE_CRASH_AT="ingest.before_commit")
    publish_all(p.env["EDGE_MQTT_URL"], messages(N))
    # dramatiq's master shuts down when its worker process dies, as a pod would restart.
    wait_until(lambda: crashing.proc.poll() is not None, 60, "the ingest worker to crash")
    assert "exited unexpectedly" in crashing.log()
    assert scalar(db_url, "SELECT count(*) FROM dramatiq.queue WHERE queue_name = 'ingest' "
                          "AND state IN ('queued', 'consumed')") > 0
    p.worker()
    assert_exactly_once(db_url)


def test_broker_restart_bridge_reconnects_and_resumes_its_session(pipeline, mqtt_broker, db_url):
    p = pipeline(EDGE_SYNC_TELEMETRY="raw")
    bridge = p.bridge()
    p.worker()
    batch = messages(N)
    publish_all(p.env["EDGE_MQTT_URL"], batch[: N // 2])
    mqtt_broker.stop()  # SIGTERM: Mosquitto saves its persistent sessions
    mqtt_broker.start()  # same port, same data directory
    publish_all(p.env["EDGE_MQTT_URL"], batch[N // 2:])
    assert_exactly_once(db_url)
    assert bridge.log().count("event=mqtt_connected") >= 2
    assert bridge.proc.poll() is None
