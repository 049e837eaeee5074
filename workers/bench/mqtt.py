"""MQTT load for `farmiq-edge bench ingest`: the publisher and the bare counting subscriber.

The publisher must never be what limits the figures, and on a 2-core box every
cycle it burns is taken from the pipeline. So it does no MQTT client work per
message: each telemetry PUBLISH packet (MQTT 3.1.1, QoS 1, one topic per
device) is encoded once, before the run, with a fixed-width placeholder where
`occurred_at` goes; at send time a chunk of packets is joined with the current
time in that slot (so `occurred_at` is the publish time, to the chunk) and
written to a plain socket. A reader thread counts the broker's PUBACKs (4
bytes each), which bounds the packets in flight. Several publisher processes
split the devices between them, so each device's messages keep their order.

Why not a stock client (measured on the 2-core box, 52,500 messages from 100
devices into the project's Mosquitto): this publisher, 2 processes, wrote
them in 0.4-0.6 s (~90-120k msg/s, all PUBACKed within ~1 s) for about
8 us of CPU a message; `mosquitto_pub -q 1 -l`, one process per device topic
with the lines ready in files, took 1.7 s (~29k msg/s; ~40k with 10 topics);
2 paho processes publishing pre-encoded payloads with an unlimited in-flight
window took 1.0 s to write and 1.3 s to be acked (~39k msg/s).

A publisher stays connected until the benchmark releases it: amqtt (the
fallback broker) drops what it acknowledged but had not forwarded yet when the
publisher disconnects.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

TENANT, FARM, BARN = "bench-tenant", "bench-farm", "bench-barn"
STAMP_PLACEHOLDER = b"2000-01-01T00:00:00.000000Z"  # 27 bytes, the width of every stamp
CHUNK = 200               # packets per socket write
PACE_TICK = 0.005         # with --rate: seconds between socket writes
MAX_IN_FLIGHT = 20_000    # unacked packets per publisher (packet ids are 16-bit)
# A duplicate is republished this many of the publisher's messages after its
# original: a redelivery after a lost PUBACK, not a back-to-back copy.
DUPLICATE_GAP = 150


def device_topic(device: int) -> str:
    return f"farmiq/v1/{TENANT}/{FARM}/{BARN}/dev-{device:05d}/telemetry"


def stamp() -> bytes:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


@dataclass(frozen=True)
class Plan:
    """What one publisher sends: the same arguments give the same event ids everywhere."""

    messages: int          # unique telemetry messages in the whole run
    devices: int
    duplicates: float      # share of the unique messages published twice
    publishers: int
    seed: int

    def duplicated(self) -> set[int]:
        rng = random.Random(self.seed)
        return set(rng.sample(range(self.messages), round(self.messages * self.duplicates)))

    def order(self, publisher: int) -> list[int]:
        """Indexes of the unique messages this publisher sends, duplicates included, in order."""
        dup = self.duplicated()
        mine = [i for i in range(self.messages) if (i % self.devices) % self.publishers == publisher]
        keyed = [(k, i) for k, i in enumerate(mine)]
        keyed += [(k + DUPLICATE_GAP + 0.5, i) for k, i in enumerate(mine) if i in dup]
        return [i for _, i in sorted(keyed)]

    def total_published(self) -> int:
        return self.messages + round(self.messages * self.duplicates)


def payloads(plan: Plan, publisher: int) -> list[tuple[int, bytes, bytes]]:
    """(device, before, after) of each of `publisher`'s telemetry payloads, in order.

    The time stamp goes between `before` and `after`; every stamp has the same
    width, so a payload's size does not depend on when it is sent.
    """
    rng = random.Random(plan.seed * 7919 + 1)
    ids = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(plan.messages)]
    out = []
    for i in plan.order(publisher):
        temp = round(20 + (i * 37 % 1000) / 100, 2)
        hum = round(50 + (i * 53 % 2000) / 100, 2)
        before = b'{"event_id":"%s","occurred_at":"' % str(ids[i]).encode()
        after = (b'","readings":[{"metric_type":"temperature","metric_value":%r,"unit":"C"},'
                 b'{"metric_type":"humidity","metric_value":%r,"unit":"%%"}]}' % (temp, hum))
        out.append((i % plan.devices, before, after))
    return out


def encode_packets(plan: Plan, publisher: int) -> list[tuple[bytes, bytes]]:
    """(prefix, suffix) of each PUBLISH packet; the time stamp goes between them."""
    packets = []
    for seq, (device, before, after) in enumerate(payloads(plan, publisher)):
        topic = _utf8(device_topic(device))
        packet_id = struct.pack("!H", seq % 65535 + 1)
        remaining = len(topic) + 2 + len(before) + len(STAMP_PLACEHOLDER) + len(after)
        packets.append((b"\x32" + _varint(remaining) + topic + packet_id + before, after))
    return packets


def payload_lines(plan: Plan, publisher: int) -> bytes:
    """`publisher`'s payloads, one a line, stamped now: stdin for `mosquitto_pub -l`."""
    now = stamp()
    return b"".join(before + now + after + b"\n" for _, before, after in payloads(plan, publisher))


def connect_packet(client_id: str) -> bytes:
    # MQTT 3.1.1, clean session, keepalive 0 (no PINGREQ needed).
    body = _utf8("MQTT") + b"\x04\x02\x00\x00" + _utf8(client_id)
    return b"\x10" + _varint(len(body)) + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes from `sock`; ConnectionError if the peer closes first."""
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise ConnectionError("MQTT peer closed the connection")
        data += more
    return data


class RawPublisher:
    """One MQTT 3.1.1 connection that writes pre-encoded QoS 1 PUBLISH packets."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(connect_packet(client_id))
        connack = self._recv_exact(4)
        if connack[:2] != b"\x20\x02" or connack[3] != 0:
            raise ConnectionError(f"MQTT broker refused the publisher: {connack!r}")
        self.acked = 0
        self._received = 0
        self._closed = False
        self._reader = threading.Thread(target=self._read_acks, daemon=True)
        self._reader.start()

    def _recv_exact(self, n: int) -> bytes:
        return recv_exact(self.sock, n)

    def _read_acks(self) -> None:
        self.sock.settimeout(None)
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self._received += len(data)
            self.acked = self._received // 4  # only PUBACKs come back: 40 02 id id
            time.sleep(0.002)  # let PUBACKs gather: one wake-up for many, not one each

    def send(self, packets: list[tuple[bytes, bytes]]) -> None:
        now = stamp()
        self.sock.sendall(b"".join(b for prefix, suffix in packets for b in (prefix, now, suffix)))

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def publish(host: str, port: int, plan: Plan, publisher: int, rate: float, start_event, release_event,
            progress, results) -> None:
    """Body of one publisher process (multiprocessing, spawn).

    Stays connected until `release_event`: amqtt drops what it has acknowledged
    but not yet forwarded when the publisher disconnects.
    """
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    packets = encode_packets(plan, publisher)
    client = RawPublisher(host, port, f"farmiq-bench-pub-{publisher}-{plan.seed}")
    results.put(("ready", publisher))
    start_event.wait()
    n = len(packets)
    sent = 0
    t_first = time.time()
    t0 = time.monotonic()
    while sent < n:
        if rate > 0:
            due = min(n, int((time.monotonic() - t0) * rate) + 1)
            if due <= sent:
                # Wake every PACE_TICK at most and send what has come due: the
                # offered rate holds, and the publisher stays cheap at any rate.
                time.sleep(max(PACE_TICK, (sent + 1 - (time.monotonic() - t0) * rate) / rate))
                continue
            end = min(due, sent + CHUNK)
        else:
            end = min(n, sent + CHUNK)
        while end - client.acked > MAX_IN_FLIGHT:
            time.sleep(0.001)
        client.send(packets[sent:end])
        sent = end
        progress.value = sent
    t_last = time.time()
    deadline = time.monotonic() + 120
    while client.acked < n and time.monotonic() < deadline:
        time.sleep(0.001)
    t_acked = time.time()
    results.put(("done", publisher, {"sent": n, "acked": client.acked, "t_first": t_first,
                                     "t_last": t_last, "t_acked": t_acked}))
    release_event.wait(3600)
    client.close()


def count_messages(mqtt_url: str, protocol: str, expected: int, timeout: float, ready_event,
                   results) -> None:
    """Body of the bare-MQTT reference subscriber: QoS 1, no database, count and time."""
    import signal
    from urllib.parse import urlsplit

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    url = urlsplit(mqtt_url)
    v5 = protocol == "5"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"farmiq-bench-bare-{time.time_ns()}",
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    state = {"n": 0, "first": 0.0, "last": 0.0}
    subscribed = threading.Event()
    done = threading.Event()

    def on_connect(c, userdata, flags, reason_code, properties):
        c.subscribe("farmiq/v1/+/+/+/+/+", qos=1)

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        subscribed.set()

    def on_message(c, userdata, message):
        now = time.time()
        if not state["n"]:
            state["first"] = now
        state["n"] += 1
        state["last"] = now
        if state["n"] >= expected:
            done.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    kwargs: dict = {}
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = 65535
        kwargs = {"clean_start": True, "properties": props}
    client.connect(url.hostname or "127.0.0.1", url.port or 1883, keepalive=60, **kwargs)
    client.loop_start()
    subscribed.wait(20)
    ready_event.set()
    done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    results.put(("bare", state))


# --- a bridge's persistent session, without the bridge (durability measurements) ---

BRIDGE_SESSION = "durability-bridge"


def create_session(url: str) -> None:
    """The bridge's persistent session: subscribed, then gone (the broker queues for it)."""
    client = _client(url)
    client.subscribe("farmiq/#", qos=1)
    time.sleep(0.3)
    client.disconnect()
    client.loop_stop()


def drain_session(url: str, quiet: float = 3.0) -> set[int]:
    """Reconnect as the bridge; the sequence numbers the broker still had."""
    seen: set[int] = set()
    last = [time.monotonic()]

    def on_message(client, userdata, message) -> None:
        seen.add(int(message.payload[7:-1]))
        last[0] = time.monotonic()

    client = _client(url, on_message)
    while time.monotonic() - last[0] < quiet:
        time.sleep(0.2)
    client.disconnect()
    client.loop_stop()
    return seen


def _client(url: str, on_message=None):  # noqa: ANN202 - a paho client
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    host, port = url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=BRIDGE_SESSION, clean_session=False,
                         protocol=mqtt.MQTTv311)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    if on_message is not None:
        client.on_message = on_message
    client.connect(host, int(port))
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError("could not connect")
    return client
