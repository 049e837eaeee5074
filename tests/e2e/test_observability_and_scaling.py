"""Metrics as Prometheus scrapes them, and bridges scaled out with a shared subscription."""

import re
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone

from tests.support.corpus import telemetry_payload, topic
from tests.support.processes import queue_idle, scalar, wait_until
from tests.support.publisher import publish_all
from workers.dev.embedded import free_port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def telemetry(n: int, device: str = "dev-1") -> list[tuple[str, bytes]]:
    now = datetime.now(timezone.utc) - timedelta(minutes=2)  # closed 1m buckets, sooner
    return [(topic("telemetry", device_id=device),
             telemetry_payload(uuid.uuid4(), now + timedelta(milliseconds=i),
                               [{"metric_type": "t", "metric_value": i, "unit": "C"}]))
            for i in range(n)]


def test_metrics_of_bridge_and_workers(pipeline, db_url):
    bridge_port, ingest_port, aggregate_port = free_port(), free_port(), free_port()
    p = pipeline()
    p.bridge(EDGE_METRICS_PORT=str(bridge_port))
    p.worker("ingest", EDGE_METRICS_PORT=str(ingest_port))
    p.worker("aggregate", EDGE_METRICS_PORT=str(aggregate_port))
    p.start("scheduler", ["scheduler"])
    messages = telemetry(50)
    bad = [(topic("telemetry"), b"not json"), (topic("telemetry", device_id="bad id"), b"{}")]
    publish_all(p.env["EDGE_MQTT_URL"], messages + messages[:10] + bad)
    wait_until(lambda: scalar(db_url, "SELECT count(*) FROM telemetry_agg WHERE \"window\" = '1m'") > 0
               and queue_idle(db_url), 60, "ingest and aggregation")

    bridge = scrape(bridge_port)
    assert sample(bridge, "farmiq_edge_ingress_rejected_total", reason="invalid_json") == 1
    assert sample(bridge, "farmiq_edge_ingress_rejected_total", reason="bad_id") == 1
    assert sample(bridge, "farmiq_edge_bridge_batches_total") >= 1

    wait_until(lambda: sample(scrape(ingest_port), "farmiq_edge_ingress_accepted_total") == 50, 20,
               "the ingest worker's counters")
    ingest = scrape(ingest_port)
    assert sample(ingest, "farmiq_edge_ingress_duplicates_total", kind="telemetry") == 10
    assert sample(ingest, "dramatiq_messages_total", queue_name="ingest") >= 1

    aggregate = scrape(aggregate_port)
    assert sample(aggregate, "farmiq_edge_aggregation_buckets_written_total", window="1m") >= 1
    assert "farmiq_edge_aggregation_lag_seconds" in aggregate


def test_two_bridges_share_the_load_with_a_shared_subscription(pipeline, db_url):
    p = pipeline(EDGE_MQTT_SHARED_GROUP="edge", EDGE_BATCH_MAX_MESSAGES="20")
    ports = {"bridge-a": free_port(), "bridge-b": free_port()}
    bridges = [p.bridge(name, EDGE_MQTT_CLIENT_ID=name, EDGE_METRICS_PORT=str(port))
               for name, port in ports.items()]
    p.worker()
    devices = [telemetry(100, device=f"dev-{d}") for d in range(4)]
    publish_all(p.env["EDGE_MQTT_URL"], [m for batch in devices for m in batch])
    wait_until(lambda: scalar(db_url, "SELECT count(*) FROM ingress_dedupe") == 400 and queue_idle(db_url),
               60, "400 events through two bridges")
    assert scalar(db_url, "SELECT count(*) FROM telemetry_raw") == 400
    # Each bridge took a share of the subscription's messages.
    for port in ports.values():
        assert sample(scrape(port), "farmiq_edge_bridge_batches_total") >= 1
    assert all(b.proc.poll() is None for b in bridges)
