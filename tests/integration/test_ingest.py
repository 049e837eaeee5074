"""The ingest handler (`actors.ingest.ingest_events`) against real PostgreSQL.

Events are built with `parse_message` from corpus payloads, exactly as the
bridge builds them; each call runs in its own `schema.db.transaction`, the
unit of work of the ingest actor.
"""

import hashlib
from datetime import datetime, timedelta, timezone
from itertools import permutations
from typing import Any
from uuid import UUID, uuid4

import psycopg2
import psycopg2.extras
import pytest

from actors.ingest import ingest_events
from models.media_path import staging_name
from models.messages import StagedImage, parse_message
from models.session_rules import apply_session_event
from schema.db import transaction
from tests.support import corpus

NOW = datetime.now(timezone.utc)
T0 = (NOW - timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)

# Every table an ingest can write to (and the queue table, for the media hand-off).
TABLES = ("ingress_dedupe", "telemetry_raw", "telemetry_agg_pending", "telemetry_agg", "sync_outbox",
          "weight_sessions", "ingress_dead_letters", "media_objects", "dramatiq.queue")


def parse(kind: str, payload: bytes, **topic_ids: str) -> Any:
    return parse_message(corpus.topic(kind, **topic_ids), payload, now=NOW,
                         max_clock_skew=timedelta(hours=24),
                         media_max_bytes=corpus.DEFAULT_MEDIA_MAX_BYTES,
                         max_payload_bytes=corpus.default_max_payload_bytes(corpus.DEFAULT_MEDIA_MAX_BYTES))


def telemetry(event_id: UUID, at: datetime, readings: list, **topic_ids: str) -> Any:
    return parse("telemetry", corpus.telemetry_payload(event_id, at, readings), **topic_ids)


def session(event_id: UUID, at: datetime, session_id: UUID, action: str, **kw: Any) -> Any:
    topic_ids = {k: kw.pop(k) for k in ("tenant_id", "device_id") if k in kw}
    return parse("session", corpus.session_payload(event_id, at, session_id, action, **kw), **topic_ids)


def media(event_id: UUID, at: datetime, **kw: Any) -> Any:
    """A media event as the bridge enqueues it: bytes spooled, a staging reference instead."""
    data = corpus.jpeg_bytes()
    event = parse("media", corpus.media_payload(event_id, at, data, **kw))
    sha = hashlib.sha256(data).hexdigest()
    staged = StagedImage(name=staging_name(event.event_id, sha, event.mime_type), sha256=sha,
                         size_bytes=len(data))
    return event.model_copy(update={"image_b64": None, "staged": staged})


def ingest(db_url: str, events: list, sync_telemetry: str = "agg") -> tuple[dict, dict, dict]:
    with transaction(db_url) as conn:
        result = ingest_events(conn, events, sync_telemetry=sync_telemetry)
    return _nonzero(result.accepted), _nonzero(result.duplicates), _nonzero(result.rejected)


def _nonzero(counter: dict) -> dict:
    return {k: v for k, v in counter.items() if v}


def query(db_url: str, sql: str, params: tuple = ()) -> list[psycopg2.extras.RealDictRow]:
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def counts(db_url: str) -> dict[str, int]:
    return {t: query(db_url, f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in TABLES}


def outbox(db_url: str, event_type: str | None = None) -> list:
    where = "WHERE event_type = %s" if event_type else ""
    return query(db_url, f"SELECT * FROM sync_outbox {where} ORDER BY id",
                 (event_type,) if event_type else ())


def ev(n: int) -> UUID:
    return UUID(int=0x0199A0B2_6C1E_7D3A_9F10_000000000000 + n)


# --- dedupe --------------------------------------------------------------------


def mixed_batch() -> list:
    sid = ev(900)
    return [telemetry(ev(1), T0, [("temperature", 23.4, "C"), ("humidity", 61.0, "%")]),
            telemetry(ev(2), T0 + timedelta(seconds=30), [("temperature", 23.6, "C")]),
            session(ev(3), T0, sid, "start", batch_id="batch-1", weight_kg=1.5),
            session(ev(4), T0 + timedelta(minutes=5), sid, "finalize", weight_kg=2.25),
            media(ev(5), T0 + timedelta(minutes=1), session_id=sid)]


def test_same_batch_twice_takes_effect_once(db_url: str) -> None:
    batch = mixed_batch()
    accepted, dups, rejected = ingest(db_url, batch, "both")
    assert accepted == {"telemetry": 2, "session": 2, "media": 1}
    assert dups == {} and rejected == {}
    after_first = counts(db_url)
    assert after_first == {"ingress_dedupe": 5, "telemetry_raw": 3, "telemetry_agg_pending": 2,
                           "telemetry_agg": 0, "sync_outbox": 4, "weight_sessions": 1,
                           "ingress_dead_letters": 0, "media_objects": 0, "dramatiq.queue": 1}
    session_row = query(db_url, "SELECT * FROM weight_sessions")

    accepted, dups, rejected = ingest(db_url, batch, "both")
    assert accepted == {} and rejected == {}
    assert dups == {"telemetry": 2, "session": 2, "media": 1}
    # Only the frame is handed off again: the media actor removes its re-spooled copy.
    assert counts(db_url) == after_first | {"dramatiq.queue": 2}
    assert query(db_url, "SELECT * FROM weight_sessions") == session_row


def test_duplicates_within_one_batch(db_url: str) -> None:
    a = telemetry(ev(1), T0, [("temperature", 20.0, "C"), ("humidity", 50.0, "%")])
    b = telemetry(ev(2), T0, [("temperature", 21.0, "C")])
    accepted, dups, _ = ingest(db_url, [a, a, b, a, b], "raw")
    assert accepted == {"telemetry": 2}
    assert dups == {"telemetry": 3}
    assert counts(db_url) | {"dramatiq.queue": 0} == {
        "ingress_dedupe": 2, "telemetry_raw": 3, "telemetry_agg_pending": 2, "telemetry_agg": 0,
        "sync_outbox": 2, "weight_sessions": 0, "ingress_dead_letters": 0, "media_objects": 0,
        "dramatiq.queue": 0}
    # One pending partial per (device, metric, minute), holding both events' readings once.
    pending = query(db_url, "SELECT metric_type, count, sum_value FROM telemetry_agg_pending ORDER BY 1")
    assert [tuple(r.values()) for r in pending] == [("humidity", 1, 50.0), ("temperature", 2, 41.0)]


def test_same_event_id_under_two_tenants_is_two_events(db_url: str) -> None:
    readings = [("temperature", 19.5, "C")]
    a = telemetry(corpus.EVENT_ID, T0, readings, tenant_id="tenant-a")
    b = telemetry(corpus.EVENT_ID, T0, readings, tenant_id="tenant-b")
    assert ingest(db_url, [a, b])[0] == {"telemetry": 2}
    rows = query(db_url, "SELECT tenant_id, count(*) AS n FROM telemetry_raw GROUP BY 1 ORDER BY 1")
    assert [(r["tenant_id"], r["n"]) for r in rows] == [("tenant-a", 1), ("tenant-b", 1)]
    dedupe = query(db_url, "SELECT tenant_id, event_id FROM ingress_dedupe ORDER BY 1")
    assert [(r["tenant_id"], r["event_id"]) for r in dedupe] == [
        ("tenant-a", str(corpus.EVENT_ID)), ("tenant-b", str(corpus.EVENT_ID))]
    # A redelivery of either one is now a duplicate, but only under its own tenant.
    assert ingest(db_url, [b])[1] == {"telemetry": 1}
    c = telemetry(corpus.EVENT_ID, T0, readings, tenant_id="tenant-c")
    assert ingest(db_url, [c])[0] == {"telemetry": 1}


def test_rolled_back_ingest_leaves_no_dedupe_row_so_a_retry_takes_effect(db_url: str) -> None:
    batch = mixed_batch()
    with pytest.raises(RuntimeError, match="crash after ingest"), transaction(db_url) as conn:
        result = ingest_events(conn, batch, sync_telemetry="both")
        assert sum(result.accepted.values()) == 5
        raise RuntimeError("crash after ingest, before commit")
    assert all(n == 0 for n in counts(db_url).values()), counts(db_url)

    accepted, dups, _ = ingest(db_url, batch, "both")
    assert accepted == {"telemetry": 2, "session": 2, "media": 1} and dups == {}
    assert counts(db_url)["telemetry_raw"] == 3
    assert counts(db_url)["ingress_dedupe"] == 5


# --- telemetry_raw -----------------------------------------------------------------


def test_one_raw_row_per_reading_with_uuid7_ids_and_exact_utc_time(db_url: str) -> None:
    # Microseconds and a +07:00 offset on the wire; stored as the same instant.
    moment = (NOW - timedelta(hours=1)).replace(microsecond=123456)
    wire = moment.astimezone(timezone(timedelta(hours=7))).isoformat()
    assert wire.endswith(".123456+07:00")
    readings = [("temperature", 23.4, "C"), ("humidity", 61.0, "%"), ("temperature", -0.125, "C"),
                ("co2", 1.5e6, "ppm")]
    event = parse("telemetry", corpus.telemetry_payload(ev(1), wire, readings), device_id="dev-7")
    ingest(db_url, [event])

    rows = query(db_url, """
        SELECT id, tenant_id, farm_id, barn_id, device_id, metric_type, metric_value, unit,
               to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') AS utc,
               occurred_at, ingested_at
          FROM telemetry_raw ORDER BY metric_type, metric_value""")
    assert [(r["metric_type"], r["metric_value"], r["unit"]) for r in rows] == sorted(readings)
    expected_utc = moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    for r in rows:
        assert (r["tenant_id"], r["farm_id"], r["barn_id"], r["device_id"]) == (
            corpus.TENANT, corpus.FARM, corpus.BARN, "dev-7")
        assert r["utc"] == expected_utc
        assert r["occurred_at"] == moment
        assert UUID(r["id"]).version == 7
    assert len({r["id"] for r in rows}) == len(readings)
    # v7 ids are time-ordered: their 48-bit millisecond prefix is close to ingested_at.
    for r in rows:
        ms = UUID(r["id"]).int >> 80
        id_time = datetime.fromtimestamp(ms / 1000, timezone.utc)
        assert abs(id_time - r["ingested_at"]) < timedelta(minutes=1)


# --- outbox per EDGE_SYNC_TELEMETRY -----------------------------------------------------


@pytest.mark.parametrize("mode, raw_events", [("agg", False), ("raw", True), ("both", True)])
def test_telemetry_outbox_follows_sync_mode(db_url: str, mode: str, raw_events: bool) -> None:
    a = telemetry(ev(1), T0, [("temperature", 20.0, "C"), ("humidity", 50.0, "%")])
    b = telemetry(ev(2), T0 + timedelta(seconds=5), [("temperature", 21.0, "C")])
    c = parse("telemetry", corpus.telemetry_payload(ev(3), T0 + timedelta(seconds=9),
                                                    [("temperature", 22.0, "C")], trace_id="trace-42"),
              device_id="device-2")
    ingest(db_url, [a, b, a], mode)
    ingest(db_url, [b, c, a, c], mode)  # one new message among redeliveries

    rows = outbox(db_url)
    assert all(r["event_type"] == "telemetry.ingested" for r in rows)  # ingest never aggregates
    if not raw_events:
        assert rows == []
        return
    assert len(rows) == 3
    by_source = {r["payload_json"]["source_event_id"]: r for r in rows}
    assert set(by_source) == {str(ev(1)), str(ev(2)), str(ev(3))}
    first = by_source[str(ev(1))]
    assert first["payload_json"]["readings"] == [
        {"metric_type": "temperature", "metric_value": 20.0, "unit": "C"},
        {"metric_type": "humidity", "metric_value": 50.0, "unit": "%"}]
    assert (first["tenant_id"], first["farm_id"], first["barn_id"], first["device_id"]) == (
        corpus.TENANT, corpus.FARM, corpus.BARN, corpus.DEVICE)
    assert first["occurred_at"] == T0 and first["status"] == "pending"
    assert first["session_id"] is None and first["trace_id"] is None
    third = by_source[str(ev(3))]
    assert third["device_id"] == "device-2" and third["trace_id"] == "trace-42"
    assert all(UUID(r["id"]).version == 7 for r in rows)


@pytest.mark.parametrize("mode", ["raw", "both"])
def test_telemetry_outbox_row_rolls_back_with_the_ingest(db_url: str, mode: str) -> None:
    event = telemetry(ev(1), T0, [("temperature", 20.0, "C")])
    with pytest.raises(RuntimeError), transaction(db_url) as conn:
        ingest_events(conn, [event], sync_telemetry=mode)
        inside = conn.exec_driver_sql("SELECT count(*) FROM sync_outbox").scalar_one()
        assert inside == 1  # written by the ingest, in its transaction
        raise RuntimeError("rollback")
    assert counts(db_url)["sync_outbox"] == 0
    assert counts(db_url)["telemetry_raw"] == 0


# --- sessions (SPEC §1.3) ---------------------------------------------------------------

SID = UUID("0199a0b2-6c1e-7d3a-9f10-2b6f3f0e9a12")


def session_row(db_url: str, sid: UUID = SID) -> dict:
    rows = query(db_url, """SELECT tenant_id, farm_id, barn_id, device_id, batch_id, status, start_at,
                                   end_at, initial_weight_kg, final_weight_kg
                              FROM weight_sessions WHERE id = %s""", (str(sid),))
    assert len(rows) == 1
    return dict(rows[0])


def session_events(db_url: str, sid: UUID = SID) -> list:
    return query(db_url, "SELECT * FROM sync_outbox WHERE session_id = %s ORDER BY id", (str(sid),))


def owner(**changes: Any) -> dict:
    return {"tenant_id": corpus.TENANT, "farm_id": corpus.FARM, "barn_id": corpus.BARN,
            "device_id": corpus.DEVICE} | changes


def test_finalize_before_start(db_url: str) -> None:
    start_at, end_at = T0, T0 + timedelta(minutes=5)
    ingest(db_url, [session(ev(2), end_at, SID, "finalize", weight_kg=2.25)])
    assert session_row(db_url) == owner(batch_id=None, status="finalized", start_at=None, end_at=end_at,
                                        initial_weight_kg=None, final_weight_kg=2.25)
    ingest(db_url, [session(ev(1), start_at, SID, "start", batch_id="batch-7", weight_kg=1.5)])
    final = owner(batch_id="batch-7", status="finalized", start_at=start_at, end_at=end_at,
                  initial_weight_kg=1.5, final_weight_kg=2.25)
    assert session_row(db_url) == final

    events = session_events(db_url)
    assert [e["event_type"] for e in events] == ["weighvision.session.finalized",
                                                 "weighvision.session.created"]
    assert [e["payload_json"]["source_event_id"] for e in events] == [str(ev(2)), str(ev(1))]
    # Each event carries the state after its change; a start never reopens the session.
    assert events[0]["payload_json"]["status"] == "finalized"
    assert events[0]["payload_json"]["start_at"] is None
    assert events[1]["payload_json"] == {
        "session_id": str(SID), "source_event_id": str(ev(1)), "status": "finalized",
        "batch_id": "batch-7", "start_at": start_at.isoformat(), "end_at": end_at.isoformat(),
        "initial_weight_kg": 1.5, "final_weight_kg": 2.25}
    assert [e["occurred_at"] for e in events] == [end_at, start_at]
    assert all((e["tenant_id"], e["device_id"]) == (corpus.TENANT, corpus.DEVICE) for e in events)


def test_duplicate_finalize_keeps_the_first(db_url: str) -> None:
    ingest(db_url, [session(ev(1), T0, SID, "start", weight_kg=1.5)])
    ingest(db_url, [session(ev(2), T0 + timedelta(minutes=5), SID, "finalize", weight_kg=2.25)])
    # Another finalize for the same session: a device retry with a new event id.
    accepted, dups, _ = ingest(db_url, [session(ev(3), T0 + timedelta(minutes=7), SID, "finalize",
                                                weight_kg=2.75)])
    assert accepted == {"session": 1} and dups == {}
    assert session_row(db_url) == owner(batch_id=None, status="finalized", start_at=T0,
                                        end_at=T0 + timedelta(minutes=5), initial_weight_kg=1.5,
                                        final_weight_kg=2.25)
    assert [e["event_type"] for e in session_events(db_url)] == ["weighvision.session.created",
                                                                 "weighvision.session.finalized"]


def test_cancel_after_finalize_does_not_cancel(db_url: str) -> None:
    ingest(db_url, [session(ev(1), T0, SID, "start", weight_kg=1.5),
                    session(ev(2), T0 + timedelta(minutes=5), SID, "finalize", weight_kg=2.25)])
    ingest(db_url, [session(ev(3), T0 + timedelta(minutes=6), SID, "cancel")])
    assert session_row(db_url)["status"] == "finalized"
    assert session_row(db_url)["end_at"] == T0 + timedelta(minutes=5)
    assert session_row(db_url)["final_weight_kg"] == 2.25
    assert [e["event_type"] for e in session_events(db_url)] == ["weighvision.session.created",
                                                                 "weighvision.session.finalized"]


def test_any_arrival_order_gives_the_in_order_result(db_url: str) -> None:
    """start, finalize, a later duplicate finalize and a later cancel, in all 24 orders,
    one event per batch, each order with its own session id."""
    def lifecycle(sid: UUID, base: int) -> list:
        return [session(ev(base + 1), T0, sid, "start", batch_id="batch-1", weight_kg=1.5),
                session(ev(base + 2), T0 + timedelta(minutes=5), sid, "finalize", weight_kg=2.25),
                session(ev(base + 3), T0 + timedelta(minutes=7), sid, "finalize", weight_kg=2.75),
                session(ev(base + 4), T0 + timedelta(minutes=9), sid, "cancel")]

    in_order = owner(batch_id="batch-1", status="finalized", start_at=T0,
                     end_at=T0 + timedelta(minutes=5), initial_weight_kg=1.5, final_weight_kg=2.25)
    for n, order in enumerate(permutations(range(4))):
        sid = uuid4()
        events = lifecycle(sid, 10 * n)
        changes, state = 0, None
        for i in order:
            ingest(db_url, [events[i]])
            new = apply_session_event(state, events[i].action, events[i].occurred_at,
                                      events[i].weight_kg, events[i].batch_id)
            if new is not None:
                changes, state = changes + 1, new
        assert session_row(db_url, sid) == in_order, order
        emitted = session_events(db_url, sid)
        assert len(emitted) == changes, order  # one outbox event per state change
        assert emitted[-1]["payload_json"]["status"] == "finalized"
        assert emitted[-1]["payload_json"]["final_weight_kg"] == 2.25
        # Redelivering everything at once changes nothing.
        ingest(db_url, events)
        assert len(session_events(db_url, sid)) == changes
    # All four in one batch, shuffled: same result, in-order outbox (created, finalized).
    sid = uuid4()
    ingest(db_url, [lifecycle(sid, 900)[i] for i in (3, 2, 1, 0)])
    assert session_row(db_url, sid) == in_order
    assert [e["event_type"] for e in session_events(db_url, sid)] == [
        "weighvision.session.created", "weighvision.session.finalized"]


@pytest.mark.parametrize("intruder", [{"device_id": "device-2"}, {"tenant_id": "tenant-b"}])
def test_session_id_reused_by_another_device_is_a_dead_letter(db_url: str, intruder: dict) -> None:
    ingest(db_url, [session(ev(1), T0, SID, "start", weight_kg=1.5)])
    before = session_row(db_url)
    outbox_before = len(outbox(db_url))

    accepted, _, rejected = ingest(db_url, [session(ev(2), T0 + timedelta(minutes=1), SID, "finalize",
                                                    weight_kg=9.0, **intruder)])
    assert accepted == {"session": 1}  # taken (deduped) once, as a rejection
    assert rejected == {"session_conflict": 1}
    assert session_row(db_url) == before  # untouched: still created, on its own device
    assert before["status"] == "created" and before["device_id"] == corpus.DEVICE
    assert len(outbox(db_url)) == outbox_before
    letters = query(db_url, "SELECT topic, reason, payload FROM ingress_dead_letters")
    assert len(letters) == 1
    assert letters[0]["reason"] == "session_conflict"
    assert letters[0]["topic"] == corpus.topic("session", **intruder)
    assert str(SID).encode() in bytes(letters[0]["payload"])


# --- media hand-off ---------------------------------------------------------------------


def media_messages(db_url: str) -> list:
    return query(db_url, "SELECT queue_name, state, message FROM dramatiq.queue")


def test_media_event_enqueues_one_media_message_per_delivery(db_url: str) -> None:
    event = media(ev(1), T0, session_id=SID)
    assert ingest(db_url, [event, event])[0] == {"media": 1}
    assert len(media_messages(db_url)) == 1  # one per batch
    # A redelivery, spooled again by the bridge: handed off again, so the media
    # actor removes that copy (tests/integration/test_media.py); a duplicate still.
    assert ingest(db_url, [event])[1] == {"media": 1}
    messages = media_messages(db_url)
    assert len(messages) == 2
    assert messages[0]["message"]["kwargs"] == messages[1]["message"]["kwargs"]
    m = messages[0]
    assert (m["queue_name"], m["state"]) == ("media", "queued")
    assert m["message"]["actor_name"] == "store_media"
    assert m["message"]["queue_name"] == "media"
    sent = m["message"]["kwargs"]["event"]
    assert sent["event_id"] == str(ev(1)) and sent["session_id"] == str(SID)
    assert sent["media_id"] == str(event.media_id)
    assert sent["tenant_id"] == corpus.TENANT and "image_b64" not in sent  # bytes travel once
    assert sent["staged"] == event.staged.model_dump(mode="json")
    assert counts(db_url)["media_objects"] == 0  # the media actor writes the file and row


def test_media_hand_off_rolls_back_with_the_ingest(db_url: str) -> None:
    event = media(ev(1), T0)
    with pytest.raises(RuntimeError), transaction(db_url) as conn:
        ingest_events(conn, [event], sync_telemetry="agg")
        assert conn.exec_driver_sql("SELECT count(*) FROM dramatiq.queue").scalar_one() == 1
        raise RuntimeError("rollback")
    assert media_messages(db_url) == []
    assert counts(db_url)["ingress_dedupe"] == 0
    # The retry hands the frame off.
    assert ingest(db_url, [event])[0] == {"media": 1}
    assert len(media_messages(db_url)) == 1
