"""paho with fewer system calls per message: buffered reads, batched PUBACKs.

paho 2.x reads a packet with recv(1) for its type, recv(1) per length byte,
then recv(n) for the rest, and handles one packet per pass of its network
loop (select(), keepalive checks, …). At thousands of small PUBLISHes a
second that was most of the bridge's CPU. paho asks a socket-like object for
`pending()` bytes, as it does for TLS sockets that buffer a record, and then
reads without waiting in select(); `BufferedSocket` uses that contract, and
`BufferedClient` reads every complete packet already buffered in one pass.

Each `ack()` costs paho a wake-up write and one send() of 4 bytes;
`BufferedClient.ack_many` queues a committed batch's PUBACKs as one write.
"""

import struct
from typing import Any

import paho.mqtt.client as mqtt

READ_SIZE = 64 * 1024
MAX_PACKETS_PER_PASS = 1000  # let the loop write PUBACKs and ping in between


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

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0  # TLS: a decrypted record
        return len(self._buffer) - self._pos + inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)  # send, fileno, setblocking, close, …


class BufferedClient(mqtt.Client):
    """paho's client over a `BufferedSocket`, reading all buffered packets per loop pass."""

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
