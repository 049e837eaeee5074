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

Robustness (issue 7 item 7):
- Memory: payloads received and not yet acknowledged are counted in bytes.
  Above EDGE_BRIDGE_INBOX_MAX_BYTES, `_on_message` does not return: paho's
  network thread then stops reading the socket, so TCP backpressure and the
  MQTT receive window (EDGE_MQTT_RECEIVE_MAXIMUM; Mosquitto's
  max_inflight_messages for 3.1.1) hold the rest in the broker. Chosen over a
  disconnect: a disconnect would make every delivery still in hand un-ackable
  (a new connection) and the broker would send it all again. While held, the
  callback sends a PINGREQ every keepalive/2 and flushes paho's outgoing
  queue itself, so the broker does not drop the session and PUBACKs of
  committed batches still leave. If the connection is dropped anyway, nothing is
  lost: un-acked messages are redelivered and ingress_dedupe drops copies.
- Read-ahead: paho's thread is also held once READ_AHEAD_BATCHES full
  batches wait in the inbox. Both threads share one GIL; unbounded, paho's
  thread read a 65,000-message backlog ahead while commits (and the
  workers behind them) waited, and the burst took ~30% longer.
- Liveness: the heartbeat file is touched only while paho's network thread
  is alive, connected, and has read from the broker (at least a PINGRESP)
  within two keepalives, or is held on purpose and ticking.
- Callbacks never raise into paho (an exception there ends its thread): the
  topic is taken as bytes; one that is not UTF-8 is dead-lettered (bad_topic)
  with its bytes decoded lossily.
- Every database error class is retried (SQLAlchemy DBAPIError, psycopg2.Error:
  DiskFull, QueryCanceled, …), never acked, with a backoff capped at
  MAX_DB_BACKOFF_SECONDS so flow resumes within ~1 s of the database's return.
- Acks never cross a reconnect: a delivery is acked only on the connection
  that delivered it (generation), checked under the same lock that bumps the
  generation on disconnect and on connect. paho clears its outgoing queue on
  reconnect, so a PUBACK queued before the bump never reaches the next
  connection, whose packet ids may name other messages (session_present=0,
  MQTT 3.1.1 or 5).
"""

import ctypes
import faulthandler
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from sqlalchemy import insert

from actors.ingest import ingest_batch
from actors.broker import broker
from actors.gc_tuning import tune_gc
from actors.faults import crash_point
from actors.media_volume import Spool, VolumeFull
from actors.metrics import BRIDGE_BATCH_SECONDS, BRIDGE_BATCHES, INGRESS_REJECTED
from models.ingress_dead_letters import dead_letter_row
from models.messages import MediaEvent, Rejected, event_of, validate_message
from models.queue_events import queue_form, telemetry_row
from models.settings import Settings
from models.tables import ingress_dead_letters
from schema.db import DB_ERRORS, db_error_class, raw_cursor, transaction
from workers.mqtt_socket import BufferedClient

log = logging.getLogger("farmiq_edge.bridge")

# Everything under our prefix: a device publishing to a malformed topic is
# dead-lettered (bad_topic), not silently ignored.
TOPIC_FILTER = "farmiq/#"
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
HEARTBEAT_EVERY_SECONDS = 1.0
MIN_DB_BACKOFF_SECONDS = 0.1
MAX_DB_BACKOFF_SECONDS = 1.0
DB_ERROR_LOG_EVERY_SECONDS = 10.0
READ_AHEAD_BATCHES = 4  # enough for a batch to fill while the last one commits
COLLECT_POLL_SECONDS = 0.002  # while a batch fills: how often the inbox is looked at
HOLD_SECONDS = 2.0  # a frame held for lack of disk space is offered again this much later


class Delivery(NamedTuple):  # a tuple: one is made per message
    mid: int
    topic: bytes  # as received: a topic that is not UTF-8 must still reach a dead letter
    payload: bytes
    generation: int  # which MQTT connection delivered it: acks go back to that one only
    qos: int = 1  # a QoS 0 delivery (a misbehaving device) has no packet id and takes no PUBACK


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
        self.drop_retained = False  # see _on_connect
        # Guards `generation` against acks (see module docstring).
        self._ack_lock = threading.Lock()
        # Payload bytes received and not yet acked or dropped; paho is held above the bound.
        self._held = threading.Condition()
        self.inbox_bytes = 0
        self._held_tick = 0.0  # monotonic time the held network thread last ticked
        self.client = self._make_client()

    # -- MQTT side (paho's network thread) ---------------------------------

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        v5 = s.mqtt_protocol == "5"
        client = BufferedClient(CallbackAPIVersion.VERSION2, client_id=s.mqtt_client_id,
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
        with self._ack_lock:
            self.generation += 1
        topic = TOPIC_FILTER
        if self.settings.mqtt_shared_group:
            topic = f"$share/{self.settings.mqtt_shared_group}/{TOPIC_FILTER}"
        # Retained messages are sent again on every SUBSCRIBE: each bridge restart
        # would re-ingest (or re-dead-letter) them. MQTT 5: retained messages only
        # for a new subscription. 3.1.1 has no such option: once a session is
        # resumed, a delivery flagged retain is such a repeat (live copies are
        # forwarded unflagged), acked and dropped in _on_message.
        self.drop_retained = self.settings.mqtt_protocol != "5" and flags.session_present
        if self.settings.mqtt_protocol == "5":
            client.subscribe(topic, options=SubscribeOptions(
                qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB))
        else:
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
        # paho calls this before it reconnects: from here on, nothing in hand is acked.
        with self._ack_lock:
            self.generation += 1
        log.warning("event=mqtt_disconnected reason=%s", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        # Never raise: an exception here ends paho's network thread.
        try:
            if message.retain and self.drop_retained:
                if message.qos > 0:
                    client.ack(message.mid, message.qos)
                return
            delivery = Delivery(message.mid, bytes(message._topic), message.payload, self.generation,
                                message.qos)
            with self._held:
                self.inbox_bytes += len(delivery.payload)
            self.inbox.put(delivery)
            self._hold_while_full(client)
        except Exception:  # noqa: BLE001
            log.exception("event=mqtt_callback_failed mid=%s", getattr(message, "mid", None))

    def _hold_while_full(self, client: mqtt.Client) -> None:
        """Backpressure: do not return to paho while the inbox is over its bounds.

        paho cannot run its keepalive or flush its outgoing queue while we hold
        its thread, so this loop does both: a PINGREQ every keepalive/2 and the
        queued PUBACKs of committed batches. It writes with paho's
        `_packet_write` (2.x), not `loop_write`: on an error that one calls
        on_disconnect, which would wait for the callback lock we are holding.
        On a write error we return, and paho sees the lost connection.
        """
        if not self._inbox_full():  # the common case, per message: no lock, no clock
            return
        ping_every = self.settings.mqtt_keepalive_seconds / 2
        last_ping = time.monotonic()
        with self._held:
            while self._inbox_full():
                self._held_tick = time.monotonic()
                self._held.wait(0.5)
                # Checked under the lock `run` takes to disconnect: never write a
                # DISCONNECT from here (paho would call on_disconnect in our callback).
                if self.stopping.is_set():
                    break
                if time.monotonic() - last_ping >= ping_every:
                    last_ping = time.monotonic()
                    client._send_pingreq()  # paho 2.x: queued only, written below
                if client._packet_write() not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
                    break  # connection lost: let paho see it and reconnect
            self._held_tick = 0.0

    def _inbox_full(self) -> bool:
        s = self.settings
        return (self.inbox_bytes > s.bridge_inbox_max_bytes
                or self.inbox.qsize() > READ_AHEAD_BATCHES * s.batch_max_messages)

    def _release(self, deliveries: list[Delivery]) -> None:
        with self._held:
            self.inbox_bytes -= sum(len(d.payload) for d in deliveries)
            self._held.notify_all()

    def mqtt_alive(self) -> bool:
        """paho's network thread is alive, connected, and read or ticked within 2 keepalives."""
        thread = self.client._thread  # paho 2.x: the loop_start() thread
        if thread is None or not thread.is_alive() or not self.client.is_connected():
            return False
        # paho's thread reads at least a PINGRESP per keepalive (_last_bytes_received,
        # paho 2.x, monotonic); when we hold it on purpose it ticks _held_tick.
        last = max(self.client._last_bytes_received, self._held_tick)
        return time.monotonic() - last < 2 * self.settings.mqtt_keepalive_seconds

    def connect(self) -> None:
        s = self.settings
        url = urlsplit(s.mqtt_url)
        if url.username:
            self.client.username_pw_set(unquote(url.username),
                                        unquote(url.password) if url.password is not None else None)
        if url.scheme == "mqtts":
            self.client.tls_set(ca_certs=s.mqtt_ca_file or None)
        kwargs: dict = {}
        if s.mqtt_protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.mqtt_session_expiry_seconds
            props.ReceiveMaximum = s.mqtt_receive_maximum
            # clean_start=False on EVERY connect: paho's default wipes the
            # session on the first one, dropping what queued while we were down.
            kwargs = {"clean_start": False, "properties": props}
        default_port = 8883 if url.scheme == "mqtts" else 1883
        self.client.connect_async(url.hostname or "127.0.0.1", url.port or default_port,
                                  keepalive=s.mqtt_keepalive_seconds, **kwargs)
        self.client.loop_start()

    # -- database side (main thread) ---------------------------------------

    def run(self) -> None:
        self.connect()
        last_beat = 0.0
        while not self.stopping.is_set():
            batch = self._collect()
            if batch.deliveries:
                held = self._commit_with_retry(batch)
                if held is not None:
                    self._ack(batch, skip=held)
                    if held:  # frames the full media volume could not take: offered again later
                        threading.Timer(HOLD_SECONDS, lambda h=held: [self.inbox.put(d) for d in h]).start()
                kept = {id(d) for d in held or ()}
                self._release([d for d in batch.deliveries if id(d) not in kept])
            if time.monotonic() - last_beat >= HEARTBEAT_EVERY_SECONDS:
                self._beat()
                last_beat = time.monotonic()
        # The batch in hand is committed and acked; whatever is still in the
        # inbox was never acked, so the broker keeps it for the next session.
        with self._held:
            self._held.notify_all()  # a held network thread sees `stopping` and returns
            self.client.disconnect()  # under the lock: see _hold_while_full
        self.client.loop_stop()
        log.info("event=bridge_stopped")

    def stop(self, *_: object) -> None:
        self.stopping.set()

    def _collect(self) -> Batch:
        s = self.settings
        batch = Batch()
        try:
            item = self.inbox.get(timeout=0.2)
        except queue.Empty:
            return batch
        deadline = time.monotonic() + s.batch_max_ms / 1000
        while True:
            while item is not None:
                batch.deliveries.append(item)
                batch.size_bytes += len(item.payload)
                if len(batch.deliveries) >= s.batch_max_messages or batch.size_bytes >= s.batch_max_bytes:
                    return batch
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            left = deadline - time.monotonic()
            if left <= 0:
                return batch
            # Sleep rather than block on the queue: a blocked get() is woken by
            # every put(), and handing the GIL back and forth per message
            # halved the bridge's throughput while paho's thread was reading.
            time.sleep(min(COLLECT_POLL_SECONDS, left))
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None

    def _beat(self) -> None:
        # Liveness = both threads: this one (we are here) and paho's.
        if self.mqtt_alive():
            Path(self.settings.bridge_heartbeat_path).touch()

    def _commit_with_retry(self, batch: Batch) -> list[Delivery] | None:
        """Commit, retrying on any database error; the deliveries held back (see
        commit_batch), or None if stopped first."""
        backoff = MIN_DB_BACKOFF_SECONDS
        failing_since, last_log = 0.0, 0.0
        while True:
            try:
                held = commit_batch(self.settings, batch.deliveries)
                if failing_since:
                    log.info("event=db_available outage_seconds=%.1f", time.monotonic() - failing_since)
                return held
            except DB_ERRORS as exc:
                # Every database error class is retried: nothing is acked before
                # its commit, so retrying is always safe; the backoff keeps it
                # from spinning. Nothing was acked: keep the batch in hand and try again. Alive
                # (heartbeat) but not making progress; the log says why, with
                # the error class only (messages can quote values).
                now = time.monotonic()
                failing_since = failing_since or now
                if now - last_log >= DB_ERROR_LOG_EVERY_SECONDS:
                    last_log = now
                    log.warning("event=db_unavailable error=%r messages=%d failing_for=%.0fs",
                                db_error_class(exc), len(batch.deliveries), now - failing_since)
                self._beat()
                if self.stopping.wait(backoff):
                    return None  # never acked: the broker redelivers next session
                backoff = min(backoff * 2, MAX_DB_BACKOFF_SECONDS)

    def _ack(self, batch: Batch, skip: list[Delivery] = ()) -> None:
        # In arrival order, in one write. A delivery from an earlier connection
        # is not acked on this one: the broker redelivers it and dedupe drops the copy.
        skipped = {id(d) for d in skip}
        with self._ack_lock:
            self.client.ack_many([d.mid for d in batch.deliveries
                                  if d.generation == self.generation and d.qos == 1 and id(d) not in skipped])


def commit_batch(settings: Settings, deliveries: list[Delivery]) -> list[Delivery]:
    """Validate `deliveries`; in ONE transaction dead-letter the rejected ones and
    enqueue the valid ones as one `ingest` message (commit point). A frame's bytes
    are spooled to the media volume and fsynced before it (actors/media_volume.py);
    frames the volume cannot take now are returned, neither committed nor to be acked."""
    s = settings
    now = datetime.now(timezone.utc)
    events, dead, reasons, held = [], [], [], []
    received = bytearray()  # the telemetry payloads, stored beside the queue message
    spool = Spool(s.media_root, min_free_bytes=s.media_min_free_bytes)
    for d in deliveries:
        try:
            try:
                topic = d.topic.decode("utf-8")
            except UnicodeDecodeError:
                topic = d.topic.decode("utf-8", "backslashreplace")
                raise Rejected("bad_topic", "topic is not valid UTF-8") from None
            ids, validated = validate_message(topic, d.payload, now=now, max_clock_skew=s.max_clock_skew,
                                              media_max_bytes=s.media_max_bytes,
                                              max_payload_bytes=s.max_payload_bytes)
        except Rejected as rejected:
            dead.append(dead_letter_row(topic, d.payload, rejected.reason, rejected.detail))
            reasons.append(rejected.reason)
            continue
        if ids.kind == "telemetry":  # the hot path: its queue row, no event model (models/queue_events.py)
            events.append(telemetry_row(ids, validated, d.payload, received))
            continue
        event = event_of(ids, validated)
        try:
            # A frame's bytes go to disk, not the queue.
            dumped = spool.event_json(event) if isinstance(event, MediaEvent) else None
            events.append(queue_form(event, d.payload, dumped))
        except VolumeFull:
            held.append(d)
    spool.sync()  # staged frames durable before the commit
    started = time.monotonic()
    # Commit point (see module docstring). No ping: any database error is retried.
    with transaction(s.database_url, ping=False) as conn:
        if dead:
            conn.execute(insert(ingress_dead_letters), dead)
        if events:
            with raw_cursor(conn) as cursor:
                message = ingest_batch.message(events)
                # The actor reads a payload back from this message's row (a dead letter).
                message = message.copy(kwargs={"received_in": message.message_id} if received else {})
                broker.enqueue_new_in(cursor, message, received=bytes(received))
        crash_point("bridge.before_commit")
    crash_point("bridge.after_commit")
    BRIDGE_BATCH_SECONDS.set(time.monotonic() - started)
    BRIDGE_BATCHES.inc()
    for reason in reasons:
        INGRESS_REJECTED.labels(reason).inc()
    return held


def run_bridge(settings: Settings) -> int:
    from prometheus_client import start_http_server
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    _large_buffers_back_to_the_os()
    bridge = Bridge(settings)
    tune_gc()  # throughput: see actors/gc_tuning.py
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` writes every thread's stack to stderr
    signal.signal(signal.SIGTERM, bridge.stop)
    signal.signal(signal.SIGINT, bridge.stop)
    log.info("event=bridge_starting mqtt=%s protocol=%s client_id=%s", _redact(settings.mqtt_url),
             settings.mqtt_protocol, settings.mqtt_client_id)
    bridge.run()
    return 0


def _large_buffers_back_to_the_os() -> None:
    # glibc raises its mmap threshold after freeing a big block, so later
    # 14 MB frames come from the heap and stay in RSS after they are freed.
    # A fixed 1 MiB threshold keeps payload buffers in mmaps, returned on free:
    # the inbox byte bound then bounds RSS too.
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    libc.mallopt(_M_MMAP_THRESHOLD, 1024 * 1024)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or (8883 if parts.scheme == 'mqtts' else 1883)}"
