"""A device-side MQTT publisher for tests: QoS 1, waits until the broker acked everything."""

import threading
import uuid
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


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
