"""SPEC §1: MQTT topic and payload rules, reason codes, queue round trip."""

import base64
import json
import uuid
from datetime import datetime, timedelta, timezone
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.ids import ID_RE, media_id_for, new_id
from models.messages import (
    INGRESS_EVENTS,
    KINDS,
    REJECT_REASONS,
    MediaEvent,
    Reading,
    Rejected,
    SessionEvent,
    TelemetryEvent,
    TopicIds,
    media_payload_limit,
    parse_message,
    parse_topic,
)
from models.settings import Settings
from tests.support import corpus
from tests.support.corpus import (
    EVENT_ID,
    MEDIA_ID,
    SESSION_ID,
    invalid_cases,
    jpeg_bytes,
    media_payload,
    png_bytes,
    png_claiming_size,
    session_payload,
    telemetry_payload,
    topic,
)

NOW = datetime(2026, 11, 27, 10, 0, tzinfo=timezone.utc)
SKEW = timedelta(hours=24)
MEDIA_MAX = 64 * 1024
PAYLOAD_MAX = corpus.default_max_payload_bytes(MEDIA_MAX)
AT = datetime(2026, 11, 27, 9, 59, 30, 250_123, tzinfo=timezone.utc)
READING = ("temperature", 23.4, "C")


def parse(topic_: str, payload: bytes, **limits: object) -> object:
    kwargs: dict[str, object] = {
        "now": NOW,
        "max_clock_skew": SKEW,
        "media_max_bytes": MEDIA_MAX,
        "max_payload_bytes": PAYLOAD_MAX,
    } | limits
    return parse_message(topic_, payload, **kwargs)  # type: ignore[arg-type]


def reason_of(topic_: str, payload: bytes, **limits: object) -> str:
    with pytest.raises(Rejected) as caught:
        parse(topic_, payload, **limits)
    assert caught.value.reason in REJECT_REASONS
    return caught.value.reason


def telemetry(**changes: object) -> bytes:
    body = json.loads(telemetry_payload(EVENT_ID, AT, [READING])) | changes
    return json.dumps(body, allow_nan=True).encode()


# --- ids -----------------------------------------------------------------------


def test_new_id_is_a_stdlib_uuid7() -> None:
    first, second = new_id(), new_id()
    assert type(first) is uuid.UUID
    assert first.version == 7 and first != second


def test_media_id_for_is_deterministic_per_event() -> None:
    assert media_id_for(EVENT_ID) == media_id_for(UUID(str(EVENT_ID)))
    assert media_id_for(EVENT_ID) != media_id_for(SESSION_ID)
    assert media_id_for(EVENT_ID).version == 5


@pytest.mark.parametrize("value", ["a", "A9", "tenant_a-1", "x" * 64])
def test_id_pattern_accepts(value: str) -> None:
    assert ID_RE.fullmatch(value)


@pytest.mark.parametrize(
    "value", ["", "x" * 65, "-a", "_a", "a.b", ".", "..", "a b", "a/b", "bärn", "abc\n", "a\nb", "a+"]
)
def test_id_pattern_rejects(value: str) -> None:
    assert not ID_RE.fullmatch(value)


# --- topics ------------------------------------------------------------------


def test_parse_topic() -> None:
    assert parse_topic("farmiq/v1/t1/f-1/b_1/dev9/session") == TopicIds(
        "t1", "f-1", "b_1", "dev9", "session"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_a_topic(kind: str) -> None:
    assert parse_topic(topic(kind)).kind == kind


def test_topic_trailing_newline_id_is_bad_id() -> None:
    assert reason_of(topic("telemetry", device_id="abc\n"), telemetry()) == "bad_id"


def test_topic_is_checked_before_payload() -> None:
    assert reason_of(topic("video"), b"not json") == "bad_topic"
    assert reason_of(topic("telemetry", farm_id=".."), b"not json") == "bad_id"


# --- the invalid corpus: every rejection rule --------------------------------


def _case_id(case: tuple[str, bytes, str]) -> str:
    topic_, payload, reason = case
    return f"{reason}:{topic_[-24:]!r}:{payload[:60]!r}"


@pytest.mark.parametrize("case", invalid_cases(NOW, media_max_bytes=MEDIA_MAX), ids=_case_id)
def test_invalid_case_yields_its_reason(case: tuple[str, bytes, str]) -> None:
    topic_, payload, expected = case
    with pytest.raises(Rejected) as caught:
        parse(topic_, payload)
    assert caught.value.reason == expected, caught.value.detail
    detail = caught.value.detail
    assert detail and len(detail) <= 210 and detail.isprintable()


def test_invalid_corpus_covers_every_ingress_reason() -> None:
    reasons = {reason for _, _, reason in invalid_cases(NOW, media_max_bytes=MEDIA_MAX)}
    assert reasons == set(REJECT_REASONS) - {"session_conflict", "processing_failed"}


def test_invalid_corpus_default_limits_match_settings_rule() -> None:
    cases = invalid_cases(NOW)
    defaults = Settings()
    assert (corpus.DEFAULT_MEDIA_MAX_BYTES, corpus.DEFAULT_MAX_PAYLOAD_BYTES) == (
        defaults.media_max_bytes, defaults.max_payload_bytes)
    limits = {"media_max_bytes": defaults.media_max_bytes, "max_payload_bytes": defaults.max_payload_bytes}
    for topic_, payload, expected in cases[-2:]:
        assert reason_of(topic_, payload, **limits) == expected == "too_large"


# --- rejection details --------------------------------------------------------


def test_detail_never_contains_payload_values() -> None:
    secret = "s3cr3t-value"
    payloads = [
        telemetry(occurred_at=secret),
        telemetry(event_id=secret),
        telemetry(readings=[{"metric_type": secret + " x", "metric_value": 1, "unit": "C"}]),
        telemetry(trace_id=secret * 10),
        telemetry(unknown=secret),
        session_payload(EVENT_ID, AT, SESSION_ID, secret),
    ]
    for payload in payloads:
        with pytest.raises(Rejected) as caught:
            parse(topic("session" if b'"action"' in payload else "telemetry"), payload)
        assert secret not in caught.value.detail
        assert secret not in str(caught.value)


def test_detail_keeps_hostile_field_names_short_and_on_one_line() -> None:
    with pytest.raises(Rejected) as caught:
        parse(topic("telemetry"), telemetry(**{"evil\nname" + "x" * 500: 1}))
    assert caught.value.reason == "schema"
    assert caught.value.detail.isprintable() and len(caught.value.detail) < 210


def test_rejected_knows_only_the_listed_reasons() -> None:
    assert Rejected("schema", "x").args == ("schema", "x")
    with pytest.raises(ValueError):
        Rejected("nope", "x")


# --- telemetry -----------------------------------------------------------------


def test_telemetry_is_normalized_with_topic_ids() -> None:
    payload = telemetry_payload(
        EVENT_ID, "2026-11-27T16:59:30.250123+07:00", [READING, ("humidity", 61, "%")], trace_id="t-1"
    )
    event = parse(topic("telemetry"), payload)
    assert event == TelemetryEvent(
        tenant_id="tenant-a",
        farm_id="farm-1",
        barn_id="barn-1",
        device_id="device-1",
        event_id=EVENT_ID,
        occurred_at=AT,
        trace_id="t-1",
        readings=[Reading(metric_type="temperature", metric_value=23.4, unit="C"),
                  Reading(metric_type="humidity", metric_value=61.0, unit="%")],
    )
    assert isinstance(event, TelemetryEvent)
    assert event.occurred_at.tzinfo is timezone.utc
    assert type(event.readings[1].metric_value) is float


@pytest.mark.parametrize("count", [1, 100])
def test_readings_count_bounds_accepted(count: int) -> None:
    event = parse(topic("telemetry"), telemetry_payload(EVENT_ID, AT, [READING] * count))
    assert isinstance(event, TelemetryEvent) and len(event.readings) == count


@pytest.mark.parametrize("count", [0, 101])
def test_readings_count_bounds_rejected(count: int) -> None:
    assert reason_of(topic("telemetry"), telemetry_payload(EVENT_ID, AT, [READING] * count)) == "schema"


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_json_literals_are_schema(literal: bytes) -> None:
    payload = telemetry_payload(EVENT_ID, AT, [("t", 1.5, "C")]).replace(b"1.5", literal)
    assert literal in payload
    assert reason_of(topic("telemetry"), payload) == "schema"


@pytest.mark.parametrize("token", ["a", "temp.c_1", "%", "m/s", "kg-1", "x" * 32])
def test_metric_tokens_accepted(token: str) -> None:
    event = parse(topic("telemetry"), telemetry_payload(EVENT_ID, AT, [(token, 0, token)]))
    assert isinstance(event, TelemetryEvent)


@pytest.mark.parametrize("token", ["", "x" * 33, "a b", "°C", "a\n", "a:b"])
def test_metric_tokens_rejected(token: str) -> None:
    assert reason_of(topic("telemetry"), telemetry_payload(EVENT_ID, AT, [(token, 0, "C")])) == "schema"
    assert reason_of(topic("telemetry"), telemetry_payload(EVENT_ID, AT, [("t", 0, token)])) == "schema"


@pytest.mark.parametrize("field", ["tenant_id", "farm_id", "barn_id", "device_id", "kind"])
def test_payload_cannot_name_topic_fields(field: str) -> None:
    assert reason_of(topic("telemetry"), telemetry(**{field: "x"})) == "schema"


@pytest.mark.parametrize("field", ["tenant_id", "farm_id", "barn_id", "device_id", "kind", "raw_b64"])
@pytest.mark.parametrize("kind", ["session", "media"])
def test_topic_ids_are_authoritative_for_every_kind(kind: str, field: str) -> None:
    payload = (session_payload(EVENT_ID, AT, SESSION_ID, "start", extra={field: "tenant-b"}) if kind == "session"
               else media_payload(EVENT_ID, AT, jpeg_bytes(), extra={field: "tenant-b"}))
    assert reason_of(topic(kind), payload) == "schema"
    event = parse(topic(kind), payload.replace(b', "%s": "tenant-b"' % field.encode(), b""))
    assert event.tenant_id == corpus.TENANT  # type: ignore[attr-defined]


def test_trace_id_bounds() -> None:
    assert isinstance(parse(topic("telemetry"), telemetry(trace_id="t" * 64)), TelemetryEvent)
    assert reason_of(topic("telemetry"), telemetry(trace_id="t" * 65)) == "schema"
    assert reason_of(topic("telemetry"), telemetry(trace_id=7)) == "schema"


# --- timestamps ----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["2026-11-27T09:59:30Z", "2026-11-27T09:59:30.1Z", "2026-11-27T16:59:30+07:00",
     "2026-11-27T04:59:30.123456789-05:00", "2020-01-01T00:00:00Z"],
)
def test_rfc3339_with_offset_accepted(value: str) -> None:
    event = parse(topic("telemetry"), telemetry(occurred_at=value))
    assert isinstance(event, TelemetryEvent) and event.occurred_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "value",
    ["2026-11-27T09:59:30", "2026-11-27", "2026-11-27T09:59Z", "2026-11-27T16:59:30+0700",
     "1795773570", 1795773570, "2026-13-01T00:00:00Z", None, ""],
)
def test_other_timestamps_are_schema(value: object) -> None:
    assert reason_of(topic("telemetry"), telemetry(occurred_at=value)) == "schema"


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
                                   "0000-01-01T00:00:00Z"])
def test_timestamps_without_a_utc_datetime_are_schema(value: str) -> None:
    assert reason_of(topic("telemetry"), telemetry(occurred_at=value)) == "schema"
    media = media_payload(EVENT_ID, AT, jpeg_bytes(), captured_at=value)
    assert reason_of(topic("media"), media) == "schema"


@given(st.from_regex(r"\A\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})\Z"))
def test_fuzz_timestamp_strings(value: str) -> None:
    _only_rejected(topic("telemetry"), telemetry(occurred_at=value))


def test_clock_skew_bounds() -> None:
    assert isinstance(parse(topic("telemetry"), telemetry(occurred_at="2026-11-28T10:00:00Z")), TelemetryEvent)
    assert reason_of(topic("telemetry"), telemetry(occurred_at="2026-11-28T10:00:00.001Z")) == "clock_skew"
    assert reason_of(topic("telemetry"), telemetry(occurred_at="2019-12-31T23:59:59Z")) == "clock_skew"
    assert reason_of(topic("telemetry"), telemetry(occurred_at="2026-11-28T10:00:00.001Z"),
                     max_clock_skew=timedelta(hours=1)) == "clock_skew"


# --- session -------------------------------------------------------------------


def test_session_event() -> None:
    payload = session_payload(EVENT_ID, AT, SESSION_ID, "start", batch_id="batch-2026-11", weight_kg=1.92)
    event = parse(topic("session"), payload)
    assert isinstance(event, SessionEvent)
    assert (event.kind, event.session_id, event.action, event.batch_id, event.weight_kg) == (
        "session", SESSION_ID, "start", "batch-2026-11", 1.92)
    assert event.device_id == "device-1"


@pytest.mark.parametrize("action", ["start", "finalize", "cancel"])
def test_session_actions(action: str) -> None:
    event = parse(topic("session"), session_payload(EVENT_ID, AT, SESSION_ID, action))
    assert isinstance(event, SessionEvent) and event.batch_id is None and event.weight_kg is None


@pytest.mark.parametrize("weight", [0, 0.0, 1000, 1000.0])
def test_weight_bounds_accepted(weight: float) -> None:
    event = parse(topic("session"), session_payload(EVENT_ID, AT, SESSION_ID, "finalize", weight_kg=weight))
    assert isinstance(event, SessionEvent) and event.weight_kg == weight


@pytest.mark.parametrize("weight", [1001, 1000.0001, -0.001, float("nan"), float("inf"), "1.5", True])
def test_weight_rejected(weight: object) -> None:
    payload = session_payload(EVENT_ID, AT, SESSION_ID, "finalize", extra={"weight_kg": weight})
    assert reason_of(topic("session"), payload) == "schema"


def test_bad_action_is_schema() -> None:
    assert reason_of(topic("session"), session_payload(EVENT_ID, AT, SESSION_ID, "pause")) == "schema"


@pytest.mark.parametrize("batch", ["batch 1", "b/1", "..", "b" * 65, "", "bä", "b\n"])
def test_bad_batch_id_is_bad_id(batch: str) -> None:
    payload = session_payload(EVENT_ID, AT, SESSION_ID, "start", extra={"batch_id": batch})
    assert reason_of(topic("session"), payload) == "bad_id"


def test_batch_id_of_wrong_type_is_schema() -> None:
    payload = session_payload(EVENT_ID, AT, SESSION_ID, "start", extra={"batch_id": 12})
    assert reason_of(topic("session"), payload) == "schema"


def test_schema_error_wins_over_named_reason() -> None:
    payload = session_payload(EVENT_ID, AT, SESSION_ID, "pause", batch_id="b 1")
    assert reason_of(topic("session"), payload) == "schema"


def test_any_uuid_version_is_accepted() -> None:
    for event_id in (uuid.uuid1(), uuid.uuid4(), new_id(), UUID(int=0)):
        event = parse(topic("session"), session_payload(event_id, AT, SESSION_ID, "cancel"))
        assert isinstance(event, SessionEvent) and event.event_id == event_id


# --- media -----------------------------------------------------------------------


def test_media_jpeg_with_defaults() -> None:
    event = parse(topic("media"), media_payload(EVENT_ID, AT, jpeg_bytes()))
    assert isinstance(event, MediaEvent)
    assert event.media_id == media_id_for(EVENT_ID)
    assert event.captured_at == event.occurred_at == AT
    assert event.session_id is None and event.mime_type == "image/jpeg"
    assert base64.b64decode(event.image_b64) == jpeg_bytes()


def test_media_redelivery_names_the_same_media() -> None:
    payload = media_payload(EVENT_ID, AT, jpeg_bytes())
    first, second = parse(topic("media"), payload), parse(topic("media"), payload)
    assert isinstance(first, MediaEvent) and isinstance(second, MediaEvent)
    assert first.media_id == second.media_id


def test_media_png_with_all_fields() -> None:
    captured = "2026-11-27T17:00:01.250+07:00"
    payload = media_payload(EVENT_ID, AT, png_bytes(), mime_type="image/png", media_id=MEDIA_ID,
                            session_id=SESSION_ID, captured_at=captured)
    event = parse(topic("media"), payload)
    assert isinstance(event, MediaEvent)
    assert (event.media_id, event.session_id, event.mime_type) == (MEDIA_ID, SESSION_ID, "image/png")
    assert event.captured_at == datetime(2026, 11, 27, 10, 0, 1, 250_000, tzinfo=timezone.utc)


def test_png_labelled_jpeg_is_bad_image() -> None:
    assert reason_of(topic("media"), media_payload(EVENT_ID, AT, png_bytes())) == "bad_image"


def test_jpeg_labelled_png_is_bad_image() -> None:
    payload = media_payload(EVENT_ID, AT, jpeg_bytes(), mime_type="image/png")
    assert reason_of(topic("media"), payload) == "bad_image"


def test_jpeg_without_end_marker_is_bad_image() -> None:
    assert reason_of(topic("media"), media_payload(EVENT_ID, AT, jpeg_bytes()[:-2])) == "bad_image"


def test_png_with_bad_crc_is_bad_image() -> None:
    png = bytearray(png_bytes())
    png[-20] ^= 0xFF  # inside the IDAT data
    payload = media_payload(EVENT_ID, AT, bytes(png), mime_type="image/png")
    assert reason_of(topic("media"), payload) == "bad_image"


@pytest.mark.parametrize("b64", ["####", "abc", "YWJj\nZA==", "YW Jj", "ÿÿÿÿ", ""])
def test_strict_base64(b64: str) -> None:
    payload = media_payload(EVENT_ID, AT, b"", image_b64=b64)
    assert reason_of(topic("media"), payload) == "bad_image"


def test_decoded_size_limit() -> None:
    jpeg = jpeg_bytes()
    assert isinstance(parse(topic("media"), media_payload(EVENT_ID, AT, jpeg), media_max_bytes=len(jpeg)), MediaEvent)
    assert reason_of(topic("media"), media_payload(EVENT_ID, AT, jpeg), media_max_bytes=len(jpeg) - 1) == "too_large"


@pytest.mark.parametrize("size", [(7072, 7071), (10_000, 6_000), (10_000, 10_000), (20_000, 20_000),
                                  (65_535, 65_535)])
def test_pixel_bombs_are_too_large_without_warnings(size: tuple[int, int]) -> None:
    # filterwarnings=error: a DecompressionBombWarning would fail this test.
    payload = media_payload(EVENT_ID, AT, png_claiming_size(*size), mime_type="image/png")
    assert reason_of(topic("media"), payload) == "too_large"


def test_fifty_megapixels_is_allowed() -> None:
    payload = media_payload(EVENT_ID, AT, png_claiming_size(10_000, 5_000), mime_type="image/png")
    assert isinstance(parse(topic("media"), payload), MediaEvent)


def test_raw_payload_limit_is_per_kind_and_comes_before_parsing() -> None:
    payload = telemetry()
    assert isinstance(parse(topic("telemetry"), payload, max_payload_bytes=len(payload)), TelemetryEvent)
    # Not even JSON: the size is refused before the parser sees it.
    assert reason_of(topic("telemetry"), b"{" * (len(payload) + 1), max_payload_bytes=len(payload)) == "too_large"
    assert reason_of(topic("session"), b" " * 2000, max_payload_bytes=1999) == "too_large"
    # Media is bounded by the frame size in base64, not by the small limit.
    big = b" " * 100_000 + telemetry()
    assert reason_of(topic("media"), big, max_payload_bytes=1024) != "too_large"
    limit = media_payload_limit(MEDIA_MAX)
    assert reason_of(topic("media"), b" " * (limit + 1), max_payload_bytes=1024) == "too_large"
    assert limit == 4 * -(-MEDIA_MAX // 3) + 64 * 1024


@pytest.mark.parametrize("value", [1e15, -1e15, 0.0, 5e-324])
def test_metric_value_at_the_bound_is_accepted(value: float) -> None:
    payload = telemetry(readings=[{"metric_type": "t", "metric_value": value, "unit": "C"}])
    assert isinstance(parse(topic("telemetry"), payload), TelemetryEvent)


@pytest.mark.parametrize("value", ["1.0000000000000002e15", "-1.0000000000000002e15", "1.7e308", "1e400"])
def test_metric_value_beyond_the_bound_is_refused(value: str) -> None:
    payload = (b'{"event_id": "%s", "occurred_at": "2026-11-27T09:59:30Z", "readings": '
               b'[{"metric_type": "t", "metric_value": %s, "unit": "C"}]}' % (str(EVENT_ID).encode(), value.encode()))
    assert reason_of(topic("telemetry"), payload) == "schema"


# --- queue round trip and context-free re-validation ---------------------------


def _all_kinds() -> list[object]:
    return [
        parse(topic("telemetry"), telemetry_payload(EVENT_ID, AT, [READING, ("h", 0, "%")], trace_id="x")),
        parse(topic("session"), session_payload(EVENT_ID, AT, SESSION_ID, "finalize", batch_id="b-1", weight_kg=2)),
        parse(topic("media"), media_payload(EVENT_ID, AT, jpeg_bytes(), session_id=SESSION_ID)),
        parse(topic("media"), media_payload(EVENT_ID, AT, png_bytes(), mime_type="image/png",
                                            captured_at="2026-11-27T10:00:01.000001-03:30")),
    ]


def test_round_trip_through_the_queue_is_lossless() -> None:
    events = _all_kinds()
    dumped = [e.model_dump(mode="json") for e in events]  # type: ignore[attr-defined]
    json.dumps(dumped)  # what the queue stores
    assert INGRESS_EVENTS.validate_python(json.loads(json.dumps(dumped))) == events
    assert dumped[0]["occurred_at"] == "2026-11-27T09:59:30.250123Z"


def test_revalidation_skips_receive_time_checks() -> None:
    event = TelemetryEvent(tenant_id="t", farm_id="f", barn_id="b", device_id="d", event_id=EVENT_ID,
                           occurred_at=datetime(2035, 1, 1, tzinfo=timezone.utc),
                           readings=[Reading(metric_type="t", metric_value=1, unit="C")])
    dumped = [event.model_dump(mode="json")]
    assert INGRESS_EVENTS.validate_python(dumped) == [event]
    with pytest.raises(Exception, match="clock_skew|future"):
        INGRESS_EVENTS.validate_python(dumped, context={"now": NOW, "max_clock_skew": SKEW})


def test_revalidation_skips_image_checks_but_not_schema() -> None:
    event = _all_kinds()[2]
    dumped = event.model_dump(mode="json")  # type: ignore[attr-defined]
    assert INGRESS_EVENTS.validate_python([dumped | {"image_b64": "not checked"}])
    with pytest.raises(Exception, match="bad_image|base64"):
        INGRESS_EVENTS.validate_python([dumped | {"image_b64": "!!"}], context={"media_max_bytes": MEDIA_MAX})
    with pytest.raises(Exception):
        INGRESS_EVENTS.validate_python([dumped | {"tenant_id": "../x"}])
    with pytest.raises(Exception):
        INGRESS_EVENTS.validate_python([dumped | {"kind": "video"}])


@given(
    occurred_at=st.datetimes(min_value=datetime(2020, 1, 2), max_value=datetime(2026, 11, 27),
                             timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=7)),
                                                        timezone(timedelta(hours=-9, minutes=-30))])),
    values=st.lists(st.floats(min_value=-1e15, max_value=1e15), min_size=1, max_size=100),
    trace_id=st.none() | st.text(st.characters(min_codepoint=32, exclude_characters="\x7f", exclude_categories=("Cs",)), max_size=64),
)
def test_round_trip_property(occurred_at: datetime, values: list[float], trace_id: str | None) -> None:
    payload = telemetry_payload(EVENT_ID, occurred_at.isoformat(), [("m", v, "u") for v in values],
                                trace_id=trace_id)
    event = parse(topic("telemetry"), payload)
    assert isinstance(event, TelemetryEvent)
    assert event.occurred_at == occurred_at and [r.metric_value for r in event.readings] == values
    assert INGRESS_EVENTS.validate_python([event.model_dump(mode="json")]) == [event]


# --- fuzz: only Rejected, whatever comes in ------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_fields = ["trace_id", "readings", "session_id", "action", "batch_id",
           "weight_kg", "media_id", "captured_at", "mime_type", "image_b64", "tenant_id"]
_plausible = st.fixed_dictionaries(
    {"event_id": st.just(str(EVENT_ID)), "occurred_at": st.just("2026-11-27T09:00:00Z")},
    optional={field: _json_values for field in _fields},
)
_topics = st.one_of(
    st.text(max_size=80),
    st.builds(lambda k, ids: "/".join(["farmiq", "v1", *ids, k]), st.sampled_from([*KINDS, "x"]),
              st.lists(st.sampled_from(["a", "b-1", "..", "", "ä", "x" * 65, "c\n"]), min_size=4, max_size=4)),
    st.sampled_from([topic(kind) for kind in KINDS]),
)


def _only_rejected(topic_: str, payload: bytes) -> None:
    try:
        event = parse(topic_, payload)
    except Rejected as rejected:
        assert rejected.reason in REJECT_REASONS and rejected.reason not in ("session_conflict", "processing_failed")
        assert rejected.detail.isprintable()
    else:
        assert event.kind == topic_.rsplit("/", 1)[-1]  # type: ignore[attr-defined]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(topic_=_topics, payload=st.binary(max_size=300))
def test_fuzz_bytes(topic_: str, payload: bytes) -> None:
    _only_rejected(topic_, payload)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(topic_=_topics, body=_plausible | _json_values)
def test_fuzz_json(topic_: str, body: object) -> None:
    _only_rejected(topic_, json.dumps(body).encode())


@settings(max_examples=200)
@given(valid=st.sampled_from(["telemetry", "session", "media"]), data=st.data())
def test_fuzz_mutated_valid_payloads(valid: str, data: st.DataObject) -> None:
    payload = {
        "telemetry": telemetry(),
        "session": session_payload(EVENT_ID, AT, SESSION_ID, "start", batch_id="b1", weight_kg=1),
        "media": media_payload(EVENT_ID, AT, jpeg_bytes()),
    }[valid]
    raw = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    _only_rejected(topic(valid), bytes(raw))


@pytest.mark.parametrize("payload", [b"[" * 100_000, b'{"readings":' + b"[" * 100_000, b"{" * 50_000,
                                     b'{"a":' * 50_000])
def test_deeply_nested_json_is_rejected(payload: bytes) -> None:
    assert reason_of(topic("telemetry"), payload, max_payload_bytes=len(payload)) in {"invalid_json", "schema"}
