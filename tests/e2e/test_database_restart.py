"""PostgreSQL restarted under load: ingest flows again at once, nothing is lost,
and no error-level line is logged (a PRIVATE PostgreSQL, restarted here).

The bridge retries its commit (backoff capped at 1 s), the queue consumer
reconnects in place (actors/queue_consumer.py), and an actor whose
transaction lost the database waits for it and retries at once
(actors/database_outage.py).
"""

import re
import time
import uuid
from datetime import datetime, timezone

from tests.e2e.conftest import Pipeline
from tests.support.corpus import telemetry_payload, topic
from tests.support.processes import scalar, wait_until
from tests.support.publisher import PacedPublisher

RATE = 300  # messages/s
SECONDS = 16
ERROR_LINE = re.compile(r"\[(ERROR|CRITICAL)\]|level=(ERROR|CRITICAL)")


def test_postgresql_restart_under_load(private_pg, mqtt_broker, tmp_path):
    url = private_pg["service"].url
    p = Pipeline(url, mqtt_broker.url, tmp_path)
    try:
        bridge = p.bridge()
        worker = p.worker()
        now = datetime.now(timezone.utc)
        n = RATE * SECONDS
        publisher = PacedPublisher(mqtt_broker.url, [
            (topic("telemetry", device_id=f"dev-{i % 20}"),
             telemetry_payload(uuid.uuid4(), now, [{"metric_type": "seq", "metric_value": float(i), "unit": "n"}]))
            for i in range(n)], RATE)
        publisher.start()
        wait_until(lambda: scalar(url, "SELECT count(*) FROM telemetry_raw") > 500, 60, "flow before the restart")

        private_pg["service"].stop()
        time.sleep(2)
        private_pg["service"] = private_pg["restart"]()  # accepts connections from here
        up_at = scalar(url, "SELECT now()")
        wait_until(lambda: scalar(url, "SELECT count(*) FROM telemetry_raw WHERE ingested_at > %s", (up_at,)) > 0,
                   30, "ingest after the restart", interval=0.05)
        first = scalar(url, "SELECT min(ingested_at) FROM telemetry_raw WHERE ingested_at > %s", (up_at,))
        flowing_after = (first - up_at).total_seconds()

        publisher.finish()
        wait_until(lambda: scalar(url, "SELECT count(*) FROM ingress_dedupe") == n, 120, f"all {n} events")
        print(f"ingest committed again {flowing_after:.2f}s after PostgreSQL accepted connections")
        assert scalar(url, "SELECT count(*) FROM telemetry_raw") == n  # once each
        assert bridge.alive() and worker.alive()
        for proc in (bridge, worker):
            errors = [line for line in proc.log().splitlines() if ERROR_LINE.search(line)]
            assert errors == [], f"{proc.name} logged errors:\n" + "\n".join(errors[:5])
        assert "event=queue_reconnected" in worker.log()
    finally:
        p.stop_all()
