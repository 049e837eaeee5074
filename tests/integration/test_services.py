"""The services tests stand on: embedded PostgreSQL, private Mosquitto, amqtt."""

from __future__ import annotations

import queue
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg2
import pytest
import sqlalchemy as sa
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.services import MOSQUITTO_CONFIG, database_admin_url
from workers.dev.embedded import BrokerProcess, start_mosquitto, start_mqtt, start_postgres



def select_one_psycopg2(url: str) -> int:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def pg_data_dir() -> Iterator[Path]:
    # Not under tmp_path: as root, pgserver runs PostgreSQL as user `pgserver`,
    # which must traverse every parent; each pytest start re-tightens
    # /tmp/pytest-of-root to 0700, breaking a concurrent run's initdb.
    parent = Path(tempfile.mkdtemp(prefix="farmiq-test-pg-"))
    yield parent / "pgdata"
    shutil.rmtree(parent, ignore_errors=True)


def test_embedded_postgres_answers_psycopg2_and_sqlalchemy_and_survives_a_rerun(pg_data_dir: Path) -> None:
    with start_postgres(pg_data_dir) as pg:
        assert pg.url.startswith("postgresql://")
        assert select_one_psycopg2(pg.url) == 1
        # SQLAlchemy 2.1 maps bare postgresql:// to psycopg 3: name the driver.
        engine = sa.create_engine(pg.url.replace("postgresql://", "postgresql+psycopg2://", 1))
        try:
            with engine.begin() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar() == 1
                conn.execute(sa.text("CREATE TABLE kept (id int)"))
                conn.execute(sa.text("INSERT INTO kept VALUES (7)"))
        finally:
            engine.dispose()

    with start_postgres(pg_data_dir) as pg:   # same data_dir: no initdb, data kept
        conn = psycopg2.connect(pg.url)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT id FROM kept")
                assert cur.fetchall() == [(7,)]
        finally:
            conn.close()


def test_database_admin_url_answers() -> None:
    assert select_one_psycopg2(database_admin_url()) == 1


class Client:
    """A paho client on its own network thread; received payloads land in `.received`.

    Each connect() builds a fresh paho client: paho 2.2 leaks its wake-up socket
    pair when one client object is started twice (ResourceWarning).
    """

    def __init__(self, broker: BrokerProcess, client_id: str, *, v5: bool = True,
                 persistent: bool = False) -> None:
        self.received: queue.Queue[bytes] = queue.Queue()
        self.broker, self.client_id, self.v5, self.persistent = broker, client_id, v5, persistent

    def connect(self) -> Client:
        protocol = mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311
        self.mqtt = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                protocol=protocol, clean_session=None if self.v5 else not self.persistent)
        self.mqtt.on_message = lambda _c, _u, msg: self.received.put(msg.payload)
        connected = queue.Queue[object]()
        self.mqtt.on_connect = lambda _c, _u, _f, reason, _p: connected.put(reason)
        v5_options: dict[str, Any] = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600 if self.persistent else 0
            v5_options = {"clean_start": not self.persistent, "properties": props}
        # connect_async + loop_start, not connect(): the latter leaks a socket pair too.
        self.mqtt.connect_async("127.0.0.1", self.broker.port, keepalive=30, **v5_options)
        self.mqtt.loop_start()
        reason = connected.get(timeout=5)
        assert not getattr(reason, "is_failure", False), reason
        return self

    def subscribe(self, topic: str) -> None:
        subscribed = queue.Queue[int]()
        self.mqtt.on_subscribe = lambda _c, _u, mid, _rc, _p: subscribed.put(mid)
        _, mid = self.mqtt.subscribe(topic, qos=1)
        assert subscribed.get(timeout=5) == mid

    def publish(self, topic: str, payloads: list[bytes]) -> None:
        infos = [self.mqtt.publish(topic, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(timeout=15)
            assert info.is_published()

    def take(self, count: int, timeout: float) -> list[bytes]:
        deadline = time.monotonic() + timeout
        return [self.received.get(timeout=max(0.0, deadline - time.monotonic())) for _ in range(count)]

    def disconnect(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


def test_private_mosquitto_queues_a_5000_message_burst_for_a_disconnected_session(tmp_path: Path) -> None:
    # The stock config would keep 1,000 of these and drop the rest silently.
    with start_mosquitto(MOSQUITTO_CONFIG, tmp_path / "mosquitto") as broker:
        subscriber = Client(broker, "burst-sub", persistent=True).connect()
        subscriber.subscribe("farm/burst")
        subscriber.disconnect()

        publisher = Client(broker, "burst-pub").connect()
        payloads = [str(i).encode() for i in range(5000)]
        publisher.publish("farm/burst", payloads)
        publisher.disconnect()

        subscriber.connect()
        try:
            assert sorted(subscriber.take(5000, timeout=15), key=int) == payloads
        finally:
            subscriber.disconnect()


@pytest.mark.parametrize("ending", ["stop", "kill"])
def test_mosquitto_restart_delivers_a_message_queued_for_a_persistent_session(
        tmp_path: Path, ending: str) -> None:
    # SIGKILL keeps only the last snapshot: the deploy config takes one every ~2 s, awaited below.
    data_dir = tmp_path / "mosquitto"
    with start_mosquitto(MOSQUITTO_CONFIG, data_dir) as broker:
        subscriber = Client(broker, "durable-sub", persistent=True).connect()
        subscriber.subscribe("farm/durable")
        subscriber.disconnect()
        publisher = Client(broker, "durable-pub").connect()
        publisher.publish("farm/durable", [b"kept"])
        publisher.disconnect()
        published_at = time.time()

        if ending == "stop":
            broker.stop()
        else:
            wait_for_autosave(data_dir / "mosquitto.db", after=published_at)
            broker.kill()
        port = broker.port
        broker.start()
        assert broker.port == port

        subscriber.connect()
        try:
            assert subscriber.take(1, timeout=5) == [b"kept"]
        finally:
            subscriber.disconnect()


def wait_for_autosave(db: Path, after: float, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not (db.exists() and db.stat().st_mtime > after):
        assert time.monotonic() < deadline, f"{db} not saved within {timeout}s"
        time.sleep(0.1)


def test_amqtt_round_trip_over_mqtt_311() -> None:
    with start_mqtt() as broker:
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        subscriber = Client(broker, "amqtt-sub", v5=False).connect()
        publisher = Client(broker, "amqtt-pub", v5=False).connect()
        try:
            subscriber.subscribe("farm/amqtt")
            publisher.publish("farm/amqtt", [b"hello"])
            assert subscriber.take(1, timeout=5) == [b"hello"]
        finally:
            publisher.disconnect()
            subscriber.disconnect()
