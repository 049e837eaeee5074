"""The bridge over mqtts:// with a password, against a private Mosquitto that requires both.

The broker gets a password file (mosquitto_passwd) and a certificate signed by
a CA made here (openssl CLI); the bridge trusts that CA through
EDGE_MQTT_CA_FILE and authenticates with the credentials in EDGE_MQTT_URL.
"""

import shutil
import ssl
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from models.settings import load_settings
from tests.support.corpus import telemetry_payload, topic
from tests.support.processes import QUEUED_EVENT_IDS, scalar, wait_until
from workers.bridge import Bridge
from workers.dev.embedded import start_mosquitto

USER, PASSWORD = "farmiq-bridge", "s3cret:with@odd/chars"


def _run(*argv: str, cwd: Path) -> None:
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """ca.crt, and server.crt/server.key for IP 127.0.0.1 signed by it (EC P-256, 1 day)."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _run("openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
         "-subj", "/CN=farmiq-test-ca", cwd=d)
    _run("openssl", "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.ext", cwd=d)


@pytest.fixture
def secure_broker() -> Iterator:
    d = Path(tempfile.mkdtemp(prefix="farmiq-test-tls-"))
    try:
        make_pki(d)
        _run("mosquitto_passwd", "-b", "-c", str(d / "passwd"), USER, PASSWORD, cwd=d)
        (d / "mosquitto.conf").write_text("listener 8883\npersistence false\n")
        broker = start_mosquitto(d / "mosquitto.conf", d / "data", settings={
            "allow_anonymous": "false", "password_file": str(d / "passwd"),
            "certfile": str(d / "server.crt"), "keyfile": str(d / "server.key")})
        yield broker, d
        broker.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def connack(port: int, *, tls_ca: Path | None, username: str | None, password: str | None) -> str:
    """The broker's answer to a CONNECT: 'Success', a refusal reason, or 'no connection'."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    if tls_ca is not None:
        client.tls_set(ca_certs=str(tls_ca))
    if username is not None:
        client.username_pw_set(username, password)
    answer: list[str] = []
    done = threading.Event()

    def on_connect(c, u, flags, reason_code, props) -> None:
        answer.append(str(reason_code))
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *a: done.set()
    try:
        client.connect("127.0.0.1", port)
    except (OSError, ssl.SSLError):
        return "no connection"
    client.loop_start()
    done.wait(10)
    client.disconnect()
    client.loop_stop()
    return answer[0] if answer else "no connection"


def test_bridge_connects_with_tls_and_password(db_url, secure_broker, tmp_path):
    broker, d = secure_broker
    quoted = PASSWORD.replace(":", "%3A").replace("@", "%40").replace("/", "%2F")
    settings = load_settings(database_url=db_url, mqtt_url=f"mqtts://{USER}:{quoted}@127.0.0.1:{broker.port}",
                             mqtt_ca_file=str(d / "ca.crt"), metrics_port=0, batch_max_ms=10,
                             mqtt_client_id=f"tls-{tmp_path.name}"[:64],
                             bridge_heartbeat_path=str(tmp_path / "heartbeat"))
    bridge = Bridge(settings)
    runner = threading.Thread(target=bridge.run, daemon=True)
    runner.start()
    try:
        wait_until(bridge.mqtt_alive, 20, "the bridge to connect over TLS")
        # A device with its own credentials over TLS.
        device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="device-1", protocol=mqtt.MQTTv5)
        device.tls_set(ca_certs=str(d / "ca.crt"))
        device.username_pw_set(USER, PASSWORD)
        device.connect("127.0.0.1", broker.port)
        device.loop_start()
        info = device.publish(topic("telemetry"), telemetry_payload(
            uuid.uuid4(), datetime.now(timezone.utc), [("t", 1.0, "C")]), qos=1)
        info.wait_for_publish(10)
        device.disconnect()
        device.loop_stop()
        wait_until(lambda: scalar(db_url, QUEUED_EVENT_IDS) == 1, 30, "the message enqueued")
        wait_until(lambda: (tmp_path / "heartbeat").exists(), 10, "the heartbeat")
    finally:
        bridge.stop()
        runner.join(30)

    # The broker really requires both.
    assert connack(broker.port, tls_ca=d / "ca.crt", username=USER, password=PASSWORD) == "Success"
    assert connack(broker.port, tls_ca=d / "ca.crt", username=USER, password="wrong") != "Success"
    assert connack(broker.port, tls_ca=d / "ca.crt", username=None, password=None) != "Success"
    assert connack(broker.port, tls_ca=None, username=USER, password=PASSWORD) == "no connection"
