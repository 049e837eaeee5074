"""The README's run command with nothing configured, and the bridge on MQTT 3.1.1."""

import os
import re
import signal
import subprocess
import sys
import uuid
from datetime import datetime, timezone

from tests.support.corpus import telemetry_payload, topic
from tests.support.processes import queue_idle, scalar, wait_until
from workers.processes import ROOT
from tests.support.publisher import publish_all


def test_up_runs_everything_embedded_with_simulated_devices(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env.update(EDGE_METRICS_PORT="0", EDGE_BRIDGE_HEARTBEAT_PATH=str(tmp_path / "heartbeat"))
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "workers.cli", "up", "--state-dir", str(tmp_path)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_until(lambda: "event=embedded_postgres" in log_path.read_text(), 30, "embedded PostgreSQL")
        db_url = re.search(r"event=embedded_postgres url=(\S+)", log_path.read_text()).group(1)
        wait_until(lambda: scalar(db_url, "SELECT to_regclass('telemetry_agg') IS NOT NULL"), 30, "migrations")
        wait_until(lambda: scalar(db_url, "SELECT count(*) FROM telemetry_agg WHERE \"window\" = '1m'") > 0,
                   60, "simulated telemetry to be ingested and aggregated")
        assert scalar(db_url, "SELECT count(*) FROM telemetry_raw") > 0
        assert scalar(db_url, "SELECT count(*) FROM weight_sessions") == 2  # the scale's, the camera's
        # The camera's frames: stored by the media pool, weighed by the inference pool.
        wait_until(lambda: scalar(db_url, "SELECT count(*) FROM inference_results") > 0, 90,
                   "simulated frames to be stored and weighed")
        # No EDGE_CLOUD_URL: the outbox forwards to the reference cloud sink.
        wait_until(lambda: scalar(db_url, "SELECT count(*) FROM sync_outbox WHERE status = 'acked'") > 0,
                   60, "outbox events acked by the reference cloud sink")
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        code = up.wait(60)
    assert code == 0, log_path.read_text()[-3000:]
    # Every child (bridge, workers, scheduler, simulator, brokers) is gone with it.
    leftovers = subprocess.run(["pgrep", "-g", str(up.pid)], capture_output=True, text=True).stdout
    assert leftovers.strip() == ""


def test_bridge_on_mqtt_311_keeps_its_persistent_session(pipeline, db_url):
    p = pipeline(EDGE_MQTT_PROTOCOL="3.1.1")
    bridge = p.bridge()
    p.worker()
    assert bridge.stop() == 0  # subscribed once, then gone: the broker queues for it
    now = datetime.now(timezone.utc)
    publish_all(p.env["EDGE_MQTT_URL"], [
        (topic("telemetry", device_id="dev-311"),
         telemetry_payload(uuid.uuid4(), now, [{"metric_type": "t", "metric_value": i, "unit": "C"}]))
        for i in range(200)])
    p.bridge()
    wait_until(lambda: scalar(db_url, "SELECT count(*) FROM ingress_dedupe") == 200 and queue_idle(db_url),
               60, "messages queued while the bridge was down")
    assert scalar(db_url, "SELECT count(*) FROM telemetry_raw") == 200
