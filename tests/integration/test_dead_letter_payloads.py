"""Every dead letter keeps the bytes received (first 64 KiB) and their full length (SPEC §1.5),
whoever writes it: the bridge (every rejection rule, a topic that is not UTF-8,
a payload over 64 KiB) and the ingest actor (session_conflict, processing_failed; a frame,
whose bytes are on the media volume, fails its queue message instead)."""

import uuid
from datetime import datetime, timedelta, timezone

import pytest

import actors.ingest
from actors.ingest import ingest_batch, ingest_isolated
from models.ingress_dead_letters import MAX_DEAD_LETTER_PAYLOAD
from models.messages import INGRESS_EVENTS
from models.settings import load_settings
from schema.db import transaction
from tests.integration.test_aggregate import parse_telemetry, query
from tests.support import corpus
from workers.bridge import Delivery, commit_batch

MEDIA_MAX = 256 * 1024  # keeps the size cases of the corpus small


def letters(db_url: str) -> list[dict]:
    rows = query(db_url, "SELECT topic, reason, payload, payload_size_bytes FROM ingress_dead_letters")
    return [r | {"payload": bytes(r["payload"])} for r in rows]


def test_bridge_dead_letters_keep_the_received_bytes(db_url: str) -> None:
    settings = load_settings(database_url=db_url, media_max_bytes=MEDIA_MAX)
    now = datetime.now(timezone.utc)
    cases = corpus.invalid_cases(now, media_max_bytes=MEDIA_MAX, max_payload_bytes=settings.max_payload_bytes)
    received = [(t.encode(), p) for t, p, _ in cases]
    received.append((b"farmiq/v1/\xff\xfe/farm-1/barn-1/device-1/telemetry", b"\x00\xffnot utf-8 either"))
    received.append((corpus.topic("telemetry").encode(), b"[" * 100_000))  # over 64 KiB, invalid JSON
    commit_batch(settings, [Delivery(i, t, p, 1) for i, (t, p) in enumerate(received)])

    stored = sorted((r["payload"], r["payload_size_bytes"]) for r in letters(db_url))
    expected = sorted((p[:MAX_DEAD_LETTER_PAYLOAD], len(p)) for _, p in received)
    assert len(stored) == len(received) > 40
    assert stored == expected
    assert {r["reason"] for r in letters(db_url)} >= {"too_large", "bad_topic", "invalid_json", "schema"}


def test_session_conflict_keeps_the_bytes_the_device_sent(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(database_url=db_url)
    monkeypatch.setattr(actors.ingest, "get_settings", lambda: settings)
    at = datetime.now(timezone.utc) - timedelta(minutes=1)
    sid = uuid.uuid4()
    mine = corpus.session_payload(uuid.uuid4(), at, sid, "start", weight_kg=1.5)
    # Odd but valid JSON: spacing and key order the bridge must not "normalize".
    theirs = (b'{ "action":"finalize",  "session_id": "%s",\n "event_id": "%s", "occurred_at": "%s",'
              b' "weight_kg": 9.0 }' % (str(sid).encode(), str(uuid.uuid4()).encode(),
                                       corpus.timestamp(at + timedelta(seconds=5)).encode()))
    commit_batch(settings, [Delivery(1, corpus.topic("session").encode(), mine, 1),
                            Delivery(2, corpus.topic("session", device_id="device-2").encode(), theirs, 1)])
    for (body,) in query_bodies(db_url):
        ingest_batch.fn(*body["args"], **body["kwargs"])
    [letter] = letters(db_url)
    assert letter["reason"] == "session_conflict"
    assert letter["payload"] == theirs and letter["payload_size_bytes"] == len(theirs)


def query_bodies(db_url: str) -> list[tuple[dict]]:
    return [(r["message"],) for r in query(db_url, "SELECT message FROM dramatiq.queue WHERE queue_name = 'ingest'")]


def refuse_inserts(table: str, condition: str) -> str:
    """A trigger that makes PostgreSQL refuse the rows of `table` matching `condition`."""
    name = table.replace(".", "_")
    return f"""
        CREATE FUNCTION test_refuse_{name}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF {condition} THEN RAISE EXCEPTION 'refused on purpose'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_{name} BEFORE INSERT ON {table}
            FOR EACH ROW EXECUTE FUNCTION test_refuse_{name}();
    """


REFUSE_DEVICE = refuse_inserts("telemetry_raw", "NEW.device_id = 'poison'")


def test_ingest_isolates_the_event_that_fails(db_url: str) -> None:
    with transaction(db_url) as conn:
        conn.exec_driver_sql(REFUSE_DEVICE)
    at = datetime.now(timezone.utc) - timedelta(minutes=1)
    events = [parse_telemetry(uuid.UUID(int=i + 1), at, [("t", float(i), "C")],
                              device_id="poison" if i == 13 else f"dev-{i % 5}") for i in range(40)]
    # Through the queue's JSON form, as the actor receives them.
    events = INGRESS_EVENTS.validate_python([e.model_dump(mode="json") for e in events])
    result = ingest_isolated(db_url, events, sync_telemetry="agg")
    assert result.accepted == {"telemetry": 39} and result.rejected == {"processing_failed": 1}
    assert query(db_url, "SELECT count(*) AS n FROM telemetry_raw")[0]["n"] == 39
    [letter] = letters(db_url)
    assert letter["reason"] == "processing_failed" and letter["topic"].endswith("/poison/telemetry")
    assert query(db_url, "SELECT detail FROM ingress_dead_letters")[0]["detail"] == "RaiseException P0001"
    # The failed event took no dedupe key: a redelivery (after a fix) can still apply it.
    assert query(db_url, "SELECT count(*) AS n FROM ingress_dedupe")[0]["n"] == 39


def test_processing_failed_keeps_the_bytes_the_device_sent(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the bridge's queue form: the actor isolates the event that fails and
    dead-letters the payload as received, not a re-encoding of the event."""
    settings = load_settings(database_url=db_url)
    monkeypatch.setattr(actors.ingest, "get_settings", lambda: settings)
    with transaction(db_url) as conn:
        conn.exec_driver_sql(REFUSE_DEVICE)
    at = datetime.now(timezone.utc) - timedelta(minutes=1)
    good = [(corpus.topic("telemetry", device_id=f"dev-{i}"),
             corpus.telemetry_payload(uuid.uuid4(), at, [("t", float(i), "C")])) for i in range(20)]
    # Valid, with spacing, key order, an integer value and an offset the bridge must not normalize.
    theirs = (b'{ "readings": [ {"unit":"C", "metric_value": 7, "metric_type":"t"} ],\n'
              b'  "occurred_at": "%s", "event_id": "%s" }' % (
                  at.astimezone(timezone(timedelta(hours=7))).isoformat().encode(), str(uuid.uuid4()).encode()))
    received = good[:10] + [(corpus.topic("telemetry", device_id="poison"), theirs)] + good[10:]
    commit_batch(settings, [Delivery(i, t.encode(), p, 1) for i, (t, p) in enumerate(received)])
    [(body,)] = query_bodies(db_url)
    assert body["kwargs"]["received_in"] == body["message_id"]  # the payloads are beside it
    assert all(isinstance(row[9], int) for row in body["args"][0])  # offsets there, not base64
    ingest_batch.fn(*body["args"], **body["kwargs"])
    [letter] = letters(db_url)
    assert letter["reason"] == "processing_failed" and letter["topic"].endswith("/poison/telemetry")
    assert letter["payload"] == theirs and letter["payload_size_bytes"] == len(theirs)
    assert query(db_url, "SELECT count(*) AS n FROM telemetry_raw")[0]["n"] == 20


REFUSE_MEDIA_HAND_OFF = refuse_inserts("dramatiq.queue", "NEW.queue_name = 'media'")


def test_a_frame_whose_hand_off_fails_is_retried_not_dead_lettered(db_url: str, tmp_path) -> None:
    """A frame's bytes are on the media volume, not in the queue: the event that
    cannot be handed off fails its message (retried, then `rejected`), the rest commits."""
    from tests.integration.test_media import parsed, spooled
    from workers.dev.frames import bird_frame
    with transaction(db_url) as conn:
        conn.exec_driver_sql(REFUSE_MEDIA_HAND_OFF)
    at = datetime.now(timezone.utc) - timedelta(minutes=1)
    telemetry = [parse_telemetry(uuid.UUID(int=i + 1), at, [("t", float(i), "C")]) for i in range(6)]
    frame = spooled(tmp_path, parsed(bird_frame(seed=3).data))
    result = ingest_isolated(db_url, telemetry[:3] + [frame] + telemetry[3:], sync_telemetry="agg")
    assert result.frames_not_handed_off == ["RaiseException P0001"] and not result.rejected
    assert query(db_url, "SELECT count(*) AS n FROM telemetry_raw")[0]["n"] == 6
    assert letters(db_url) == []
    # The frame took no dedupe key: the retried message hands it off once the cause is gone.
    assert query(db_url, "SELECT count(*) AS n FROM ingress_dedupe")[0]["n"] == 6
