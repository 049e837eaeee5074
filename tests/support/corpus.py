"""MQTT payloads for tests and benchmarks: valid builders and the invalid corpus.

`invalid_cases(now)` holds one message per SPEC §1 rejection rule, each with
exactly one defect and the reason code `parse_message` must give it.
"""

import base64
import io
import json
import struct
import zlib
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

from PIL import Image

from models.messages import media_payload_limit

DEFAULT_MEDIA_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024  # EDGE_MAX_PAYLOAD_BYTES: telemetry and session
TENANT, FARM, BARN, DEVICE = "tenant-a", "farm-1", "barn-1", "device-1"

EVENT_ID = UUID("0199a0b2-6c1e-7d3a-9f10-2b6f3f0e9a11")
SESSION_ID = UUID("0199a0b2-6c1e-7d3a-9f10-2b6f3f0e9a12")
MEDIA_ID = UUID("0199a0b2-6c1e-7d3a-9f10-2b6f3f0e9a13")

Reading = tuple[str, float, str] | Mapping[str, Any]


def default_max_payload_bytes(media_max_bytes: int) -> int:
    # The media limit (base64 plus envelope room); tests that are not about
    # sizes use it for every kind.
    return media_payload_limit(media_max_bytes)


def topic(
    kind: str,
    *,
    tenant_id: str = TENANT,
    farm_id: str = FARM,
    barn_id: str = BARN,
    device_id: str = DEVICE,
) -> str:
    return f"farmiq/v1/{tenant_id}/{farm_id}/{barn_id}/{device_id}/{kind}"


def timestamp(moment: datetime | str) -> str:
    """RFC 3339 in UTC, lossless; strings pass through (for bad ones)."""
    if isinstance(moment, str):
        return moment
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _encode(body: dict[str, Any], extra: Mapping[str, Any] | None) -> bytes:
    # allow_nan: the corpus needs the JSON literals NaN and Infinity.
    return json.dumps(body | dict(extra or {}), allow_nan=True).encode()


def telemetry_payload(
    event_id: UUID | str,
    occurred_at: datetime | str,
    readings: Iterable[Reading],
    *,
    trace_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "event_id": str(event_id),
        "occurred_at": timestamp(occurred_at),
        "readings": [
            dict(r) if isinstance(r, Mapping) else dict(zip(("metric_type", "metric_value", "unit"), r))
            for r in readings
        ],
    }
    if trace_id is not None:
        body["trace_id"] = trace_id
    return _encode(body, extra)


def session_payload(
    event_id: UUID | str,
    occurred_at: datetime | str,
    session_id: UUID | str,
    action: str,
    *,
    batch_id: str | None = None,
    weight_kg: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "event_id": str(event_id),
        "occurred_at": timestamp(occurred_at),
        "session_id": str(session_id),
        "action": action,
    }
    if batch_id is not None:
        body["batch_id"] = batch_id
    if weight_kg is not None:
        body["weight_kg"] = weight_kg
    return _encode(body, extra)


def media_payload(
    event_id: UUID | str,
    occurred_at: datetime | str,
    image: bytes,
    *,
    mime_type: str = "image/jpeg",
    media_id: UUID | None = None,
    session_id: UUID | None = None,
    captured_at: datetime | str | None = None,
    image_b64: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """`image_b64` overrides the encoding of `image` (for broken base64)."""
    body: dict[str, Any] = {
        "event_id": str(event_id),
        "occurred_at": timestamp(occurred_at),
        "mime_type": mime_type,
        "image_b64": image_b64 if image_b64 is not None else base64.b64encode(image).decode(),
    }
    if media_id is not None:
        body["media_id"] = str(media_id)
    if session_id is not None:
        body["session_id"] = str(session_id)
    if captured_at is not None:
        body["captured_at"] = timestamp(captured_at)
    return _encode(body, extra)


# --- images ------------------------------------------------------------------


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (16, 12)) -> bytes:
    """A real, tiny image made in memory by Pillow."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 180, 60)).save(buffer, format=fmt)
    return buffer.getvalue()


def jpeg_bytes(size: tuple[int, int] = (16, 12)) -> bytes:
    return image_bytes("JPEG", size)


def png_bytes(size: tuple[int, int] = (16, 12)) -> bytes:
    return image_bytes("PNG", size)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming_size(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header claims `width` x `height` pixels.

    The shape of a decompression bomb: a few bytes that would expand to
    gigabytes if anything decoded the pixels.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


# --- the invalid corpus ------------------------------------------------------


def invalid_cases(
    now: datetime,
    *,
    media_max_bytes: int = DEFAULT_MEDIA_MAX_BYTES,
    max_payload_bytes: int | None = None,
) -> list[tuple[str, bytes, str]]:
    """(topic, payload, expected reason) for every SPEC §1 rejection rule.

    Pass the limits the parser runs with; the size cases are built just over
    them (with the defaults, two payloads are about 14 MB each). Timestamps
    are relative to `now`; "far future" is 30 days ahead, beyond any
    configurable skew (at most 7 days).
    """
    if max_payload_bytes is None:
        max_payload_bytes = DEFAULT_MAX_PAYLOAD_BYTES
    ok_at = now - timedelta(minutes=1)
    t_topic, s_topic, m_topic = topic("telemetry"), topic("session"), topic("media")
    good = telemetry_payload(EVENT_ID, ok_at, [("temperature", 23.4, "C")])
    reading = {"metric_type": "temperature", "metric_value": 23.4, "unit": "C"}

    def tele(**changes: Any) -> bytes:
        body = json.loads(good) | changes
        return json.dumps(body, allow_nan=True).encode()

    def reading_with(**changes: Any) -> bytes:
        return tele(readings=[reading | changes])

    def session(action: str = "start", **kwargs: Any) -> bytes:
        return session_payload(EVENT_ID, kwargs.pop("occurred_at", ok_at), SESSION_ID, action, **kwargs)

    def media(image: bytes = b"", **kwargs: Any) -> bytes:
        return media_payload(EVENT_ID, ok_at, image, **kwargs)

    jpeg, png = jpeg_bytes(), png_bytes()
    return [
        # Topic shape (bad_topic).
        ("", good, "bad_topic"),
        ("farmiq/v1/tenant-a/farm-1/barn-1/telemetry", good, "bad_topic"),
        ("farmiq/v1/tenant-a/farm-1/barn-1/device-1/telemetry/extra", good, "bad_topic"),
        ("farmiq/v2/tenant-a/farm-1/barn-1/device-1/telemetry", good, "bad_topic"),
        ("other/v1/tenant-a/farm-1/barn-1/device-1/telemetry", good, "bad_topic"),
        (topic("video"), good, "bad_topic"),
        (topic("Telemetry"), good, "bad_topic"),
        (topic("telemetry", device_id="dev/ice"), good, "bad_topic"),  # `/` in an id
        # Topic ids (bad_id).
        (topic("telemetry", farm_id="."), good, "bad_id"),
        (topic("telemetry", farm_id=".."), good, "bad_id"),
        (topic("telemetry", barn_id="barn 1"), good, "bad_id"),
        (topic("telemetry", barn_id="bärn"), good, "bad_id"),
        (topic("telemetry", tenant_id="t" * 65), good, "bad_id"),
        (topic("telemetry", tenant_id=""), good, "bad_id"),
        (topic("telemetry", tenant_id="-tenant"), good, "bad_id"),
        (topic("telemetry", device_id="device\n"), good, "bad_id"),
        (topic("telemetry", device_id="+"), good, "bad_id"),
        # Not a JSON object (invalid_json).
        (t_topic, b"", "invalid_json"),
        (t_topic, b"not json", "invalid_json"),
        (t_topic, good[:-1], "invalid_json"),
        (t_topic, b"\xff\xfe" + good, "invalid_json"),
        (t_topic, good.replace(b"temperature", b"temp\xe9rature"), "invalid_json"),
        (t_topic, b"[" + good + b"]", "invalid_json"),
        (t_topic, b'"a string"', "invalid_json"),
        (t_topic, b"null", "invalid_json"),
        # Envelope (schema).
        (t_topic, tele(extra_field=1), "schema"),
        (t_topic, tele(tenant_id=TENANT), "schema"),
        (t_topic, tele(device_id=DEVICE), "schema"),
        (t_topic, tele(kind="telemetry"), "schema"),
        (t_topic, tele(event_id="not-a-uuid"), "schema"),
        (t_topic, tele(event_id=None), "schema"),
        (t_topic, json.dumps({k: v for k, v in json.loads(good).items() if k != "event_id"}).encode(), "schema"),
        (t_topic, tele(occurred_at=ok_at.replace(tzinfo=None).isoformat()), "schema"),  # naive
        (t_topic, tele(occurred_at=int(ok_at.timestamp())), "schema"),
        (t_topic, tele(occurred_at=str(int(ok_at.timestamp()))), "schema"),
        (t_topic, tele(occurred_at="not a time"), "schema"),
        (t_topic, tele(trace_id="x" * 65), "schema"),
        (t_topic, tele(trace_id="line\nbreak"), "schema"),
        # Clock (clock_skew).
        (t_topic, tele(occurred_at=timestamp(now + timedelta(days=30))), "clock_skew"),
        (t_topic, tele(occurred_at="2019-12-31T23:59:59.999Z"), "clock_skew"),
        (t_topic, tele(occurred_at="1970-01-01T00:00:00Z"), "clock_skew"),
        # Telemetry (schema).
        (t_topic, tele(readings=[]), "schema"),
        (t_topic, tele(readings=[reading] * 101), "schema"),
        (t_topic, tele(readings=reading), "schema"),
        (t_topic, reading_with(metric_value=float("nan")), "schema"),  # JSON literal NaN
        (t_topic, reading_with(metric_value=float("inf")), "schema"),  # JSON literal Infinity
        (t_topic, reading_with(metric_value=float("-inf")), "schema"),
        (t_topic, reading_with(metric_value="NaN"), "schema"),
        (t_topic, reading_with(metric_value="23.4"), "schema"),
        (t_topic, reading_with(metric_value=True), "schema"),
        (t_topic, reading_with(metric_type="temp erature"), "schema"),
        (t_topic, reading_with(metric_type=""), "schema"),
        (t_topic, reading_with(metric_type="m" * 33), "schema"),
        (t_topic, reading_with(unit="°C"), "schema"),
        (t_topic, reading_with(extra=1), "schema"),
        # Session (schema, bad_id).
        (s_topic, session("begin"), "schema"),
        (s_topic, session(weight_kg=1001), "schema"),
        (s_topic, session(weight_kg=-0.5), "schema"),
        (s_topic, session(weight_kg=float("nan")), "schema"),
        (s_topic, session(extra={"session_id": "not-a-uuid"}), "schema"),
        (s_topic, session(extra={"barn_id": BARN}), "schema"),
        (s_topic, session(batch_id="batch 11"), "bad_id"),
        (s_topic, session(batch_id="../batch"), "bad_id"),
        (s_topic, session(batch_id="b" * 65), "bad_id"),
        (s_topic, session("finalize", occurred_at=now + timedelta(days=30)), "clock_skew"),
        # Media (schema, clock_skew, bad_image, too_large).
        (m_topic, media(jpeg, mime_type="image/gif"), "schema"),
        (m_topic, media(jpeg, media_id="not-a-uuid"), "schema"),  # type: ignore[arg-type]
        (m_topic, media(jpeg, extra={"image_b64": 42}), "schema"),
        (m_topic, media(jpeg, captured_at=ok_at.replace(tzinfo=None).isoformat()), "schema"),
        (m_topic, media(jpeg, captured_at=now + timedelta(days=30)), "clock_skew"),
        (m_topic, media(jpeg, image_b64="not base64!"), "bad_image"),
        (m_topic, media(jpeg, image_b64=base64.b64encode(jpeg).decode()[:-2]), "bad_image"),
        (m_topic, media(b"just some bytes, not an image"), "bad_image"),
        (m_topic, media(b""), "bad_image"),
        (m_topic, media(png, mime_type="image/jpeg"), "bad_image"),  # wrong mime
        (m_topic, media(jpeg, mime_type="image/png"), "bad_image"),
        (m_topic, media(jpeg[: len(jpeg) // 2]), "bad_image"),  # truncated
        (m_topic, media(png[:-20], mime_type="image/png"), "bad_image"),  # truncated
        (m_topic, media(png_claiming_size(10_000, 6_000), mime_type="image/png"), "too_large"),
        (m_topic, media(png_claiming_size(10_000, 10_000), mime_type="image/png"), "too_large"),
        (m_topic, media(png_claiming_size(20_000, 20_000), mime_type="image/png"), "too_large"),
        (m_topic, media(bytes(media_max_bytes + 1)), "too_large"),
        (t_topic, b" " * (max_payload_bytes + 1 - len(good)) + good, "too_large"),
    ]
