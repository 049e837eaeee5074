"""paho with fewer system calls per message: buffered reads, batched PUBACKs.

paho 2.x reads a packet with recv(1) for its type, recv(1) per length byte,
then recv(n) for the rest, and handles one packet per pass of its network
loop (select(), keepalive checks, …). At thousands of small PUBLISHes a
second that was most of the bridge's CPU. paho asks a socket-like object for
`pending()` bytes, as it does for TLS sockets that buffer a record, and then
reads without waiting in select(); `BufferedSocket` uses that contract, and
`BufferedClient` reads every complete packet already buffered in one pass,
each in one piece (paho's own reader, byte by byte, only for a packet split
across reads).

Each `ack()` costs paho a wake-up write and one send() of 4 bytes;
`BufferedClient.ack_many` queues a committed batch's PUBACKs as one write.

For each QoS 0/1 PUBLISH paho 2.x also builds an `MQTTMessage` (with a
`threading.Condition`), an MQTT 5 `Properties` object and walks its topic
matcher: ~15 µs of the bridge's ~60 µs per message. `BufferedClient` decodes
such a PUBLISH into a `Received` and calls `on_message` with it; QoS 2 and
MQTT 5 topic aliases (the bridge asks for neither) go to paho's own handler.
"""

import struct
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import MQTTv5, time_func
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket

READ_SIZE = 64 * 1024
_UINT16 = struct.Struct("!H")
MAX_PACKETS_PER_PASS = 1000  # let the loop write PUBACKs and ping in between


def _variable_byte_integer(data: bytes | bytearray, i: int) -> tuple[int, int] | None:
    """MQTT's Variable Byte Integer at `data[i]`: (value, index after it), or None
    if `data` ends first or it runs over its 4 bytes."""
    value = 0
    for shift in (0, 7, 14, 21):
        if i >= len(data):
            return None
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
    return None


class BufferedSocket:
    """A socket-like wrapper (paho's SocketLike) that reads ahead into a buffer."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._buffer):
            # Errors (BlockingIOError, TLS want-read, reset) reach paho as from the socket.
            data = self._sock.recv(max(bufsize, READ_SIZE))
            if len(data) <= bufsize:
                return data
            self._buffer, self._pos = data, 0
        chunk = self._buffer[self._pos:self._pos + bufsize]
        self._pos += len(chunk)
        return chunk

    def whole_packet(self) -> tuple[int, bytes] | None:
        """The next MQTT packet (fixed header byte, rest) if all of it is buffered, else None."""
        buffer, start = self._buffer, self._pos
        remaining = _variable_byte_integer(buffer, start + 1)  # the Remaining Length
        if remaining is None:
            return None  # not all here yet (or malformed: paho's reader reports it)
        length, i = remaining
        if len(buffer) - i < length:
            return None
        self._pos = i + length
        return buffer[start], buffer[i:i + length]

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0  # TLS: a decrypted record
        return len(self._buffer) - self._pos + inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)  # send, fileno, setblocking, close, …


class Received:
    """A QoS 0/1 PUBLISH as `on_message` sees it: the `MQTTMessage` attributes the bridge reads."""

    __slots__ = ("mid", "_topic", "payload", "qos", "retain", "dup")

    def __init__(self, mid: int, topic: bytes, payload: bytes, qos: int, retain: bool, dup: bool) -> None:
        self.mid, self._topic, self.payload = mid, topic, payload
        self.qos, self.retain, self.dup = qos, retain, dup

    @property
    def topic(self) -> str:
        return self._topic.decode("utf-8")  # as MQTTMessage.topic: raises on a topic that is not UTF-8


class BufferedClient(mqtt.Client):
    """paho's client over a `BufferedSocket`, reading all buffered packets per loop pass.

    Calls `on_message` only (no per-topic callbacks) for QoS 0/1 messages.
    """

    def _create_socket(self) -> Any:  # paho 2.x: the one place a connection's socket is made
        return BufferedSocket(super()._create_socket())

    def ack_many(self, mids: list[int]) -> None:
        """PUBACK each QoS 1 message of `mids`, in order, in one write.

        paho 2.x queues outgoing bytes as packets (`_packet_queue`) and writes
        each whole; several PUBACKs (fixed header, length 2, packet id: the
        same bytes for MQTT 3.1.1 and 5) queued as one are written as one.
        """
        if mids:
            data = b"".join([struct.pack("!BBH", mqtt.PUBACK, 2, mid) for mid in mids])
            self._packet_queue(mqtt.PUBACK, data, 0, 0)

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        for _ in range(MAX_PACKETS_PER_PASS):
            sock = self._sock
            if rc or sock is None or not sock.pending():
                break
            rc = super().loop_read(max_packets)
        return rc

    def _packet_read(self) -> MQTTErrorCode:  # paho 2.x: reads and handles one packet
        # A packet wholly in our buffer is handled without paho's byte-by-byte
        # reads; anything else (a packet split across reads) takes paho's path.
        sock = self._sock
        fresh = self._in_packet["command"] == 0  # paho is not in the middle of a packet
        whole = sock.whole_packet() if fresh and isinstance(sock, BufferedSocket) else None
        if whole is None:
            return super()._packet_read()
        self._in_packet["command"], self._in_packet["packet"] = whole
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet["command"], self._in_packet["packet"] = 0, bytearray()  # as paho resets it
        with self._msgtime_mutex:
            self._last_bytes_received = time_func()
        return rc

    def _handle_publish(self) -> MQTTErrorCode:  # paho 2.x: called by _packet_handle per PUBLISH
        header, packet = self._in_packet["command"], self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        if qos == 2:
            return super()._handle_publish()
        try:
            (topic_length,) = _UINT16.unpack_from(packet, 0)
            end = topic_end = 2 + topic_length
            mid = 0
            if qos:
                (mid,) = _UINT16.unpack_from(packet, end)
                end += 2
            if self._protocol == MQTTv5:  # skip the properties: the bridge reads none
                properties = _variable_byte_integer(packet, end)
                if properties is None:
                    raise MalformedPacket("PUBLISH properties length cut short or over 4 bytes")
                length, end = properties
                end += length
            if end > len(packet):
                raise MalformedPacket("PUBLISH shorter than its headers")
        except (IndexError, struct.error) as exc:
            raise MalformedPacket(f"PUBLISH: {exc}") from exc
        if topic_length == 0:  # MQTT 3.1.1: malformed; MQTT 5: a topic alias (paho's handler decides)
            return super()._handle_publish()
        with memoryview(packet) as view:  # paho's packet is a bytearray: one copy per field
            message = Received(mid, bytes(view[2:topic_end]), bytes(view[end:]), qos,
                               bool(header & 0x01), bool(header & 0x08))
        with self._in_callback_mutex:  # as paho runs its callbacks
            try:
                self.on_message(self, self._userdata, message)
            except Exception as err:  # paho's rule for a raising callback
                self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS
