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
    """QoS 1 at `rate` messages/s; `acked_at` holds the time of each PUBACK, in publish
    order (a broker PUBACKs one connection's QoS 1 messages in the order received)."""

    def __init__(self, mqtt_url: str, messages: list[tuple[str, bytes]], rate: float) -> None:
        super().__init__(daemon=True)
        self.messages, self.rate = messages, rate
        self.acked_at: list[float] = []
        self._stopping = threading.Event()
        host, port = mqtt_url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._on_publish
        self.client.connect(host, int(port))
        self.client.loop_start()

    @property
    def acked(self) -> int:
        return len(self.acked_at)

    def _on_publish(self, *_: object) -> None:
        self.acked_at.append(time.monotonic())

    def run(self) -> None:
        started = time.monotonic()
        for i, (t, payload) in enumerate(self.messages):
            if self._stopping.wait(max(0.0, started + i / self.rate - time.monotonic())):
                return
            self.client.publish(t, payload, qos=1)

    def finish(self) -> None:
        self.join(300)
        wait_until(lambda: self.acked == len(self.messages), 60, "the broker to ack every publish")
        self.stop()

    def stop(self) -> None:
        """Stop publishing and disconnect, without waiting for acks (e.g. the broker was
        killed: paho must not reconnect and resend to its successor)."""
        self._stopping.set()
        self.join(300)
        self.client.disconnect()
        self.client.loop_stop()
