"""BufferedClient's own PUBLISH decoding gives on_message what paho's would."""

import socket
import struct

import pytest
from paho.mqtt._packet import decode_publish
from paho.mqtt.client import PUBLISH, MQTTv5, MQTTv311
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from workers.mqtt_socket import BufferedClient, BufferedSocket

TOPIC = "farmiq/tenant-a/farm-1/barn-2/scale-07/telemetry".encode()


def publish_packet(protocol: int, qos: int, payload: bytes, *, mid: int = 4242) -> bytearray:
    variable = struct.pack("!H", len(TOPIC)) + TOPIC + (struct.pack("!H", mid) if qos else b"")
    if protocol == MQTTv5:
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = 60
        props.UserProperty = ("k", "v" * 200)  # a properties length of two bytes
        variable += props.pack()
    return bytearray(variable + payload)  # paho accumulates a packet in a bytearray


def handle(protocol: int, header: int, packet: bytearray) -> list:
    received = []
    client = BufferedClient(CallbackAPIVersion.VERSION2, protocol=protocol)
    client.manual_ack_set(True)
    client.on_message = lambda _client, _userdata, message: received.append(message)
    client._in_packet = {"command": header, "packet": packet}
    assert client._handle_publish() == MQTTErrorCode.MQTT_ERR_SUCCESS
    return received


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("retain", [False, True])
def test_a_publish_reaches_on_message_as_paho_decodes_it(protocol: int, qos: int, retain: bool) -> None:
    payload = b'{"event_id": "x", "readings": []}\x00\xff'
    header = PUBLISH | (qos << 1) | int(retain)
    packet = publish_packet(protocol, qos, payload)
    paho = decode_publish(header, bytearray(packet), protocol)
    [message] = handle(protocol, header, packet)
    assert (message.mid, message._topic, message.payload, message.qos, message.retain, message.dup) == \
        (paho.mid, paho.topic, paho.payload, paho.qos, paho.retain, paho.dup)
    assert type(message.payload) is bytes and message.topic == TOPIC.decode()


@pytest.mark.parametrize("protocol", [MQTTv311, MQTTv5])
def test_a_truncated_publish_is_malformed(protocol: int) -> None:
    packet = publish_packet(protocol, 1, b"")
    cut = 2 + len(TOPIC) + 1  # inside the packet id
    with pytest.raises(MalformedPacket):
        handle(protocol, PUBLISH | 0x02, packet[:cut])


def test_a_too_short_properties_length_is_malformed() -> None:
    packet = publish_packet(MQTTv5, 1, b"")[:2 + len(TOPIC) + 2] + b"\x7f"  # 127 bytes promised, none there
    with pytest.raises(MalformedPacket):
        handle(MQTTv5, PUBLISH | 0x02, packet)


def frame(header: int, body: bytes) -> bytes:
    """An MQTT packet: fixed header byte, Remaining Length, body."""
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([header]) + bytes(encoded) + body


def test_whole_packets_are_read_in_one_piece_and_a_split_one_by_paho() -> None:
    payloads = [b"a" * 10, b"b" * 300, b"c" * 20_000, b"d"]  # Remaining Length of 1, 2 and 3 bytes
    wire = b"".join(frame(PUBLISH | 0x02, publish_packet(MQTTv5, 1, p, mid=n + 1))
                    for n, p in enumerate(payloads))
    split = len(wire) - 5_000  # inside the third packet
    received = []
    client = BufferedClient(CallbackAPIVersion.VERSION2, protocol=MQTTv5)
    client.manual_ack_set(True)
    client.on_message = lambda _client, _userdata, message: received.append((message.mid, message.payload))
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        client._sock = BufferedSocket(a)
        b.sendall(wire[:split])
        assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert received == [(1, payloads[0]), (2, payloads[1])]  # the third is not all here
        b.sendall(wire[split:])
        while client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS and len(received) < 4:
            pass
        assert received == [(n + 1, p) for n, p in enumerate(payloads)]
        assert client._in_packet["command"] == 0 and client._sock.pending() == 0
    finally:
        client._sock = None
        a.close()
        b.close()
