"""Where tests find PostgreSQL and MQTT. Never a silent skip.

In order: what the environment names (`EDGE_DATABASE_URL`, `EDGE_MQTT_URL`),
then the system service on its standard port, then an embedded one started
here and kept until the test process exits. Tests that burst use
`burst_mqtt()`: the system Mosquitto runs the stock config, which silently
drops messages past 1,000 queued per client.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import tempfile
from pathlib import Path


from schema.databases import database_answers
from workers.dev.embedded import (MOSQUITTO, EmbeddedService, start_mosquitto, start_mqtt,
                              start_postgres)

MOSQUITTO_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"
SYSTEM_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SYSTEM_MQTT = ("127.0.0.1", 1883)


@functools.cache
def database_admin_url() -> str:
    """A superuser URL for creating test databases."""
    if url := os.environ.get("EDGE_DATABASE_URL"):
        return url
    if database_answers(SYSTEM_DATABASE_URL):
        return SYSTEM_DATABASE_URL
    service = start_postgres(_temp_dir("pg") / "pgdata")
    atexit.register(service.stop)
    print(f"tests: no PostgreSQL at {SYSTEM_DATABASE_URL}; started embedded {service.url}")
    return service.url


@functools.cache
def mqtt_url() -> str:
    """An MQTT broker for tests that do not burst (any broker will do)."""
    if url := os.environ.get("EDGE_MQTT_URL"):
        return url
    if _mqtt_answers(*SYSTEM_MQTT):
        return "mqtt://{}:{}".format(*SYSTEM_MQTT)
    service = start_mqtt()
    print(f"tests: no MQTT broker on {SYSTEM_MQTT[0]}:{SYSTEM_MQTT[1]}; started amqtt {service.url}")
    return service.url


def burst_mqtt() -> EmbeddedService:
    """A private Mosquitto with the project's config on a free port; the caller stops it."""
    if not MOSQUITTO.exists():
        print(f"tests: {MOSQUITTO} missing; bursting against amqtt (MQTT 3.1.1 only, no persistence)")
        return start_mqtt()
    return start_mosquitto(MOSQUITTO_CONFIG, _temp_dir("mosquitto"))


def _temp_dir(what: str) -> Path:
    # Removed at exit; atexit runs last-registered first, so after the service stops.
    path = Path(tempfile.mkdtemp(prefix=f"farmiq-test-{what}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _mqtt_answers(host: str, port: int) -> bool:
    """True if an MQTT 3.1.1 CONNECT at host:port gets an accepting CONNACK within 2 s."""
    client_id = f"farmiq-probe-{os.getpid()}".encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(client_id).to_bytes(2, "big") + client_id
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(bytes([0x10, len(body)]) + body)
            connack = sock.recv(4)
            sock.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        return False
    return connack == b"\x20\x02\x00\x00"
