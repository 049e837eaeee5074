"""`farmiq-edge bridge`: MQTT → PostgreSQL, acknowledged only after the commit.

Two threads. paho's network thread only appends each PUBLISH to an in-memory
queue (it never waits on the database). The main thread takes micro-batches
(up to EDGE_BATCH_MAX_MESSAGES, EDGE_BATCH_MAX_BYTES, or EDGE_BATCH_MAX_MS after
the first message), validates them, and in ONE transaction writes the rejected
ones to ingress_dead_letters and enqueues the valid ones as one `ingest` queue
message. Commit point: that transaction. Only after it commits are the
PUBACKs sent, in arrival order. A crash before the commit leaves every message
un-acked, so the broker redelivers it (persistent session); a crash after the
commit but before the PUBACKs causes redeliveries that ingress_dedupe drops.
"""

import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import insert
from sqlalchemy.exc import InterfaceError, OperationalError

from actors.ingest import ingest_batch
from actors.broker import broker
from actors.gc_tuning import tune_gc
from actors.faults import crash_point
from actors.media_volume import Spool, VolumeFull
from actors.metrics import BRIDGE_BATCH_SECONDS, BRIDGE_BATCHES, INGRESS_REJECTED
from models.dead_letters import dead_letter_row
from models.messages import Rejected, parse_message
from models.settings import Settings
from models.tables import ingress_dead_letters
from schema.db import raw_cursor, transaction

log = logging.getLogger("farmiq_edge.bridge")

# Everything under our prefix: a device publishing to a malformed topic is
# dead-lettered (bad_topic), not silently ignored.
TOPIC_FILTER = "farmiq/#"
HEARTBEAT_EVERY_SECONDS = 1.0
MAX_DB_BACKOFF_SECONDS = 30.0
HOLD_SECONDS = 2.0  # a frame held for lack of disk space is offered again this much later


@dataclass(frozen=True)
class Delivery:
    mid: int
    topic: str
    payload: bytes
    generation: int  # which MQTT connection delivered it: acks go back to that one only


@dataclass
class Batch:
    deliveries: list[Delivery] = field(default_factory=list)
    size_bytes: int = 0


class Bridge:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.inbox: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.generation = 0
        self.client = self._make_client()

    # -- MQTT side (paho's network thread) ---------------------------------

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        v5 = s.mqtt_protocol == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=s.mqtt_client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else False)
        client.manual_ack_set(True)  # PUBACK only when we say so: after the commit
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("event=mqtt_connect_failed reason=%s", reason_code)
            return
        self.generation += 1
        topic = TOPIC_FILTER
        if self.settings.mqtt_shared_group:
            topic = f"$share/{self.settings.mqtt_shared_group}/{TOPIC_FILTER}"
        client.subscribe(topic, qos=1)
        log.info("event=mqtt_connected session_present=%s generation=%d", flags.session_present,
                 self.generation)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("event=mqtt_subscribe_failed reasons=%s", failed)
        else:
            log.info("event=mqtt_subscribed topic=%s", TOPIC_FILTER)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        log.warning("event=mqtt_disconnected reason=%s", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        self.inbox.put(Delivery(message.mid, message.topic, message.payload, self.generation))

    def connect(self) -> None:
        s = self.settings
        url = urlsplit(s.mqtt_url)
        if url.username:
            self.client.username_pw_set(url.username, url.password)
        if url.scheme == "mqtts":
            self.client.tls_set()
        kwargs: dict = {}
        if s.mqtt_protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.mqtt_session_expiry_seconds
            props.ReceiveMaximum = s.mqtt_receive_maximum
            # clean_start=False on EVERY connect: paho's default wipes the
            # session on the first one, dropping what queued while we were down.
            kwargs = {"clean_start": False, "properties": props}
        self.client.connect_async(url.hostname or "127.0.0.1", url.port or 1883, keepalive=30, **kwargs)
        self.client.loop_start()

    # -- database side (main thread) ---------------------------------------

    def run(self) -> None:
        self.connect()
        last_beat = 0.0
        while not self.stopping.is_set():
            batch = self._collect()
            if batch.deliveries and self._commit_with_retry(batch):
                self._ack(batch)
            if time.monotonic() - last_beat >= HEARTBEAT_EVERY_SECONDS:
                self._beat()
                last_beat = time.monotonic()
        # The batch in hand is committed and acked; whatever is still in the
        # inbox was never acked, so the broker keeps it for the next session.
        self.client.disconnect()
        self.client.loop_stop()
        log.info("event=bridge_stopped")

    def stop(self, *_: object) -> None:
        self.stopping.set()

    def _collect(self) -> Batch:
        s = self.settings
        batch = Batch()
        try:
            first = self.inbox.get(timeout=0.2)
        except queue.Empty:
            return batch
        deadline = time.monotonic() + s.batch_max_ms / 1000
        item: Delivery | None = first
        while item is not None:
            batch.deliveries.append(item)
            batch.size_bytes += len(item.payload)
            if len(batch.deliveries) >= s.batch_max_messages or batch.size_bytes >= s.batch_max_bytes:
                break
            try:
                item = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                item = None
        return batch

    def _beat(self) -> None:
        Path(self.settings.bridge_heartbeat_path).touch()

    def _commit_with_retry(self, batch: Batch) -> bool:
        """Commit, retrying while the database is unreachable; False if stopped first."""
        backoff = 0.5
        while True:
            try:
                self._commit(batch)
                return True
            except (OperationalError, InterfaceError) as exc:
                # Nothing was acked: keep the batch in hand and try again. Alive
                # (heartbeat) but not making progress; metrics and logs say why.
                log.warning("event=db_unavailable retry_in=%.1fs error=%s", backoff,
                            str(exc.orig).strip().splitlines()[0])
                self._beat()
                if self.stopping.wait(backoff):
                    return False  # never acked: the broker redelivers next session
                backoff = min(backoff * 2, MAX_DB_BACKOFF_SECONDS)

    def _commit(self, batch: Batch) -> None:
        s = self.settings
        now = datetime.now(timezone.utc)
        events, dead, reasons, held = [], [], [], []
        spool = Spool(s.media_root, min_free_bytes=s.media_min_free_bytes)  # frames: actors/media_volume.py
        for d in batch.deliveries:
            try:
                event = parse_message(d.topic, d.payload, now=now, max_clock_skew=s.max_clock_skew,
                                      media_max_bytes=s.media_max_bytes,
                                      max_payload_bytes=s.max_payload_bytes)
            except Rejected as rejected:
                dead.append(dead_letter_row(d.topic, d.payload, rejected.reason, rejected.detail))
                reasons.append(rejected.reason)
                continue
            try:
                events.append(spool.event_json(event))  # a frame's bytes go to disk, not the queue
            except VolumeFull:
                held.append(d)  # not committed, not acked: offered again below
        spool.sync()  # staged frames durable before the commit
        started = time.monotonic()
        with transaction(s.database_url) as conn:  # commit point (see module docstring)
            if dead:
                conn.execute(insert(ingress_dead_letters), dead)
            if events:
                with raw_cursor(conn) as cursor:
                    broker.enqueue_in(cursor, ingest_batch.message(events))
            crash_point("bridge.before_commit")
        crash_point("bridge.after_commit")
        if held:
            batch.deliveries = [d for d in batch.deliveries if d not in held]
            threading.Timer(HOLD_SECONDS, lambda: [self.inbox.put(d) for d in held]).start()
        BRIDGE_BATCH_SECONDS.set(time.monotonic() - started)
        BRIDGE_BATCHES.inc()
        for reason in reasons:
            INGRESS_REJECTED.labels(reason).inc()

    def _ack(self, batch: Batch) -> None:
        # In arrival order. A delivery from an earlier connection is not acked
        # on this one: the broker redelivers it and dedupe drops the copy.
        for d in batch.deliveries:
            if d.generation == self.generation:
                self.client.ack(d.mid, 1)


def run_bridge(settings: Settings) -> int:
    from prometheus_client import start_http_server
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    bridge = Bridge(settings)
    tune_gc()  # throughput: see actors/gc_tuning.py
    signal.signal(signal.SIGTERM, bridge.stop)
    signal.signal(signal.SIGINT, bridge.stop)
    log.info("event=bridge_starting mqtt=%s protocol=%s client_id=%s", _redact(settings.mqtt_url),
             settings.mqtt_protocol, settings.mqtt_client_id)
    bridge.run()
    return 0


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 1883}"
