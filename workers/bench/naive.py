"""Reference (a) of `farmiq-edge bench ingest`: the naive pipeline.

One dramatiq-pg queue message per MQTT message, and a per-message ingest
actor: the design the bridge's micro-batching replaces. Same validation, same
ingest code (`actors.ingest.ingest_events`), same durability (enqueue commits
before the PUBACK; one transaction per event), just no batching.

    python -m workers.bench.naive subscribe          # MQTT -> one enqueue per message
    python -m dramatiq workers.bench.naive --queues bench_naive   # the worker

Only the benchmark starts these, against its scratch database and broker.
"""

from actors.broker import broker  # noqa: I001 - the broker is set before any actor
from actors.gc_tuning import tune_gc

import logging
import signal
import sys
import threading
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import dramatiq

from actors.ingest import ingest_events
from models.messages import INGRESS_EVENT, parse_message
from models.settings import get_settings
from schema.db import transaction
from workers.bridge import TOPIC_FILTER

QUEUE = "bench_naive"
log = logging.getLogger("farmiq_edge.bench_naive")


@dramatiq.actor(queue_name=QUEUE, actor_name="bench_naive_ingest", max_retries=10)
def naive_ingest(event: dict[str, Any]) -> None:
    settings = get_settings()
    parsed = INGRESS_EVENT.validate_python(event)
    with transaction(settings.database_url) as conn:
        ingest_events(conn, [parsed], sync_telemetry=settings.sync_telemetry)


def subscribe() -> int:
    """Subscribe like the bridge; enqueue (and commit) each message before paho acks it."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    s = get_settings()
    v5 = s.mqtt_protocol == "5"
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=s.mqtt_client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                         clean_session=None if v5 else False)

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        c.subscribe(TOPIC_FILTER, qos=1)
        log.info("event=naive_subscriber_connected")

    def on_message(c, userdata, message) -> None:
        # Runs on paho's network thread: paho sends the PUBACK when this returns,
        # so the per-message enqueue commit happens first (same guarantee as the bridge).
        event = parse_message(message.topic, message.payload, now=datetime.now(timezone.utc),
                              max_clock_skew=s.max_clock_skew, media_max_bytes=s.media_max_bytes,
                              max_payload_bytes=s.max_payload_bytes)
        broker.enqueue(naive_ingest.message(event.model_dump(mode="json")))

    client.on_connect, client.on_message = on_connect, on_message
    tune_gc()  # as the bridge does
    url = urlsplit(s.mqtt_url)
    kwargs: dict = {}
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = s.mqtt_session_expiry_seconds
        props.ReceiveMaximum = s.mqtt_receive_maximum
        kwargs = {"clean_start": False, "properties": props}
    client.connect(url.hostname or "127.0.0.1", url.port or 1883, keepalive=30, **kwargs)
    client.loop_start()
    stopping.wait()
    client.disconnect()
    client.loop_stop()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s level=%(levelname)s %(message)s")
    if sys.argv[1:] == ["subscribe"]:
        sys.exit(subscribe())
    sys.exit("usage: python -m workers.bench.naive subscribe")
