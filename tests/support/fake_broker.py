"""A scripted MQTT 3.1.1 broker for tests of what a real broker will not do on demand.

Mosquitto refuses a PUBLISH whose topic is not UTF-8 and keeps packet ids
stable within a session; this broker sends whatever the test says (bad topic
bytes, a reused packet id after `session_present=0`) and records the PUBACKs it
receives. One client at a time; each accepted connection is a `Connection`.
"""

import queue
import socket
import threading

from workers.bench.mqtt import _varint, recv_exact


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


class Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pubacks: "queue.Queue[int]" = queue.Queue()
        self.subscribed = threading.Event()
        self.closed = threading.Event()

    def publish(self, mid: int, topic: bytes, payload: bytes) -> None:
        body = len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big") + payload
        self.sock.sendall(_packet(0x32, body))  # PUBLISH, QoS 1

    def close(self) -> None:
        """Drop the connection (the serving thread sees it and ends)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self, session_present: bool) -> None:
        try:
            while True:
                first, body = self._read()
                kind = first & 0xF0
                if kind == 0x10:  # CONNECT
                    self.sock.sendall(b"\x20\x02" + bytes([int(session_present), 0]))
                elif kind == 0x80:  # SUBSCRIBE: grant QoS 1
                    self.sock.sendall(_packet(0x90, body[:2] + b"\x01"))
                    self.subscribed.set()
                elif kind == 0x40:  # PUBACK
                    self.pubacks.put(int.from_bytes(body[:2], "big"))
                elif kind == 0xC0:  # PINGREQ
                    self.sock.sendall(b"\xd0\x00")
                elif kind == 0xE0:  # DISCONNECT
                    return
        except OSError:
            return
        finally:
            self.sock.close()
            self.closed.set()

    def _read(self) -> tuple[int, bytes]:
        first = self._exact(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._exact(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first, self._exact(length)

    def _exact(self, n: int) -> bytes:
        return recv_exact(self.sock, n)


class FakeBroker:
    """Listens on 127.0.0.1; `accept()` returns the next client's Connection once subscribed."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def accept(self, session_present: bool = False, timeout: float = 30) -> Connection:
        self.server.settimeout(timeout)
        sock, _ = self.server.accept()
        sock.settimeout(None)
        conn = Connection(sock)
        threading.Thread(target=conn.serve, args=(session_present,), daemon=True).start()
        assert conn.subscribed.wait(timeout), "the client did not subscribe"
        return conn

    def close(self) -> None:
        self.server.close()
