"""The queue form of ingress events: validated once, at the bridge.

The bridge validates every MQTT message (models/messages.py) and enqueues
the valid ones in one `ingest` message; the ingest actor trusts them and does
not validate again. Telemetry, the hot path, travels as a compact row of
already normalized values (UTC timestamp, canonical event id, float values):

    ["telemetry", tenant_id, farm_id, barn_id, device_id, event_id,
     occurred_at, trace_id, [[metric_type, metric_value, unit], ...],
     raw, raw_size_bytes]

Sessions and frames (rare) travel as their event's JSON object and are
validated again by the actor (cheap at their rate, and the session state
machine wants the typed model). A JSON object whose "kind" is telemetry
(queued before compact rows existed) is still accepted.

Telemetry and sessions carry the payload as received (the first 64 KiB, and
`raw_size_bytes`: the full length), so a dead letter the actor writes
(session_conflict, processing_failed) keeps the device's bytes (SPEC §1.5).
The bridge puts a telemetry payload beside the message, in the queue row's
`received` bytes, and `raw` is its offset there (read only for a dead
letter, so never parsed or decoded on the hot path); elsewhere `raw` is the
payload in base64, as a session's `raw_b64` is. A frame carries none: its
bytes travel once, to the media volume, and the actor's only work on it is
a hand-off that no frame's data can fail (actors/ingest.py).

Pure: no I/O.
"""

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.ingress_dead_letters import MAX_DEAD_LETTER_PAYLOAD
from models.messages import (INGRESS_EVENTS, MediaEvent, SessionEvent, TelemetryEvent, TelemetryPayload,
                             TopicIds)

TELEMETRY = "telemetry"


def raw_fields(payload: bytes) -> tuple[str, int]:
    """(base64 of the first 64 KiB, full length): what a dead letter keeps."""
    return base64.b64encode(payload[:MAX_DEAD_LETTER_PAYLOAD]).decode("ascii"), len(payload)


def queue_form(event: Any, payload: bytes, dumped: dict | None = None) -> list | dict:
    """What the bridge enqueues for `event`, parsed from `payload`.

    `dumped` is the event's JSON object when the caller made it already
    (a frame, whose bytes the bridge spooled instead).
    """
    if isinstance(event, MediaEvent):
        return dumped if dumped is not None else event.model_dump(mode="json")
    if isinstance(event, TelemetryEvent):
        return telemetry_row(event, event, payload)
    form = dumped if dumped is not None else event.model_dump(mode="json")
    form["raw_b64"], form["raw_size_bytes"] = raw_fields(payload)
    return form


def telemetry_row(ids: TopicIds | TelemetryEvent, fields: TelemetryPayload | TelemetryEvent,
                  payload: bytes, received: bytearray | None = None) -> list:
    """A telemetry message's compact row, from its topic ids and validated fields
    (the bridge passes `validate_message`'s result: no event model is built).

    With `received` (the bytes that go beside the message), the payload is
    appended there and the row names its offset; without, it carries base64.
    """
    if received is None:
        raw, size = raw_fields(payload)
    else:
        raw, size = len(received), len(payload)
        received += payload[:MAX_DEAD_LETTER_PAYLOAD]
    return [TELEMETRY, ids.tenant_id, ids.farm_id, ids.barn_id, ids.device_id, str(fields.event_id),
            fields.occurred_at.isoformat(), fields.trace_id,
            [[r.metric_type, float(r.metric_value), r.unit] for r in fields.readings], raw, size]


@dataclass(slots=True)
class QueuedTelemetry:
    """A telemetry event as the ingest actor applies it (values already normalized)."""

    tenant_id: str
    farm_id: str
    barn_id: str
    device_id: str
    event_id: str  # canonical UUID text
    occurred_at: str  # ISO 8601 in UTC (+00:00)
    trace_id: str | None
    readings: list  # [[metric_type, metric_value (float), unit], ...]
    raw_b64: str | None = None
    raw_size_bytes: int | None = None
    raw_at: int | None = None  # offset of the payload in its message's received bytes
    kind: str = TELEMETRY

    @classmethod
    def of(cls, e: TelemetryEvent) -> "QueuedTelemetry":
        values = telemetry_row(e, e, b"")[1:-2]  # the row without its received bytes
        if e.raw_b64 is not None:
            return cls(*values, e.raw_b64, e.raw_size_bytes)
        # Queued by an older bridge: its normalized JSON is all there is.
        return cls(*values, *raw_fields(_normalized_json(e)))


Queued = QueuedTelemetry | SessionEvent | MediaEvent


def decode(items: list) -> list[Queued]:
    """The events of an `ingest` message, in order; pydantic's ValidationError if
    an event object is invalid (a compact row is trusted: the bridge made it)."""
    objects = [item for item in items if isinstance(item, dict)]
    validated = iter(INGRESS_EVENTS.validate_python(objects)) if objects else iter(())
    events: list[Queued] = []
    for item in items:
        if isinstance(item, dict):
            event = next(validated)
            events.append(QueuedTelemetry.of(event) if isinstance(event, TelemetryEvent) else event)
        elif isinstance(item[9], int):  # the payload is beside the message, at this offset
            events.append(QueuedTelemetry(*item[1:9], None, item[10], item[9]))
        else:
            events.append(QueuedTelemetry(*item[1:]))
    return events


def received_bytes(e: Queued, read_received: Callable[[int, int], bytes | None] | None = None
                   ) -> tuple[bytes, int]:
    """The payload as the device sent it (first 64 KiB) and its full length.

    `read_received(offset, length)` reads the message's received bytes, for
    an event whose payload is there (`raw_at`).
    """
    raw_at = getattr(e, "raw_at", None)
    if raw_at is not None and read_received is not None and e.raw_size_bytes is not None:
        payload = read_received(raw_at, min(e.raw_size_bytes, MAX_DEAD_LETTER_PAYLOAD))
        if payload is not None:
            return payload, e.raw_size_bytes
    if e.raw_b64 is None:  # queued by an older bridge: its normalized JSON is all there is
        payload = _normalized_json(e)
        return payload, len(payload)
    payload = base64.b64decode(e.raw_b64)
    return payload, e.raw_size_bytes if e.raw_size_bytes is not None else len(payload)


def _normalized_json(e: Any) -> bytes:
    if isinstance(e, QueuedTelemetry):  # its received bytes could not be read
        return json.dumps({"event_id": e.event_id, "occurred_at": e.occurred_at, "trace_id": e.trace_id,
                           "readings": [{"metric_type": t, "metric_value": v, "unit": u}
                                        for t, v, u in e.readings]}).encode()
    return e.model_dump_json(exclude={"raw_b64", "raw_size_bytes"}).encode()
