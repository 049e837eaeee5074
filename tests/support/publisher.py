"""A device-side MQTT publisher for tests: QoS 1, waits until the broker acked everything."""

import threading
import time
import uuid
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.processes import wait_until


def publish_all(mqtt_url: str, messages: list[tuple[str, bytes]], timeout: float = 60) -> None:
    url = urlsplit(mqtt_url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-pub-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(500)
    client.max_queued_messages_set(0)
    acked = threading.Semaphore(0)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.on_publish = lambda *a: acked.release()
    client.connect_async(url.hostname, url.port)
    client.loop_start()
    try:
        assert connected.wait(10), "publisher could not connect"
        for topic, payload in messages:
            client.publish(topic, payload, qos=1)
        for _ in messages:
            assert acked.acquire(timeout=timeout), "broker did not ack every publish"
    finally:
        client.disconnect()
        client.loop_stop()


class PacedPublisher(threading.Thread):
    """QoS 1 at `rate` messages/s; `acked` counts PUBACKs from the broker."""

    def __init__(self, mqtt_url: str, messages: list[tuple[str, bytes]], rate: float) -> None:
        super().__init__(daemon=True)
        self.messages, self.rate, self.acked = messages, rate, 0
        host, port = mqtt_url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._on_publish
        self.client.connect(host, int(port))
        self.client.loop_start()

    def _on_publish(self, *_: object) -> None:
        self.acked += 1

    def run(self) -> None:
        started = time.monotonic()
        for i, (t, payload) in enumerate(self.messages):
            time.sleep(max(0.0, started + i / self.rate - time.monotonic()))
            self.client.publish(t, payload, qos=1)

    def finish(self) -> None:
        self.join(300)
        wait_until(lambda: self.acked == len(self.messages), 60, "the broker to ack every publish")
        self.client.disconnect()
        self.client.loop_stop()
