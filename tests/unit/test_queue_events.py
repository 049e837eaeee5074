"""The queue form of ingress events (models/queue_events.py): what the bridge
enqueues is what the ingest actor applies, and the received bytes travel with it."""

import json
import socket
import uuid
from datetime import datetime, timedelta, timezone

from models.ingress_dead_letters import MAX_DEAD_LETTER_PAYLOAD
from models.messages import SessionEvent, TelemetryEvent, event_of, parse_message, validate_message
from models.queue_events import QueuedTelemetry, decode, queue_form, received_bytes, telemetry_row
from tests.support import corpus
from workers.mqtt_socket import BufferedSocket

NOW = datetime.now(timezone.utc)


def parse(topic: str, payload: bytes):  # noqa: ANN201
    return parse_message(topic, payload, now=NOW, max_clock_skew=timedelta(minutes=5),
                         media_max_bytes=1024 * 1024, max_payload_bytes=256 * 1024)


def through_the_queue(items: list) -> list:
    return json.loads(json.dumps(items))  # the jsonb round trip, near enough


def test_telemetry_row_is_normalized_and_keeps_the_bytes_received() -> None:
    at = NOW.astimezone(timezone(timedelta(hours=7)))  # an offset: stored in UTC
    payload = (b'{ "readings": [{"unit": "C", "metric_value": 7, "metric_type": "t"}],\n "occurred_at": "%s",'
               b' "event_id": "%s", "trace_id": "tr-1" }' % (at.isoformat().encode(),
                                                             str(uuid.uuid4()).upper().encode()))
    event = parse(corpus.topic("telemetry"), payload)
    [queued] = decode(through_the_queue([queue_form(event, payload)]))
    assert isinstance(queued, QueuedTelemetry)
    assert queued.event_id == str(event.event_id)  # canonical: lower case
    assert queued.occurred_at == NOW.isoformat() and queued.occurred_at.endswith("+00:00")
    assert queued.readings == [["t", 7.0, "C"]] and type(queued.readings[0][1]) is float
    assert (queued.tenant_id, queued.device_id, queued.trace_id) == (corpus.TENANT, corpus.DEVICE, "tr-1")
    assert received_bytes(queued) == (payload, len(payload))


def test_sessions_travel_as_events_with_their_bytes() -> None:
    payload = corpus.session_payload(uuid.uuid4(), NOW, uuid.uuid4(), "start", weight_kg=2.5)
    [queued] = decode(through_the_queue([queue_form(parse(corpus.topic("session"), payload), payload)]))
    assert isinstance(queued, SessionEvent) and queued.weight_kg == 2.5
    assert received_bytes(queued) == (payload, len(payload))


def test_a_long_payload_keeps_its_first_64_kib_and_full_length() -> None:
    payload = corpus.telemetry_payload(uuid.uuid4(), NOW, [("t", 1.0, "C")])
    payload = b"{" + b" " * (MAX_DEAD_LETTER_PAYLOAD + 10) + payload[1:]  # whitespace is valid JSON
    [queued] = decode(through_the_queue([queue_form(parse(corpus.topic("telemetry"), payload), payload)]))
    assert received_bytes(queued) == (payload[:MAX_DEAD_LETTER_PAYLOAD], len(payload))


def test_events_queued_as_objects_are_still_applied() -> None:
    payload = corpus.telemetry_payload(uuid.uuid4(), NOW, [("t", 1.5, "C")])
    event = parse(corpus.topic("telemetry"), payload)
    [queued] = decode(through_the_queue([event.model_dump(mode="json")]))
    assert isinstance(queued, QueuedTelemetry) and queued.readings == [["t", 1.5, "C"]]
    assert isinstance(event, TelemetryEvent)


def test_buffered_socket_reads_ahead_and_reports_what_it_holds() -> None:
    a, b = socket.socketpair()
    try:
        b.sendall(b"\x30\x03abc\x30\x01z")
        reader = BufferedSocket(a)
        assert reader.recv(1) == b"\x30" and reader.pending() == 7
        assert reader.recv(1) == b"\x03" and reader.recv(3) == b"abc"
        assert reader.recv(1) == b"\x30" and reader.recv(5) == b"\x01z"  # a short read, as from a socket
        assert reader.pending() == 0
        a.setblocking(False)
        try:
            reader.recv(1)
            raise AssertionError("expected BlockingIOError")
        except BlockingIOError:
            pass
        assert reader.fileno() == a.fileno()  # everything else is the socket's
    finally:
        a.close()
        b.close()


def test_the_bridge_row_equals_the_row_of_the_event() -> None:
    payload = corpus.telemetry_payload(uuid.uuid4(), NOW, [("t", 1.5, "C"), ("h", 60, "%")], trace_id="x")
    limits = {"now": NOW, "max_clock_skew": timedelta(minutes=5), "media_max_bytes": 1024 * 1024,
              "max_payload_bytes": 256 * 1024}
    ids, validated = validate_message(corpus.topic("telemetry"), payload, **limits)
    assert telemetry_row(ids, validated, payload) == queue_form(event_of(ids, validated), payload)
