"""Every metric the dashboard (deploy/grafana) and the alert rules
(deploy/prometheus) name is one the running processes export.

The Procfile's processes run for real, each with its own metrics port (as in
a pod): the bridge, an ingest and an aggregate worker (dramatiq's Prometheus
middleware, multiprocess mode), the scheduler (database gauges). Traffic makes
the labelled series exist: a valid message published twice (a duplicate), a
malformed one (a dead letter), and a poison queue message (an actor error,
then a rejected message). Then each /metrics endpoint is scraped.
"""

import itertools
import json
import re
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

import psycopg2
import yaml

from actors.broker import broker
from actors.ingest import ingest_batch
from tests.support.corpus import telemetry_payload, topic
from tests.support.processes import scalar, wait_until
from tests.support.publisher import publish_all
from workers.dev.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\b((?:farmiq_edge|dramatiq)_[A-Za-z0-9_]+)")
NAME_REGEX = re.compile(r'__name__\s*=~\s*"([^"]+)"')


def _expressions() -> list[str]:
    exprs = []
    for rule_file in (ROOT / "deploy/prometheus").glob("*.yaml"):
        for group in (yaml.safe_load(rule_file.read_text()) or {}).get("groups", []):
            exprs += [rule["expr"] for rule in group["rules"]]
    for dashboard in (ROOT / "deploy/grafana").glob("*.json"):
        exprs += re.findall(r'"expr":\s*("(?:[^"\\]|\\.)*")', dashboard.read_text())
        exprs = [json.loads(e) if e.startswith('"') else e for e in exprs]
    return exprs


def deploy_metric_names() -> set[str]:
    """Metric names in the rules and dashboards; `__name__=~"a_(b|c)_total"` gives a_b_total, a_c_total."""
    names = set()
    for expr in _expressions():
        for pattern in NAME_REGEX.findall(expr):
            parts = re.split(r"\(([^()]*)\)", pattern)  # literal, alternatives, literal, ...
            choices = [[p] if i % 2 == 0 else p.split("|") for i, p in enumerate(parts)]
            names |= {"".join(combo) for combo in itertools.product(*choices)}
        names |= set(NAME.findall(NAME_REGEX.sub("", expr)))
    return names


def scrape(port: int) -> set[str]:
    """Metric names (TYPE lines and sample names) a /metrics endpoint shows."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return set()
    names = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_deploy_names_only_metrics_the_processes_export(pipeline, db_url, tmp_path):
    names = deploy_metric_names()
    assert {"farmiq_edge_ingress_accepted_total", "farmiq_edge_ingress_rejected_total",
            "dramatiq_message_errors_total", "farmiq_edge_queue_messages"} <= names

    (tmp_path / "media").mkdir()
    p = pipeline()
    ports = {name: free_port() for name in ("bridge", "ingest", "aggregate", "scheduler")}
    p.bridge(EDGE_METRICS_PORT=str(ports["bridge"]))
    p.worker("ingest", EDGE_METRICS_PORT=str(ports["ingest"]))
    p.worker("aggregate", EDGE_METRICS_PORT=str(ports["aggregate"]))
    p.start("scheduler", ["scheduler"], EDGE_METRICS_PORT=str(ports["scheduler"]))

    now = datetime.now(timezone.utc)
    valid = (topic("telemetry", device_id="dev-metrics"),
             telemetry_payload(uuid.uuid4(), now, [{"metric_type": "t", "metric_value": 1.5, "unit": "C"}]))
    publish_all(p.env["EDGE_MQTT_URL"], [valid, valid, (topic("telemetry"), b"not json")])
    conn = psycopg2.connect(db_url)
    try:
        with conn, conn.cursor() as cursor:  # a poison message: PermanentError, rejected at once
            broker.enqueue_in(cursor, ingest_batch.message([{"not": "an event"}]))
    finally:
        conn.close()
    wait_until(lambda: scalar(db_url, "SELECT count(*) FROM ingress_dedupe") == 1
               and scalar(db_url, "SELECT count(*) FROM ingress_dead_letters") == 1
               and scalar(db_url, "SELECT count(*) FROM dramatiq.queue WHERE state = 'rejected'") == 1
               and scalar(db_url, "SELECT count(*) FROM telemetry_agg") > 0, 90, "traffic to be processed")

    exported: set[str] = set()

    def all_exported() -> bool:
        exported.clear()
        for port in ports.values():
            exported.update(scrape(port))
        return names <= exported
    try:
        wait_until(all_exported, 60, "every metric deploy/ names", interval=1)
    except AssertionError:
        raise AssertionError(f"named in deploy/ but not exported: {sorted(names - exported)}") from None
