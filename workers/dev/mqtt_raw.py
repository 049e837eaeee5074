"""A bare MQTT 3.1.1 QoS 1 publisher on a socket: topics are bytes, sent as they are.

paho encodes a `str` topic as UTF-8 and refuses wildcards, so it cannot send
the topics a broken device can (invalid UTF-8, control characters). This one
can: `publish_all` pipelines PUBLISH packets on one connection and waits for
every PUBACK; `publish_refused` sends one on a connection of its own and says
whether the broker closed it without a PUBACK (Mosquitto's answer to a topic
that breaks MQTT §4.7).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

from workers.bench_mqtt import _varint

PUBACK = 0x40


def _address(mqtt_url: str) -> tuple[str, int]:
    url = urlsplit(mqtt_url)
    return url.hostname or "127.0.0.1", url.port or 1883


def _string(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def _connect(mqtt_url: str, timeout: float) -> socket.socket:
    url = urlsplit(mqtt_url)
    flags, tail = 0x02, b""  # clean session
    if url.username:
        flags |= 0x80
        tail += _string(url.username.encode())
        if url.password:
            flags |= 0x40
            tail += _string(url.password.encode())
    client_id = f"fuzz-{os.getpid()}-{time.monotonic_ns() % 10**9}".encode()
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + struct.pack("!H", 60) + _string(client_id) + tail
    sock = socket.create_connection(_address(mqtt_url), timeout=timeout)
    sock.sendall(b"\x10" + _varint(len(body)) + body)
    connack = _read_exactly(sock, 4)
    if connack[:2] != b"\x20\x02" or connack[3] != 0:
        sock.close()
        raise ConnectionError(f"MQTT CONNECT refused: {connack!r}")
    return sock


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        data += chunk
    return data


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    first = _read_exactly(sock, 1)[0]
    length, shift = 0, 0
    while True:
        digit = _read_exactly(sock, 1)[0]
        length |= (digit & 0x7F) << shift
        shift += 7
        if not digit & 0x80:
            break
    return first & 0xF0, _read_exactly(sock, length) if length else b""


def publish_packet(topic: bytes, payload: bytes, packet_id: int, *, retain: bool = False, qos: int = 1) -> bytes:
    """PUBLISH at QoS 1 (or 0: no packet id, no PUBACK)."""
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | qos << 1 | retain]) + _varint(len(body)) + body


def publish_all(mqtt_url: str, messages: Iterable[tuple[bytes, bytes] | tuple[bytes, bytes, int]], *,
                window: int = 500, timeout: float = 120, retain: bool = False) -> int:
    """Publish on one connection, QoS 1 unless a message says 0 (topic, payload, qos);
    return once every QoS 1 message is PUBACKed (their count)."""
    sock = _connect(mqtt_url, timeout)
    free = threading.Semaphore(window)
    acked = [0]
    failed: list[BaseException] = []

    def read_acks() -> None:
        try:
            while True:
                kind, _ = _read_packet(sock)
                if kind == PUBACK:
                    acked[0] += 1
                    free.release()
        except (OSError, ConnectionError) as exc:
            failed.append(exc)
            free.release()

    reader = threading.Thread(target=read_acks, daemon=True, name="fuzz-puback-reader")
    reader.start()
    sent = 0
    try:
        for topic, payload, *qos in messages:
            if qos == [0]:
                sock.sendall(publish_packet(topic, payload, 0, retain=retain, qos=0))
                continue
            if not free.acquire(timeout=timeout) or failed:
                raise ConnectionError(f"broker stopped acknowledging after {acked[0]} of {sent}: {failed}")
            sock.sendall(publish_packet(topic, payload, sent % 65535 + 1, retain=retain))
            sent += 1
        deadline = time.monotonic() + timeout
        while acked[0] < sent and not failed and time.monotonic() < deadline:
            time.sleep(0.01)
        if acked[0] < sent:
            raise ConnectionError(f"only {acked[0]} of {sent} messages PUBACKed: {failed}")
        sock.sendall(b"\xe0\x00")  # DISCONNECT
        return sent
    finally:
        sock.close()


def publish_refused(mqtt_url: str, topic: bytes, payload: bytes, timeout: float = 10) -> bool:
    """Publish one message on its own connection: True if the broker closed the
    connection without a PUBACK (refused it), False if it acknowledged it."""
    sock = _connect(mqtt_url, timeout)
    try:
        sock.sendall(publish_packet(topic, payload, 1))
        while True:
            kind, _ = _read_packet(sock)
            if kind == PUBACK:
                sock.sendall(b"\xe0\x00")
                return False
    except TimeoutError:
        return False  # neither acknowledged nor refused: not what Mosquitto does
    except (ConnectionError, OSError):
        return True
    finally:
        sock.close()
