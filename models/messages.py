"""MQTT ingress boundary (SPEC §1): topic and payload rules, normalized events.

`parse_message` (or `validate_message` then `event_of`) is the entry point
of the bridge: bytes in, a validated event out, or `Rejected` with a reason
code from `REJECT_REASONS`. Payload
models mirror what a device may send (no ids: the topic is authoritative);
event models are the normalized form that travels through the queue, with
the topic ids merged in.

Checks that depend on the receive time (clock skew) or are expensive (image
decoding) only run when validation is given a context
(`{"now", "max_clock_skew", "media_max_bytes"}`), so an actor re-validating a
queue message with `INGRESS_EVENTS.validate_python(...)` skips them.

Pure: no I/O.
"""

import base64
import binascii
import functools
import io
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Union
from uuid import UUID

from PIL import JpegImagePlugin, PngImagePlugin
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from models.ids import ID_PATTERN, ID_RE, media_id_for
from models.media_path import STAGING_NAME_PATTERN

KINDS = ("telemetry", "session", "media")
REJECT_REASONS = (
    "bad_topic",
    "bad_id",
    "invalid_json",
    "schema",
    "clock_skew",
    "too_large",
    "bad_image",
    "session_conflict",
    "processing_failed",  # valid, but applying it failed on its data (actors/ingest.py)
)

TOPIC_PREFIX = ("farmiq", "v1")
MAX_PIXELS = 50_000_000
# Devices that booted without a clock report 1970 (or thereabouts).
EARLIEST_TIMESTAMP = datetime(2020, 1, 1, tzinfo=timezone.utc)

_DETAIL_MAX = 200


class Rejected(Exception):
    """A message that breaks a SPEC §1 rule; never retried.

    `detail` is short and never contains the payload (it is logged and stored
    beside the raw payload, which is truncated on purpose).
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


# --- topic -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopicIds:
    tenant_id: str
    farm_id: str
    barn_id: str
    device_id: str
    kind: str


_TOPIC_ID_NAMES = ("tenant_id", "farm_id", "barn_id", "device_id")


@functools.lru_cache(maxsize=4096)  # a farm's devices publish to the same few hundred topics
def parse_topic(topic: str) -> TopicIds:
    """`farmiq/v1/{tenant_id}/{farm_id}/{barn_id}/{device_id}/{kind}`."""
    parts = topic.split("/")
    if len(parts) != 7:
        raise Rejected("bad_topic", f"expected 7 topic segments, got {len(parts)}")
    if (parts[0], parts[1]) != TOPIC_PREFIX:
        raise Rejected("bad_topic", "topic must start with farmiq/v1/")
    kind = parts[6]
    if kind not in KINDS:
        raise Rejected("bad_topic", f"kind must be one of {', '.join(KINDS)}")
    for name, value in zip(_TOPIC_ID_NAMES, parts[2:6]):
        if ID_RE.fullmatch(value) is None:
            raise Rejected("bad_id", f"topic {name} must match {ID_PATTERN}")
    return TopicIds(parts[2], parts[3], parts[4], parts[5], kind)


# --- field types -------------------------------------------------------------


def _check_id(value: str) -> str:
    if ID_RE.fullmatch(value) is None:
        # The error type doubles as the reject reason (see `_rejection`).
        raise PydanticCustomError("bad_id", "id must match {pattern}", {"pattern": ID_PATTERN})
    return value


# RFC 3339 date-time with seconds and an offset. pydantic alone would also
# take unix numbers, "1700000000", minutes-only times and "+0700".
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})",
    re.ASCII,
)


def _timestamp(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> datetime:
    if not isinstance(value, datetime) and not (
        isinstance(value, str) and _RFC3339.fullmatch(value)
    ):
        raise PydanticCustomError("rfc3339", "timestamp must be an RFC 3339 string with an offset")
    try:
        moment: datetime = handler(value).astimezone(timezone.utc)
    except OverflowError:
        # "0001-01-01T00:00:00+01:00" has no UTC datetime; not a ValueError,
        # so pydantic would let it escape.
        raise PydanticCustomError("datetime_range", "timestamp is out of range") from None
    context = info.context
    if context and "now" in context:
        # Plausibility against the receive time: ingress only.
        if moment < EARLIEST_TIMESTAMP:
            raise PydanticCustomError("clock_skew", "timestamp is before 2020-01-01T00:00:00Z")
        if moment > context["now"] + context["max_clock_skew"]:
            raise PydanticCustomError("clock_skew", "timestamp is too far in the future")
    return moment


Id = Annotated[str, AfterValidator(_check_id)]
# Tz-aware, normalized to UTC, RFC 3339 on the wire.
Timestamp = Annotated[AwareDatetime, WrapValidator(_timestamp)]
# Control characters would end up in one-line logs.
TraceId = Annotated[str, Field(max_length=64, pattern=r"^[^\x00-\x1f\x7f]*$")]
MetricToken = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.%/-]{1,32}$")]
# SPEC §1.2: |metric_value| <= 1e15, so sums of accepted values never overflow.
METRIC_VALUE_BOUND = 1e15
# strict: a JSON string "1.5" is not a number.
MetricValue = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-METRIC_VALUE_BOUND,
                                     le=METRIC_VALUE_BOUND)]
WeightKg = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1000)]
MimeType = Literal["image/jpeg", "image/png"]
SessionAction = Literal["start", "finalize", "cancel"]

_CONFIG = ConfigDict(extra="forbid", frozen=True)


class Reading(BaseModel):
    model_config = _CONFIG

    metric_type: MetricToken
    metric_value: MetricValue
    unit: MetricToken


Readings = Annotated[list[Reading], Field(min_length=1, max_length=100)]


# --- image check -------------------------------------------------------------

# Plugin classes, not `Image.open`: they read the header without Pillow's own
# decompression-bomb check, which warns (an error under pytest) between ~89
# and ~179 megapixels and raises above; our limit is lower and checked first.
_IMAGE_CLASSES = {
    "image/jpeg": JpegImagePlugin.JpegImageFile,
    "image/png": PngImagePlugin.PngImageFile,
}


def _image_error(reason: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(reason, message)


def decode_image_b64(image_b64: str, max_bytes: int) -> bytes:
    """The frame's bytes; `too_large` / `bad_image` errors as the validators raise them."""
    # Refuse before allocating the decoded buffer.
    if len(image_b64) // 4 * 3 - 2 > max_bytes:
        raise _image_error("too_large", "decoded image is over the media size limit")
    try:
        data = base64.b64decode(image_b64, validate=True)
    except (binascii.Error, ValueError):
        raise _image_error("bad_image", "image_b64 is not valid base64") from None
    if len(data) > max_bytes:
        raise _image_error("too_large", "decoded image is over the media size limit")
    return data


def image_problem(data: bytes, mime_type: str) -> tuple[str, str] | None:
    """Why `data` is not a storable `mime_type` frame, as (reason, message); None if it is.

    Used at ingress (the bridge) and again by the media actor on the bytes it
    is about to store.
    """
    try:
        with _IMAGE_CLASSES[mime_type](io.BytesIO(data)) as image:
            width, height = image.size
            if width * height <= MAX_PIXELS:
                image.verify()  # PNG: chunk CRCs; never decodes pixels
    except Exception:
        # Untrusted bytes: Pillow signals bad input with many exception types.
        return "bad_image", f"image is not a valid {mime_type} image"
    if width * height > MAX_PIXELS:
        return "too_large", "image is over 50 megapixels"
    # JPEG `verify()` checks nothing; a frame cut short in transit lacks EOI
    # and would fail later, in the inference actor.
    if mime_type == "image/jpeg" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "bad_image", "JPEG image is truncated"
    return None


def _check_image(image_b64: str, mime_type: str, max_bytes: int) -> None:
    problem = image_problem(decode_image_b64(image_b64, max_bytes), mime_type)
    if problem is not None:
        raise _image_error(*problem)


def _image_context(info: ValidationInfo) -> int | None:
    context = info.context
    return context.get("media_max_bytes") if context else None


# --- payloads: what a device sends -----------------------------------------


class _Envelope(BaseModel):
    model_config = _CONFIG

    event_id: UUID
    occurred_at: Timestamp
    trace_id: TraceId | None = None


class TelemetryPayload(_Envelope):
    readings: Readings


class SessionPayload(_Envelope):
    session_id: UUID
    action: SessionAction
    batch_id: Id | None = None
    weight_kg: WeightKg | None = None


class MediaPayload(_Envelope):
    media_id: UUID | None = None
    session_id: UUID | None = None
    captured_at: Timestamp | None = None
    mime_type: MimeType
    image_b64: str

    @model_validator(mode="after")
    def _image(self, info: ValidationInfo) -> "MediaPayload":
        max_bytes = _image_context(info)
        if max_bytes is not None:
            _check_image(self.image_b64, self.mime_type, max_bytes)
        return self


# --- events: the normalized form -------------------------------------------


class _Event(_Envelope):
    tenant_id: Id
    farm_id: Id
    barn_id: Id
    device_id: Id
    # The payload as received (first 64 KiB, base64) and its full length, added
    # by the bridge to the queue form (models/queue_events.py): the ingest actor
    # dead-letters with these exact bytes (SPEC §1.5). A device cannot set them.
    raw_b64: str | None = None
    raw_size_bytes: int | None = None


class TelemetryEvent(_Event):
    kind: Literal["telemetry"] = "telemetry"
    readings: Readings


class SessionEvent(_Event):
    kind: Literal["session"] = "session"
    session_id: UUID
    action: SessionAction
    batch_id: Id | None = None
    weight_kg: WeightKg | None = None


class StagedImage(BaseModel):
    """Where the bridge spooled a frame's bytes on the media volume (actors/media_volume.py).

    `name` is a file in the volume's staging folder, never a path: the media
    actor joins it to EDGE_MEDIA_ROOT itself.
    """

    model_config = _CONFIG

    name: Annotated[str, Field(pattern=STAGING_NAME_PATTERN)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size_bytes: Annotated[int, Field(strict=True, ge=1)]


class MediaEvent(_Event):
    """A frame. At ingress it carries `image_b64`; in the queue only `staged`
    (the bytes travel once: to the media volume, never through the queue)."""

    kind: Literal["media"] = "media"
    media_id: UUID
    session_id: UUID | None = None
    captured_at: Timestamp
    mime_type: MimeType
    image_b64: str | None = None
    staged: StagedImage | None = None

    @model_validator(mode="after")
    def _image(self, info: ValidationInfo) -> "MediaEvent":
        if (self.image_b64 is None) == (self.staged is None):
            raise PydanticCustomError("schema", "a media event carries image_b64 or staged, not both")
        max_bytes = _image_context(info)
        if max_bytes is not None and self.image_b64 is not None:
            _check_image(self.image_b64, self.mime_type, max_bytes)
        return self


IngressEvent = Annotated[
    Union[TelemetryEvent, SessionEvent, MediaEvent], Field(discriminator="kind")
]
INGRESS_EVENT: TypeAdapter[IngressEvent] = TypeAdapter(IngressEvent)
INGRESS_EVENTS: TypeAdapter[list[IngressEvent]] = TypeAdapter(list[IngressEvent])


# --- parse_message -----------------------------------------------------------


def _ids(topic: TopicIds) -> dict[str, str]:
    return {
        "tenant_id": topic.tenant_id,
        "farm_id": topic.farm_id,
        "barn_id": topic.barn_id,
        "device_id": topic.device_id,
    }


# The payload is already validated and the topic ids checked, so the event is
# assembled with `model_construct`: no second validation on the hot path.
def _telemetry(topic: TopicIds, payload: TelemetryPayload) -> TelemetryEvent:
    return TelemetryEvent.model_construct(**_ids(topic), **payload.__dict__)


def _session(topic: TopicIds, payload: SessionPayload) -> SessionEvent:
    return SessionEvent.model_construct(**_ids(topic), **payload.__dict__)


def _media(topic: TopicIds, payload: MediaPayload) -> MediaEvent:
    fields = payload.__dict__ | {
        "media_id": payload.media_id or media_id_for(payload.event_id),
        "captured_at": payload.captured_at or payload.occurred_at,
    }
    return MediaEvent.model_construct(**_ids(topic), **fields)


_BY_KIND: dict[str, tuple[type[_Envelope], Any]] = {
    "telemetry": (TelemetryPayload, _telemetry),
    "session": (SessionPayload, _session),
    "media": (MediaPayload, _media),
}

# Reasons a validator can raise by name; any other error is a schema error.
_NAMED_REASONS = frozenset({"bad_id", "clock_skew", "too_large", "bad_image"})


def _printable(text: str, limit: int) -> str:
    # Field names come from the payload: keep them short and on one line.
    clean = "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
    return clean if len(text) <= limit else clean + "..."


def _rejection(exc: ValidationError) -> Rejected:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    first = errors[0]
    if first["type"] == "json_invalid" or (first["type"] == "model_type" and not first["loc"]):
        reason = "invalid_json"
    elif all(error["type"] in _NAMED_REASONS for error in errors):
        reason = first["type"]
    else:
        reason = "schema"
        first = next(e for e in errors if e["type"] not in _NAMED_REASONS)
    loc = ".".join(_printable(str(part), 40) for part in first["loc"])
    detail = f"{loc}: {first['msg']}" if loc else first["msg"]
    if len(errors) > 1:
        detail += f" (+{len(errors) - 1} more)"
    return Rejected(reason, _printable(detail, _DETAIL_MAX))


def media_payload_limit(media_max_bytes: int) -> int:
    """Largest media payload: a frame of `media_max_bytes` in base64, plus 64 KiB of envelope."""
    return 4 * -(-media_max_bytes // 3) + 64 * 1024


def validate_message(
    topic: str,
    payload: bytes,
    *,
    now: datetime,
    max_clock_skew: timedelta,
    media_max_bytes: int,
    max_payload_bytes: int,
) -> tuple[TopicIds, _Envelope]:
    """Check one MQTT message; raise `Rejected` (and only that) on any bad input.

    Returns the topic ids and the validated payload model (`event_of` makes
    the normalized event of them; the bridge's hot path makes a telemetry
    message's queue row straight from them: models/queue_events.py).
    `max_payload_bytes` bounds telemetry and session payloads; media payloads
    are bounded by `media_payload_limit(media_max_bytes)` (SPEC §1.1). Both
    are checked before any JSON parsing; the kind comes from the topic.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    ids = parse_topic(topic)
    limit = media_payload_limit(media_max_bytes) if ids.kind == "media" else max_payload_bytes
    if len(payload) > limit:
        raise Rejected("too_large", f"{ids.kind} payload is {len(payload)} bytes, limit {limit}")
    model = _BY_KIND[ids.kind][0]
    context = {"now": now, "max_clock_skew": max_clock_skew, "media_max_bytes": media_max_bytes}
    try:
        return ids, model.model_validate_json(payload, context=context)
    except ValidationError as exc:
        raise _rejection(exc) from None


def event_of(ids: TopicIds, validated: _Envelope) -> IngressEvent:
    """The normalized event of a message `validate_message` accepted."""
    return _BY_KIND[ids.kind][1](ids, validated)


def parse_message(topic: str, payload: bytes, **limits: Any) -> IngressEvent:
    """Validate one MQTT message into its normalized event; `Rejected` on any bad
    input. `limits`: the keyword arguments of `validate_message`."""
    return event_of(*validate_message(topic, payload, **limits))
