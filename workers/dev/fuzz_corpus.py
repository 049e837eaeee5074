"""Fuzz corpus: bad MQTT messages, each with a category and its SPEC reason, plus valid traffic.

Deterministic: the same seed, count, `now` and `Limits` give the same bytes.
Used by `farmiq-edge bench fuzz` (workers/dev/fuzz_run.py), tests/e2e/test_fuzz.py
and the unit tests that check every case against `models.messages.parse_message`.

Each bad message carries a marker `fz_NNNNNNN` (its sequence number): as the
topic's device id, or, where the topic cannot hold it, at the front of the
payload. A dead letter keeps the topic and the first 64 KiB of the payload, so
every dead letter maps back to exactly one case (`markers_in`).

`Case.expected` is what SPEC §1 says (the table in this module, one set of
acceptable reason codes per sub-case). `Case.pending` names the sub-cases
where the code on main before issue 12's SPEC changes disagrees with SPEC
(|metric_value| > 1e15 and the per-kind payload limit are accepted there);
`Case.refused` marks topics Mosquitto 2.0 itself refuses (not UTF-8, control
characters, wildcards): it closes the publisher's connection without a PUBACK
and never delivers them, so they can never reach the bridge.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import Any

MARKER_RE = re.compile(rb"fz_(\d{7})")
TENANT, FARM, BARN = "fuzz-tenant", "fuzz-farm", "fuzz-barn"
EARLIEST = datetime(2020, 1, 1, tzinfo=timezone.utc)
MAX_PIXELS = 50_000_000
METRIC_VALUE_BOUND = 1e15

# Sub-cases where main (before the issue 12 limits) accepts what SPEC rejects.
PENDING_METRIC_BOUND = "SPEC §1.2 |metric_value| <= 1e15: accepted before the issue 12 limits"
PENDING_KIND_LIMIT = ("SPEC §1.1 per-kind payload limit: before the issue 12 limits one limit for "
                      "every kind (accepted, or another reason)")


def marker(seq: int) -> str:
    return f"fz_{seq:07d}"


def markers_in(topic: bytes, payload: bytes) -> set[int]:
    """Sequence numbers of the markers in a (dead-lettered) topic and payload."""
    return {int(m) for m in MARKER_RE.findall(topic)} | {int(m) for m in MARKER_RE.findall(payload)}


@dataclass(frozen=True)
class Limits:
    """The ingress limits the system under test runs with (EDGE_* settings)."""

    media_max_bytes: int = 64 * 1024        # EDGE_MEDIA_MAX_BYTES
    max_payload_bytes: int = 32 * 1024      # EDGE_MAX_PAYLOAD_BYTES (telemetry, session)
    max_clock_skew: timedelta = timedelta(hours=24)

    @property
    def media_payload_bytes(self) -> int:
        """SPEC §1.1: a frame of media_max_bytes in base64, plus 64 KiB."""
        return 4 * -(-self.media_max_bytes // 3) + 64 * 1024

    @property
    def single_limit_bytes(self) -> int:
        """The one limit for every kind before issue 12 (main's Settings.max_payload_bytes)."""
        return self.media_max_bytes * 4 // 3 + 64 * 1024

    def kind_limit(self, kind: str) -> int:
        return self.media_payload_bytes if kind == "media" else self.max_payload_bytes

    def env(self) -> dict[str, str]:
        seconds = int(self.max_clock_skew.total_seconds())
        return {"EDGE_MEDIA_MAX_BYTES": str(self.media_max_bytes),
                "EDGE_MAX_PAYLOAD_BYTES": str(self.max_payload_bytes),
                "EDGE_MAX_CLOCK_SKEW": f"PT{seconds}S"}


@dataclass(frozen=True)
class Case:
    seq: int
    category: str
    topic: bytes
    payload: bytes
    expected: frozenset[str]          # acceptable reason codes per SPEC
    event_id: str | None = None       # the event id in the payload, if it has one
    pending: str = ""                 # non-empty: main disagrees with SPEC here (see module doc)

    @property
    def marker(self) -> str:
        return marker(self.seq)

    @cached_property
    def refused(self) -> bool:
        return broker_refuses(self.topic)


@dataclass(frozen=True)
class Valid:
    """A valid message and what it must produce."""

    topic: bytes
    payload: bytes
    kind: str
    event_id: str
    device_id: str
    occurred_at: datetime
    readings: int = 0                       # telemetry rows
    outbox_type: str | None = None          # the sync_outbox event it causes (ingest)


# --- topics --------------------------------------------------------------------

_BAD_CODEPOINTS = re.compile("[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef\ufffe\uffff+#]")


MOSQUITTO_MAX_TOPIC_LEVELS = 200  # TOPIC_HIERARCHY_LIMIT in Mosquitto 2.0


def broker_refuses(topic: bytes) -> bool:
    """Mosquitto 2.0's check on a PUBLISH topic (MQTT 3.1.1 §1.5.3, §4.7): malformed
    UTF-8, U+0000..U+001F, U+007F..U+009F, non-characters, wildcards, empty, or
    more than 200 levels."""
    try:
        text = topic.decode("utf-8")
    except UnicodeDecodeError:
        return True
    nonchar = any((ord(c) & 0xFFFF) in (0xFFFE, 0xFFFF) for c in text)
    return (not text or nonchar or _BAD_CODEPOINTS.search(text) is not None or len(topic) > 65535
            or text.count("/") >= MOSQUITTO_MAX_TOPIC_LEVELS)


def topic(kind: str, device_id: str, *, tenant: str = TENANT, farm: str = FARM,
          barn: str = BARN) -> bytes:
    return f"farmiq/v1/{tenant}/{farm}/{barn}/{device_id}/{kind}".encode()


# --- valid bodies ----------------------------------------------------------------


def _ts(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def encode(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _image(fmt: str, size: tuple[int, int] = (16, 12)) -> bytes:
    from PIL import Image  # noqa: PLC0415 - only the media cases need Pillow
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 180, 60)).save(buffer, format=fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    at = jpeg.find(b"\xff\xc0")  # SOF0: length(2) precision(1) height(2) width(2)
    patched = bytearray(jpeg)
    patched[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(patched)


class _Images:
    """Images made once per corpus (Pillow, in memory)."""

    def __init__(self) -> None:
        self.jpeg, self.png = _image("JPEG"), _image("PNG")
        self.others = {fmt: _image(fmt) for fmt in ("GIF", "BMP", "WEBP", "TIFF")}
        self.zlib_bomb = zlib.compress(b"\x00" * 8_000_000, 9)  # 8 MB of pixels in ~8 KB


def _reading(rng: random.Random) -> dict[str, Any]:
    metric, unit = rng.choice([("temperature", "C"), ("humidity", "%"), ("co2", "ppm"),
                               ("nh3", "ppm"), ("weight", "kg")])
    return {"metric_type": metric, "metric_value": round(rng.uniform(-40, 1000), 3), "unit": unit}


def _ok_time(rng: random.Random, now: datetime) -> datetime:
    return now - timedelta(seconds=rng.randint(1, 3600), microseconds=rng.randint(0, 999_999))


def telemetry_body(rng: random.Random, now: datetime, readings: int | None = None) -> dict[str, Any]:
    n = readings if readings is not None else rng.randint(1, 5)
    return {"event_id": _uuid(rng), "occurred_at": _ts(_ok_time(rng, now)),
            "readings": [_reading(rng) for _ in range(n)]}


def session_body(rng: random.Random, now: datetime, action: str = "start") -> dict[str, Any]:
    body = {"event_id": _uuid(rng), "occurred_at": _ts(_ok_time(rng, now)),
            "session_id": _uuid(rng), "action": action,
            "weight_kg": round(rng.uniform(0.5, 3.0), 3)}
    if action == "start":
        body["batch_id"] = f"batch-{rng.randint(1, 99)}"
    return body


def media_body(rng: random.Random, now: datetime, images: _Images) -> dict[str, Any]:
    mime, data = rng.choice([("image/jpeg", images.jpeg), ("image/png", images.png)])
    body = {"event_id": _uuid(rng), "occurred_at": _ts(_ok_time(rng, now)),
            "mime_type": mime, "image_b64": base64.b64encode(data).decode()}
    if rng.random() < 0.5:
        body["session_id"] = _uuid(rng)
    return body


# --- the table: one function per category ----------------------------------------
#
# A maker gets (rng, ctx) and returns (kind, body_or_bytes, expected reasons,
# extra) where extra may set "topic" (bytes, with "{m}" for the marker),
# "pending" or "event_id". A dict body is JSON-encoded; bytes go as they are.


@dataclass
class Context:
    now: datetime
    limits: Limits
    images: _Images = field(default_factory=_Images)

    def body(self, rng: random.Random, kind: str | None = None) -> tuple[str, dict[str, Any]]:
        kind = kind or rng.choice(["telemetry", "telemetry", "session", "media"])
        if kind == "telemetry":
            return kind, telemetry_body(rng, self.now)
        if kind == "session":
            return kind, session_body(rng, self.now, rng.choice(["start", "finalize", "cancel"]))
        return kind, media_body(rng, self.now, self.images)


Made = tuple[str, Any, frozenset[str], dict[str, Any]]
INVALID_JSON, SCHEMA = frozenset({"invalid_json"}), frozenset({"schema"})
CLOCK, BAD_IMAGE = frozenset({"clock_skew"}), frozenset({"bad_image"})
TOO_LARGE, BAD_ID = frozenset({"too_large"}), frozenset({"bad_id"})


def _malformed_json(rng: random.Random, ctx: Context) -> Made:
    kind, body = ctx.body(rng)
    text = json.dumps(body)
    breaks: list[Callable[[], str]] = [
        lambda: text.replace('"', "'"),                                   # single quotes
        lambda: text[:-1] + ",}",                                         # trailing comma
        lambda: "/* c */" + text,                                         # comment
        lambda: text.replace('"event_id"', "event_id", 1),                # unquoted key
        lambda: str(body),                                                # a Python repr
        lambda: text + rng.choice(["x", "}", "{}", text, "\x00", ";", "]"]),  # trailing garbage
        lambda: text.replace(":", " ", 1),                                # missing colon
        lambda: text.replace(", ", " ", 1),                               # missing comma
        lambda: text.replace('": ', '":: ', 1),
        lambda: "".join(rng.choice('{}[]:,"\\ abc01-.eE') for _ in range(rng.randint(0, 200))),
        lambda: rng.choice(["", " ", "{", "}", "{]", "nul", "tru", "NaN", "{\"a\"}", "{,}", "\ufeff{}"]),
        lambda: text.replace("{", "{\"a\":01,", 1),                       # leading zero
        lambda: text.replace("{", "{\"a\":\"\\x41\",", 1),                # bad escape
        lambda: text.replace("{", "{\"a\":\"tab\there\",", 1),            # raw control char
    ]
    raw = rng.choice(breaks)()
    if rng.random() < 0.1:  # JSON, but not an object
        raw = json.dumps(rng.choice([[body], "text", 42, None, True, [], 1.5]))
    elif _is_object(raw):  # random garbage can spell "{}"
        raw += ","
    return kind, raw.encode(), INVALID_JSON, {"event_id": body["event_id"]}


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _truncated_json(rng: random.Random, ctx: Context) -> Made:
    kind, body = ctx.body(rng)
    raw = encode(body)
    return kind, raw[:rng.randrange(len(raw))], INVALID_JSON, {"event_id": body["event_id"]}


def _deep_nesting(rng: random.Random, ctx: Context) -> Made:
    kind, body = ctx.body(rng)
    depth = rng.choice([rng.randint(2, 60), rng.randint(300, 4000)])
    open_, close = rng.choice([("[", "]"), ('{"a":', "}")])
    nest = open_ * depth + "1" + close * depth
    where = rng.choice(["field", "top", "value"])
    if where == "top":
        raw = nest.encode()
    else:
        key = "nested" if where == "field" else next(k for k in body if k not in ("event_id",))
        body[key] = "@@NEST@@"
        raw = encode(body).replace(b'"@@NEST@@"', nest.encode())
    # Which one comes first is the JSON parser's business: too deep for it
    # (invalid_json) or a wrong shape (schema).
    return kind, raw, INVALID_JSON | SCHEMA, {"event_id": body["event_id"]}


def _huge_numbers(rng: random.Random, ctx: Context) -> Made:
    variant = rng.randrange(6)
    if variant <= 1:  # finite, beyond SPEC's 1e15 bound
        kind, body = ctx.body(rng, "telemetry")
        literal = rng.choice([f"{rng.uniform(1.0001, 9.9) * 10 ** rng.randint(15, 307):.6e}",
                              str(rng.randint(10 ** 15 + 1, 10 ** 30)), "1e16", "1.7976931348623157e308"])
        if rng.random() < 0.5:
            literal = "-" + literal
        body["readings"][rng.randrange(len(body["readings"]))]["metric_value"] = "@@V@@"
        raw = encode(body).replace(b'"@@V@@"', literal.encode())
        return kind, raw, SCHEMA, {"event_id": body["event_id"], "pending": PENDING_METRIC_BOUND}
    if variant == 2:  # not even a finite double
        kind, body = ctx.body(rng, "telemetry")
        literal = rng.choice(["1e400", "-1e999", "9" * rng.randint(310, 2000)])
        body["readings"][0]["metric_value"] = "@@V@@"
        return kind, encode(body).replace(b'"@@V@@"', literal.encode()), SCHEMA, {"event_id": body["event_id"]}
    if variant == 3:
        kind, body = ctx.body(rng, "session")
        body["weight_kg"] = rng.choice([1e300, 1000.0001, -1e-9, 10 ** 20, -1e300])
        return kind, encode(body), SCHEMA, {"event_id": body["event_id"]}
    kind, body = ctx.body(rng)
    field_ = rng.choice(["event_id", "occurred_at"] + (["session_id"] if kind == "session" else []))
    body[field_] = rng.choice([1e300, 10 ** 40, -1e308, 1e20])
    return kind, encode(body), SCHEMA, {"event_id": None}


def _non_finite(rng: random.Random, ctx: Context) -> Made:
    literal = rng.choice(["NaN", "Infinity", "-Infinity", '"NaN"', '"Infinity"', '"inf"', '"-inf"'])
    kind, body = ctx.body(rng, rng.choice(["telemetry", "telemetry", "session"]))
    if kind == "telemetry":
        body["readings"][rng.randrange(len(body["readings"]))]["metric_value"] = "@@V@@"
    else:
        body["weight_kg"] = "@@V@@"
    return kind, encode(body).replace(b'"@@V@@"', literal.encode()), SCHEMA, {"event_id": body["event_id"]}


_WRONG = [0, 1.5, -7, True, False, [], [1], {}, {"a": 1}, "", "x", "null"]
# Wrong types per field (`None` is only wrong for required fields).
_FIELDS = {
    "telemetry": {"event_id": True, "occurred_at": True, "readings": True, "trace_id": False},
    "session": {"event_id": True, "occurred_at": True, "session_id": True, "action": True,
                "weight_kg": False, "trace_id": False},
    "media": {"event_id": True, "occurred_at": True, "mime_type": True, "image_b64": True,
              "media_id": False, "session_id": False, "captured_at": False},
}
_WRONG_FIELD = {
    "action": ["START", "begin", " start", "finalise"],
    "mime_type": ["image/gif", "image/jpg", "IMAGE/JPEG", "image/jpeg; q=1"],
    "event_id": ["not-a-uuid", "0199a0b2-6c1e-7d3a-9f10", "{}", "g" * 32],
    "session_id": ["not-a-uuid", "0199a0b2-6c1e-7d3a-9f10-", "0" * 37],
    "media_id": ["not-a-uuid", "urn:x"],
    "occurred_at": ["yesterday", "2026-13-01T00:00:00Z"],
    "captured_at": ["tomorrow", "2026-02-30T00:00:00Z"],
    "trace_id": ["t" * 65, "line\nbreak", "nul\x00", "del\x7f"],
    "readings": [[1, 2], ["x"], [[]], [None]],
}
# [False]: metric_type / unit; [True]: metric_value.
_WRONG_READING = ([None, 0, 1.5, True, [], {}, "", "a b", "°C", "m" * 33, "a\tb"],
                  [None, True, False, [], {}, "1.5", "23", "NaN", [1.5], {"v": 1}])


def _wrong_types(rng: random.Random, ctx: Context) -> Made:
    kind, body = ctx.body(rng)
    if kind == "telemetry" and rng.random() < 0.4:  # inside a reading
        reading = body["readings"][rng.randrange(len(body["readings"]))]
        key = rng.choice(["metric_type", "metric_value", "unit"])
        reading[key] = rng.choice(_WRONG_READING[key == "metric_value"])
        return kind, encode(body), SCHEMA, {"event_id": body["event_id"]}
    key, required = rng.choice(list(_FIELDS[kind].items()))
    choices = _WRONG_FIELD.get(key, []) + [v for v in _WRONG + ([None] if required else [])
                                           if not isinstance(v, str)]
    if key == "weight_kg":  # numbers are fine there, in range
        choices = [True, False, [], {}, "1.5", -7, 1001, "x"]
    body[key] = rng.choice(choices)
    return kind, encode(body), SCHEMA, {"event_id": body["event_id"] if key != "event_id" else None}


_TOPIC_NAMES = ["tenant_id", "farm_id", "barn_id", "device_id", "kind"]


def _unknown_fields(rng: random.Random, ctx: Context) -> Made:
    kind, body = ctx.body(rng)
    known = set(_FIELDS[kind]) | {"telemetry": {"readings"}, "session": {"batch_id"}}.get(kind, set())
    name = rng.choice(_TOPIC_NAMES + ["extra", "__proto__", "Event_ID", "event_id ", "", "ключ",
                                      "x" * rng.randint(100, 2000), "\u0000k", "constructor",
                                      "readings" if kind != "telemetry" else "session_id"])
    assert name not in known
    value = rng.choice([1, "x", None, [], {"a": 1}, True, 1.5, "fuzz-tenant"])
    if kind == "telemetry" and rng.random() < 0.3:
        body["readings"][0][name if name not in ("metric_type", "unit") else "extra"] = value
    else:
        body[name] = value
    return kind, encode(body), SCHEMA, {"event_id": body["event_id"]}


def _missing_fields(rng: random.Random, ctx: Context) -> Made:
    kind, body = ctx.body(rng)
    if rng.random() < 0.1:
        return kind, b"{}", SCHEMA, {"event_id": None}
    required = [k for k, req in _FIELDS[kind].items() if req]
    if kind == "telemetry" and rng.random() < 0.4:
        del body["readings"][0][rng.choice(["metric_type", "metric_value", "unit"])]
    else:
        del body[rng.choice(required)]
    return kind, encode(body), SCHEMA, {"event_id": body.get("event_id")}


def _bad_timestamps(rng: random.Random, ctx: Context) -> Made:
    kind, body = ctx.body(rng)
    key = "captured_at" if kind == "media" and rng.random() < 0.4 else "occurred_at"
    ok = _ok_time(rng, ctx.now)
    far = ctx.now + ctx.limits.max_clock_skew + timedelta(days=rng.randint(1, 3650), seconds=rng.randint(0, 86399))
    old = EARLIEST - timedelta(seconds=rng.randint(1, 60 * 365 * 86400))
    variant = rng.randrange(6)
    if variant == 0:  # naive
        body[key] = ok.replace(tzinfo=None).isoformat(timespec=rng.choice(["seconds", "milliseconds"]))
        expected = SCHEMA
    elif variant == 1:  # far in the future
        body[key] = far.isoformat() if rng.random() < 0.5 else _ts(far)
        expected = CLOCK
    elif variant == 2:  # before 2020 (a device that booted without a clock)
        body[key] = rng.choice([_ts(old), "1970-01-01T00:00:00Z", "2019-12-31T23:59:59.999Z",
                                "0001-01-01T00:00:00Z"])
        expected = CLOCK
    elif variant == 3:  # not RFC 3339 with an offset
        body[key] = rng.choice([int(ok.timestamp()), str(int(ok.timestamp())), ok.strftime("%d/%m/%Y %H:%M"),
                                ok.strftime("%Y-%m-%dT%H:%M") + "Z", ok.strftime("%Y-%m-%dT%H:%M:%S+0700"),
                                ok.strftime("%Y-%m-%d"), "now", ok.strftime("%a, %d %b %Y %H:%M:%S GMT"),
                                ok.strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace("T", "  ")])
        expected = SCHEMA
    elif variant == 4:  # impossible or out of range
        body[key] = rng.choice(["2026-02-30T10:00:00Z", "2026-11-27T24:00:01Z", "2026-11-27T10:60:00Z",
                                "2026-11-27T10:00:60Z", "0001-01-01T00:00:00+01:00",
                                "9999-12-31T23:59:59-01:00", "2026-11-27T10:00:00+25:00", "10000-01-01T00:00:00Z"])
        expected = SCHEMA
    else:  # just past the configured skew
        body[key] = _ts(ctx.now + ctx.limits.max_clock_skew + timedelta(hours=rng.randint(2, 48)))
        expected = CLOCK
    return kind, encode(body), expected, {"event_id": body["event_id"]}


_BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80",
             b"\xf8\x88\x80\x80\x80", b"\xf4\x90\x80\x80", b"\xc3"]


def _non_utf8(rng: random.Random, ctx: Context) -> Made:
    kind, body = ctx.body(rng, rng.choice(["telemetry", "session"]))
    variant = rng.randrange(5)
    if variant == 0:  # a bad sequence inside a string value
        target = rng.choice(["trace_id", "batch_id"] if kind == "session" else ["trace_id", "metric_type"])
        if target == "metric_type":
            body["readings"][0]["metric_type"] = "@@B@@"
        else:
            body[target] = "@@B@@"
        raw = encode(body).replace(b"@@B@@", b"a" + rng.choice(_BAD_UTF8) + b"b")
    elif variant == 1:  # inside a key
        body["@@B@@"] = 1
        raw = encode(body).replace(b"@@B@@", rng.choice(_BAD_UTF8))
    elif variant == 2:  # another encoding
        body["trace_id"] = "Grüße, température"
        raw = json.dumps(body, ensure_ascii=False).encode(rng.choice(["utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252"]))
    elif variant == 3:  # binary
        raw = rng.randbytes(rng.randint(1, 512))
        if MARKER_RE.search(raw):  # pragma: no cover - astronomically unlikely
            raw = b"\xff" + raw.replace(b"fz_", b"fy_")
        raw = b"\xff" + raw if raw[:1].isascii() else raw
    else:  # a bad byte where the structure is
        raw = bytearray(encode(body))
        raw[rng.randrange(len(raw))] = rng.choice([0x80, 0xC0, 0xFF, 0xFE, 0xF5])
        raw = bytes(raw)
    return kind, raw, INVALID_JSON, {"event_id": body["event_id"]}


def _pad(raw: bytes, size: int) -> bytes:
    """`raw` (a JSON object) grown to `size` bytes with whitespace inside: still valid JSON."""
    return raw[:1] + b" " * max(0, size - len(raw)) + raw[1:]


def _oversized(rng: random.Random, ctx: Context) -> Made:
    limits = ctx.limits
    variant = rng.randrange(4)
    if variant == 0:
        # Telemetry or session over its SPEC limit, under the single old limit: valid otherwise.
        kind, body = ctx.body(rng, rng.choice(["telemetry", "session"]))
        low, high = limits.max_payload_bytes + 1, min(limits.single_limit_bytes, limits.media_payload_bytes)
        if low > high:
            variant = 1
        else:
            raw = _pad(encode(body), rng.randint(low, high))
            return kind, raw, TOO_LARGE, {"event_id": body["event_id"], "pending": PENDING_KIND_LIMIT}
    if variant == 1:  # any kind, over every limit
        kind, body = ctx.body(rng)
        ceiling = max(limits.single_limit_bytes, limits.media_payload_bytes, limits.max_payload_bytes)
        raw = _pad(encode(body), ceiling + rng.randint(1, 64 * 1024))
        if rng.random() < 0.3:
            raw = raw[:-1]  # and broken
        return kind, raw, TOO_LARGE, {"event_id": body["event_id"]}
    if variant == 2:  # a frame over EDGE_MEDIA_MAX_BYTES inside a payload under its limit
        kind, body = ctx.body(rng, "media")
        body["image_b64"] = base64.b64encode(ctx.images.jpeg + rng.randbytes(limits.media_max_bytes)).decode()
        return kind, encode(body), TOO_LARGE, {"event_id": body["event_id"]}
    kind, body = ctx.body(rng, "telemetry")  # too many readings is a schema error, not a size one
    body["readings"] = [_reading(rng) for _ in range(rng.randint(101, 250))]
    raw = encode(body)
    expected = TOO_LARGE if len(raw) > limits.kind_limit(kind) else SCHEMA
    return kind, raw, expected, {"event_id": body["event_id"]}


def _bad_base64(rng: random.Random, ctx: Context) -> Made:
    kind, body = ctx.body(rng, "media")
    b64: str = body["image_b64"]
    at = rng.randrange(1, len(b64) - 4)
    body["image_b64"] = rng.choice([
        b64[:at] + rng.choice("!*-_ \n\t.~é$") + b64[at:],       # a character outside the alphabet
        b64.rstrip("=")[:-1] if b64.endswith("=") else b64[:-1],  # bad length / padding
        b64[:at] + "=" + b64[at:],                                # padding in the middle
        b64 + "=",
        "data:image/jpeg;base64," + b64,
        "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)),  # MIME line breaks
        "",
        base64.urlsafe_b64encode(b"\xfb\xff\xfe" * 40).decode(),  # url-safe alphabet
        b64[:at] + "\u0430" + b64[at:],                           # a Cyrillic 'a'
    ])
    return kind, encode(body), BAD_IMAGE, {"event_id": body["event_id"]}


def _lying_images(rng: random.Random, ctx: Context) -> Made:
    kind, body = ctx.body(rng, "media")
    im = ctx.images
    other = rng.choice(list(im.others.values()))
    jpeg_lies = [im.png, other, b"GIF89a" + rng.randbytes(64), b"%PDF-1.4\n" + rng.randbytes(64),
                 b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"\xff\xd8\xff\xd9",
                 b"\xff\xd8" + rng.randbytes(rng.randint(0, 200)) + b"\xff\xd9",
                 im.jpeg[:rng.randint(2, len(im.jpeg) - 3)],           # cut short: no end marker
                 im.jpeg[:-2] + b"\x00\x00", b"", rng.randbytes(128)]
    png_lies = [im.jpeg, other, b"\x89PNG\r\n\x1a\n" + rng.randbytes(64),
                im.png[:rng.randint(1, len(im.png) - 13)],             # cut short
                _flip(rng, im.png, 16, 29),                            # IHDR damaged: CRC fails
                b"\x89PNG\r\n\x1a\n", rng.randbytes(128)]
    if rng.random() < 0.5:
        body["mime_type"], data = "image/jpeg", rng.choice(jpeg_lies)
    else:
        body["mime_type"], data = "image/png", rng.choice(png_lies)
    body["image_b64"] = base64.b64encode(data).decode()
    return kind, encode(body), BAD_IMAGE, {"event_id": body["event_id"]}


def _flip(rng: random.Random, data: bytes, start: int, end: int) -> bytes:
    out = bytearray(data)
    at = rng.randrange(start, end)
    out[at] ^= 1 << rng.randrange(8)
    return bytes(out)


def _decompression_bombs(rng: random.Random, ctx: Context) -> Made:
    kind, body = ctx.body(rng, "media")
    side = rng.choice([7072, 8000, 20_000, 65_535])
    width, height = rng.choice([(side, side), (1, MAX_PIXELS + 1), (MAX_PIXELS // 2, 3), (2 ** 31 - 1, 2 ** 31 - 1)])
    if rng.random() < 0.5:
        idat = ctx.images.zlib_bomb if rng.random() < 0.5 else zlib.compress(b"\x00" * 64)
        body["mime_type"], data = "image/png", _png_claiming(width, height, idat)
    else:
        w, h = min(width, 65_535), min(height, 65_535)
        if w * h <= MAX_PIXELS:
            w = h = 65_535
        body["mime_type"], data = "image/jpeg", _jpeg_claiming(ctx.images.jpeg, w, h)
    body["image_b64"] = base64.b64encode(data).decode()
    return kind, encode(body), TOO_LARGE, {"event_id": body["event_id"]}


def _bad_ids(rng: random.Random, ctx: Context) -> Made:
    kind, body = ctx.body(rng, "session")
    body["batch_id"] = rng.choice(["batch 11", "../batch", ".", "..", "b" * 65, "-batch", "bätch", "",
                                   "batch/1", "batch\n", "_batch", "b.1"])
    return kind, encode(body), BAD_ID, {"event_id": body["event_id"]}


def _bad_topics(rng: random.Random, ctx: Context) -> Made:
    """Topics a broker delivers (UTF-8, no control characters) under farmiq/#."""
    kind, body = ctx.body(rng, "telemetry")
    bad = rng.choice([".", "..", "a b", "bärn", "b" * 65, "-x", "_x", "x.y", "x:y", "ÿ", "🐔", "x$",
                      "\u200bx", "é", "x\u00a0", "\ufeffx", ""])
    position = rng.randrange(3)
    segments = [TENANT, FARM, BARN]
    segments[position] = bad
    variants = [
        (f"farmiq/v1/{segments[0]}/{segments[1]}/{segments[2]}/{{m}}/{kind}", BAD_ID),
        (f"farmiq/v1/{TENANT}/{FARM}/{BARN}/{{m}}/{rng.choice(['video', 'Telemetry', 'telemetry ', '', 'TELEMETRY', 'sessions', 'médía'])}",
         frozenset({"bad_topic"})),
        ("farmiq/v1/{m}/" + "/".join(["x"] * rng.choice([0, 1, 2, 4, 5, 20])) + f"/{kind}", frozenset({"bad_topic"})),
        (f"farmiq/{rng.choice(['v2', 'V1', 'v1.0', '', 'v01'])}/{TENANT}/{FARM}/{BARN}/{{m}}/{kind}",
         frozenset({"bad_topic"})),
        (f"farmiq//{TENANT}/{FARM}/{{m}}/{kind}", frozenset({"bad_topic"})),
        (f"farmiq/v1/{TENANT}/{FARM}/{BARN}/{{m}}/{kind}/", frozenset({"bad_topic"})),
        (f"farmiq/v1/{TENANT}/{FARM}/{BARN}/{{m}}" + "/x" * rng.randint(1, 150) + f"/{kind}",
         frozenset({"bad_topic"})),
        (f"farmiq/v1/{{m}}/{'f' * rng.randint(65, 3000)}/{BARN}/d/{kind}", BAD_ID),
        ("farmiq", frozenset({"bad_topic"})),
        ("farmiq/", frozenset({"bad_topic"})),
    ]
    template, expected = rng.choice(variants)
    return kind, encode(body), expected, {"topic": template, "event_id": body["event_id"]}


def _bad_topic_bytes(rng: random.Random, ctx: Context) -> Made:
    """Topics Mosquitto refuses: invalid UTF-8, control characters, non-characters, wildcards."""
    kind, body = ctx.body(rng, "telemetry")
    junk = rng.choice(_BAD_UTF8 + [b"\x00", b"\n", b"\t", b"\x1b[31m", b"\x7f", b"\xc2\x85", b"\xef\xbf\xbf",
                                   b"\xef\xb7\x90", b"+", b"#", b"\xf0\x9f\xbf\xbe", b"\r\n"])
    segments = [TENANT.encode(), FARM.encode(), BARN.encode(), b"{m}", kind.encode()]
    if rng.random() < 0.05:
        junk = b""
        segments[4] = b"x/" * rng.randint(MOSQUITTO_MAX_TOPIC_LEVELS, 1000) + segments[4]
    at = rng.randrange(len(segments))
    segments[at] = segments[at] + junk if rng.random() < 0.5 else junk + segments[at]
    return kind, encode(body), frozenset({"bad_topic", "bad_id"}), {"topic": b"farmiq/v1/" + b"/".join(segments),
                                                                     "event_id": body["event_id"]}


# Category -> maker; a corpus shares its count evenly between them.
CATEGORIES: dict[str, Callable[[random.Random, Context], Made]] = {
    "malformed_json": _malformed_json,
    "truncated_json": _truncated_json,
    "deep_nesting": _deep_nesting,
    "huge_numbers": _huge_numbers,
    "non_finite": _non_finite,
    "wrong_types": _wrong_types,
    "unknown_fields": _unknown_fields,
    "missing_fields": _missing_fields,
    "bad_timestamps": _bad_timestamps,
    "non_utf8_payload": _non_utf8,
    "oversized": _oversized,
    "bad_base64": _bad_base64,
    "lying_images": _lying_images,
    "decompression_bombs": _decompression_bombs,
    "bad_ids": _bad_ids,
    "bad_topics": _bad_topics,
    "bad_topic_bytes": _bad_topic_bytes,
}


_ID = rb"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
_GOOD_TOPIC = re.compile(rb"farmiq/v1/" + (_ID + rb"/") * 4 + rb"(telemetry|session|media)")


def make_case(seq: int, category: str, rng: random.Random, ctx: Context) -> Case:
    kind, body, expected, extra = CATEGORIES[category](rng, ctx)
    payload = body if isinstance(body, bytes) else encode(body)
    mark = marker(seq).encode()
    raw_topic = extra.get("topic", topic(kind, "{m}"))
    raw_topic = raw_topic.encode() if isinstance(raw_topic, str) else raw_topic
    if b"{m}" in raw_topic:
        raw_topic = raw_topic.replace(b"{m}", mark)
    else:  # the topic cannot hold it: the payload starts with it (and stays as bad)
        payload = mark + b" " + payload
    pending = extra.get("pending", "")
    kind_ok = _GOOD_TOPIC.fullmatch(raw_topic)
    if kind_ok and len(payload) > ctx.limits.kind_limit(kind) and expected != TOO_LARGE:
        # SPEC §1.1 checks the size per kind before parsing; main had one limit.
        expected = TOO_LARGE
        if len(payload) <= ctx.limits.single_limit_bytes:
            pending = pending or PENDING_KIND_LIMIT
    return Case(seq, category, raw_topic, payload, frozenset(expected), extra.get("event_id"), pending)


def bad_corpus(count: int, *, seed: int, now: datetime, limits: Limits,
               categories: list[str] | None = None) -> list[Case]:
    """`count` bad messages, shared evenly over `categories` (default: all)."""
    names = categories or list(CATEGORIES)
    unknown = set(names) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown fuzz categories: {', '.join(sorted(unknown))}")
    ctx = Context(now, limits)
    order = [names[i % len(names)] for i in range(count)]
    rng = random.Random(seed)
    rng.shuffle(order)
    return [make_case(seq, category, random.Random(f"{seed}:{seq}"), ctx)
            for seq, category in enumerate(order)]


def edge_telemetry(rng: random.Random, now: datetime, i: int) -> tuple[str, dict[str, Any], datetime]:
    """Valid telemetry at SPEC's bounds: extreme values and spellings, the longest ids."""
    body = telemetry_body(rng, now, readings=rng.choice([1, 100]))
    for reading in body["readings"]:
        reading["metric_value"] = rng.choice([METRIC_VALUE_BOUND, -METRIC_VALUE_BOUND, 0.0, -0.0, 5e-324,
                                              -2.2250738585072014e-308, 123456789.123456789, 1])
        reading["metric_type"] = rng.choice(["t", "m" * 32, "a.b_c-d/e%", "%"])
        reading["unit"] = rng.choice(["%", "u" * 32, "m/s", "-"])
    occurred = rng.choice([EARLIEST, now + timedelta(minutes=30), now - timedelta(days=400),
                           now - timedelta(minutes=30)]) + timedelta(microseconds=i)
    offset = timezone(timedelta(minutes=rng.choice([0, 14 * 60, -12 * 60, 330, -570])))
    text = occurred.astimezone(offset).isoformat()
    body["occurred_at"] = rng.choice([text, text.replace("T", "t"), text.replace("T", " ")])
    if rng.random() < 0.5:
        body["trace_id"] = rng.choice(["é" * 64, "🐔" * 64, "\\\"'{}", "\u2028 \u00a0", "x" * 64])
    device = f"ok-e{i:07d}" + "x" * rng.choice([0, 52])  # up to the 64-character limit
    return device, body, occurred


def valid_traffic(count: int, *, seed: int, now: datetime, media_share: float = 0.05,
                  edge_share: float = 0.1) -> list[Valid]:
    """`count` valid messages: telemetry (`edge_share` of it at SPEC's bounds),
    session start/finalize pairs and a few frames.

    Each telemetry message has its own (device, occurred_at), so its raw rows can be
    counted exactly; each session event has its own outbox event.
    """
    rng = random.Random(f"valid:{seed}")
    images = _Images()
    out: list[Valid] = []
    while len(out) < count:
        i = len(out)
        device = f"ok-{i % 40:03d}"
        roll = rng.random()
        if roll < media_share:
            body = media_body(rng, now, images)
            out.append(Valid(topic("media", device), encode(body), "media", body["event_id"], device,
                             datetime.fromisoformat(body["occurred_at"])))
        elif roll < media_share + 0.15 and count - i >= 2:
            start = session_body(rng, now, "start")
            ended = datetime.fromisoformat(start["occurred_at"]) + timedelta(minutes=1)
            finalize = session_body(rng, now, "finalize") | {"session_id": start["session_id"],
                                                               "occurred_at": _ts(ended)}
            for body, kind in ((start, "weighvision.session.created"), (finalize, "weighvision.session.finalized")):
                out.append(Valid(topic("session", device), encode(body), "session", body["event_id"], device,
                                 datetime.fromisoformat(body["occurred_at"]), outbox_type=kind))
        elif roll < media_share + 0.15 + edge_share:
            device, body, occurred = edge_telemetry(rng, now, i)
            out.append(Valid(topic("telemetry", device), encode(body), "telemetry", body["event_id"], device,
                             occurred, readings=len(body["readings"]), outbox_type="telemetry.ingested"))
        else:
            body = telemetry_body(rng, now)
            occurred = now - timedelta(minutes=30, microseconds=i)  # unique per message
            body["occurred_at"] = _ts(occurred)
            out.append(Valid(topic("telemetry", device), encode(body), "telemetry", body["event_id"], device,
                             occurred, readings=len(body["readings"]), outbox_type="telemetry.ingested"))
    return out[:count]
