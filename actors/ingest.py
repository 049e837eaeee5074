"""Queue `ingest`: apply a micro-batch of validated MQTT events in one transaction.

Commit point: the single transaction in `ingest_batch`. Before it commits,
nothing of the batch is visible (a crash rolls everything back and the queue
message is redelivered); after it, the dedupe rows make a redelivery a no-op.
"""

from actors.broker import broker  # noqa: I001 - the broker is set before any actor

import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import dramatiq

from dramatiq.message import Message
from pydantic import ValidationError
from sqlalchemy import Connection, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from actors.queue_dead_letters import PermanentError
from actors.database_outage import ride_out_database_outage
from actors.faults import crash_point
from actors.metrics import INGRESS_ACCEPTED, INGRESS_DUPLICATES, INGRESS_REJECTED
from models.ingress_dead_letters import dead_letter_row
from models.messages import MediaEvent, SessionEvent, TelemetryEvent
from models.outbox_events import outbox_row
from models.ids import new_id_texts
from models.queue_events import QueuedTelemetry, received_bytes
from models.queue_events import decode as decode_queue_events
from models.session_rules import SessionState, apply_session_event, session_event_type
from models.settings import get_settings
from models.tables import (ingress_dead_letters, sync_outbox, telemetry_agg_pending, telemetry_raw,
                           weight_sessions)
from schema.db import DB_ERRORS, db_error_class, is_connection_error, raw_cursor, transaction

MEDIA_QUEUE, MEDIA_ACTOR = "media", "store_media"
log = logging.getLogger("farmiq_edge.ingest")
INFERENCE_QUEUE, SUMMARY_ACTOR = "inference", "summarize_session"

# Hot-path bulk writes (ARCHITECTURE: "execute_values / COPY"). With SQLAlchemy
# insertmanyvalues, building and parsing 1,000-row INSERTs of telemetry_raw cost
# ~24 us per row in the worker and ~24 us in PostgreSQL; COPY costs ~3 and ~7
# (2-core box). The dedupe keys go in as two arrays in one INSERT; event ids
# travel as text both ways, so no UUID objects are made per event.
DEDUPE_INSERT = text("""
    INSERT INTO ingress_dedupe (tenant_id, event_id)
    SELECT k.tenant_id, k.event_id
      FROM unnest(CAST(:tenant_ids AS text[]), CAST(:event_ids AS uuid[]))
           WITH ORDINALITY AS k(tenant_id, event_id, n)
     ORDER BY k.n
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, event_id::text
""")
# One event's payload from the bytes stored beside its queue message (a dead letter).
RECEIVED_SLICE = text("""
    SELECT substring(received FROM :start FOR :length) FROM dramatiq.queue WHERE message_id = CAST(:id AS uuid)
""")
# Does a session have stored frames (index media_objects_tenant_session_idx)?
SESSION_HAS_FRAMES = text("""
    SELECT EXISTS (SELECT 1 FROM media_objects WHERE tenant_id = :tenant_id AND session_id = :session_id)
""")
RAW_COLUMNS = ("id", "tenant_id", "farm_id", "barn_id", "device_id", "occurred_at", "metric_type",
               "metric_value", "unit")
PENDING_COLUMNS = ("tenant_id", "farm_id", "barn_id", "device_id", "metric_type", "bucket_start_at",
                   "count", "sum_value", "min_value", "max_value")


class FrameHandOffFailed(Exception):
    """A frame of the batch could not be handed to the media queue; the rest committed."""


class CopyDataError(ValueError):
    """A value would break COPY's text format (never for validated events)."""


@dataclass
class IngestResult:
    accepted: dict[str, int]
    duplicates: dict[str, int]
    rejected: dict[str, int]
    frames_not_handed_off: list[str] = field(default_factory=list)  # error classes

    def __add__(self, other: "IngestResult") -> "IngestResult":
        return IngestResult(self.accepted + other.accepted, self.duplicates + other.duplicates,
                            self.rejected + other.rejected,
                            self.frames_not_handed_off + other.frames_not_handed_off)


@dramatiq.actor(queue_name="ingest", max_retries=10)
@ride_out_database_outage
def ingest_batch(events: list[list | dict[str, Any]], received_in: str | None = None) -> None:
    """`events`: models/queue_events.py; `received_in`: the queue message whose
    `received` bytes hold the telemetry payloads (the bridge's own message)."""
    try:
        parsed = decode_queue_events(events)
    except ValidationError as exc:
        raise PermanentError(f"batch fails validation ({exc.error_count()} errors)") from None
    settings = get_settings()
    result = ingest_isolated(settings.database_url, parsed, sync_telemetry=settings.sync_telemetry,
                             received_in=received_in)
    for kind, n in result.accepted.items():
        INGRESS_ACCEPTED.labels(kind).inc(n)
    for kind, n in result.duplicates.items():
        INGRESS_DUPLICATES.labels(kind).inc(n)
    for reason, n in result.rejected.items():
        INGRESS_REJECTED.labels(reason).inc(n)
    if result.frames_not_handed_off:
        # The rest of the batch is committed; the retry hands these frames off (see ingest_isolated).
        raise FrameHandOffFailed(f"{len(result.frames_not_handed_off)} frame(s) not handed off: "
                                 f"{result.frames_not_handed_off[0]}")


def ingest_isolated(database_url: str, events: list, *, sync_telemetry: str,
                    received_in: str | None = None) -> IngestResult:
    """Apply `events` in one transaction (commit point); if it fails on the data,
    bisect: each half in its own transaction, down to the one event that fails,
    which is dead-lettered (processing_failed) while the rest commits.

    Redelivered halves are harmless: a committed half's dedupe keys make it a
    no-op. Connection-level errors (is_connection_error) fail the message, which
    dramatiq retries: they are no event's fault.
    """
    try:
        # No ping: a broken connection fails here and the message is retried.
        with transaction(database_url, ping=False) as conn:
            result = ingest_events(conn, events, sync_telemetry=sync_telemetry)
            crash_point("ingest.before_commit")
        return result
    except (*DB_ERRORS, CopyDataError) as exc:
        if is_connection_error(exc):
            raise
        if len(events) > 1:
            half = len(events) // 2
            return (ingest_isolated(database_url, events[:half], sync_telemetry=sync_telemetry,
                                    received_in=received_in)
                    + ingest_isolated(database_url, events[half:], sync_telemetry=sync_telemetry,
                                      received_in=received_in))
        (e,) = events
        if isinstance(e, MediaEvent):
            # Its only work here is a hand-off that does not depend on its data,
            # and its bytes are on the media volume, not in the queue: not a dead
            # letter. The message fails once the rest is committed and is retried;
            # after its retries it stays `rejected` with its reason (`farmiq-edge dlq`).
            log.warning("event=ingest_frame_hand_off_failed event_id=%s error=%r", e.event_id,
                        db_error_class(exc))
            return IngestResult(Counter(), Counter(), Counter(), [db_error_class(exc)])
        payload, size = received_bytes(e, _received_reader(database_url, received_in))
        with transaction(database_url) as conn:
            conn.execute(insert(ingress_dead_letters), dead_letter_row(
                _topic(e), payload, "processing_failed", db_error_class(exc), size_bytes=size))
        log.warning("event=ingest_event_failed event_id=%s kind=%s error=%r", e.event_id, e.kind,
                    db_error_class(exc))
        return IngestResult(Counter(), Counter(), Counter({"processing_failed": 1}))


def _received_reader(database_url: str, message_id: str | None):  # noqa: ANN202
    """`read_received(offset, length)` for models.queue_events.received_bytes."""
    if message_id is None:
        return None

    def read(offset: int, length: int) -> bytes | None:
        with transaction(database_url) as conn:
            value = conn.execute(RECEIVED_SLICE, {"id": message_id, "start": offset + 1,
                                                  "length": length}).scalar()
        return bytes(value) if value is not None else None
    return read


def ingest_events(conn: Connection, events: list, *, sync_telemetry: str) -> IngestResult:
    """Dedupe `events` and apply the new ones; the caller owns the transaction."""
    events = [QueuedTelemetry.of(e) if isinstance(e, TelemetryEvent) else e for e in events]
    first = {}
    for event in events:
        first.setdefault((event.tenant_id, str(event.event_id)), event)
    # Sorted keys: concurrent batches sharing redeliveries lock them in one order.
    keys = sorted(first)
    new_keys = {(t, e) for t, e in conn.execute(
        DEDUPE_INSERT, {"tenant_ids": [t for t, _ in keys], "event_ids": [e for _, e in keys]})
    } if keys else set()
    fresh = [first[k] for k in keys if k in new_keys]

    accepted = Counter(e.kind for e in fresh)
    result = IngestResult(accepted, Counter(e.kind for e in events) - accepted, Counter())

    _apply_telemetry(conn, [e for e in fresh if isinstance(e, QueuedTelemetry)], sync_telemetry)
    for reason in _apply_sessions(conn, [e for e in fresh if isinstance(e, SessionEvent)]):
        result.rejected[reason] += 1
    # Every frame, duplicates too: the bridge spooled a redelivered frame again,
    # and the media actor removes that copy (or places it, whichever message
    # runs first: it is idempotent per media_id). Dropped here, the copy would
    # wait an hour for the staging sweep.
    _hand_off_media(conn, [e for e in first.values() if isinstance(e, MediaEvent)])
    return result


def _apply_telemetry(conn: Connection, events: list[QueuedTelemetry], sync_telemetry: str) -> None:
    """Raw rows and 1-minute partial aggregates (the aggregate actor's work list) by COPY.

    Values arrive normalized (models/queue_events.py), so rows are built as COPY
    text directly: one line per reading, no datetime or UUID objects.
    """
    lines, outbox_rows = [], []
    partials: dict[tuple, list] = {}
    ids = iter(new_id_texts(sum(len(e.readings) for e in events)))
    for e in events:
        # occurred_at is ISO 8601 in UTC, so its first 16 characters name the minute.
        minute = e.occurred_at[:16] + ":00+00:00"
        source = f"{e.tenant_id}\t{e.farm_id}\t{e.barn_id}\t{e.device_id}"
        prefix = f"\t{source}\t{e.occurred_at}\t"
        for metric_type, value, unit in e.readings:
            value = float(value)  # a body stored as jsonb (before 0010) hands back 1e15 as an int
            lines.append(f"{next(ids)}{prefix}{metric_type}\t{value!r}\t{unit}\n")
            p = partials.get(key := (source, metric_type, minute))
            if p is None:
                partials[key] = [1, value, value, value]
            else:
                p[0] += 1
                p[1] += value
                if value < p[2]:
                    p[2] = value
                if value > p[3]:
                    p[3] = value
        if sync_telemetry in ("raw", "both"):
            outbox_rows.append(outbox_row(
                "telemetry.ingested", tenant_id=e.tenant_id, farm_id=e.farm_id, barn_id=e.barn_id,
                device_id=e.device_id, occurred_at=e.occurred_at, trace_id=e.trace_id,
                payload={"source_event_id": e.event_id,
                         "readings": [{"metric_type": t, "metric_value": v, "unit": u} for t, v, u in e.readings]}))
    if lines:
        _copy_text(conn, telemetry_raw.name, RAW_COLUMNS, "".join(lines), len(lines))
        pending = [f"{source}\t{metric_type}\t{minute}\t{n}\t{total!r}\t{lo!r}\t{hi!r}\n"
                   for (source, metric_type, minute), (n, total, lo, hi) in partials.items()]
        _copy_text(conn, telemetry_agg_pending.name, PENDING_COLUMNS, "".join(pending), len(pending))
    if outbox_rows:
        conn.execute(insert(sync_outbox), outbox_rows)


def _copy_text(conn: Connection, table: str, columns: tuple[str, ...], data: str, n_rows: int) -> None:
    """COPY `data` (COPY text format, `n_rows` lines) into `table`, in the caller's transaction."""
    # Validated ids and metric tokens never hold a tab, newline or backslash;
    # a line that does would shift columns: refuse it (the batch is bisected).
    if not _plain(data, n_rows, len(columns)):
        raise CopyDataError(f"COPY data for {table} has an unescaped tab, newline or backslash")
    with raw_cursor(conn) as cursor:
        # One read of the whole text: psycopg2 reads the file 8 KiB at a time by default.
        cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN", io.StringIO(data),
                           size=max(len(data), 8192))


def _plain(data: str, n_rows: int, n_columns: int) -> bool:
    return (data.count("\t") == n_rows * (n_columns - 1) and data.count("\n") == n_rows
            and "\\" not in data and "\r" not in data)


def _apply_sessions(conn: Connection, events: list[SessionEvent]) -> list[str]:
    """Apply session events one by one under a row lock; return rejection reasons."""
    rejected = []
    for e in sorted(events, key=lambda e: (str(e.session_id), e.occurred_at)):
        applied = _apply_session_event(conn, e)
        if applied is None:
            payload, size = received_bytes(e)
            conn.execute(insert(ingress_dead_letters), dead_letter_row(
                _topic(e), payload, "session_conflict",
                "session_id belongs to another tenant/farm/barn/device", size_bytes=size))
            rejected.append("session_conflict")
            continue
        new = applied.state
        if not applied.changed:
            continue
        if new.status == "finalized":
            _ask_for_summary(conn, e)
        conn.execute(insert(sync_outbox), outbox_row(
            session_event_type(e.action), tenant_id=e.tenant_id, farm_id=e.farm_id,
            barn_id=e.barn_id, device_id=e.device_id, occurred_at=e.occurred_at,
            session_id=e.session_id, trace_id=e.trace_id,
            payload={"session_id": str(e.session_id), "source_event_id": str(e.event_id),
                     "status": new.status, "batch_id": new.batch_id,
                     "start_at": _iso(new.start_at), "end_at": _iso(new.end_at),
                     "initial_weight_kg": new.initial_weight_kg,
                     "final_weight_kg": new.final_weight_kg}))
    return rejected


@dataclass
class _Applied:
    state: SessionState
    changed: bool


def _apply_session_event(conn: Connection, e: SessionEvent) -> _Applied | None:
    """Apply one event under the session's row lock; None if another device owns it."""
    owner = (e.tenant_id, e.farm_id, e.barn_id, e.device_id)
    while True:
        row = conn.execute(select(weight_sessions).where(weight_sessions.c.id == e.session_id)
                           .with_for_update()).first()
        if row is not None and (row.tenant_id, row.farm_id, row.barn_id, row.device_id) != owner:
            return None  # a payload cannot touch another device's session (SPEC §1)
        state = _state_of(row) if row is not None else None
        new = apply_session_event(state, e.action, e.occurred_at, e.weight_kg, e.batch_id)
        if new is None:
            return _Applied(state, changed=False)
        values = {"status": new.status, "start_at": new.start_at, "end_at": new.end_at,
                  "initial_weight_kg": new.initial_weight_kg, "final_weight_kg": new.final_weight_kg,
                  "batch_id": new.batch_id}
        if row is not None:
            conn.execute(update(weight_sessions).where(weight_sessions.c.id == e.session_id)
                         .values(updated_at=func.now(), **values))
            return _Applied(new, changed=True)
        created = conn.execute(pg_insert(weight_sessions).values(
            id=e.session_id, tenant_id=e.tenant_id, farm_id=e.farm_id, barn_id=e.barn_id,
            device_id=e.device_id, **values).on_conflict_do_nothing())
        if created.rowcount == 1:
            return _Applied(new, changed=True)
        # A concurrent batch created it first: lock that row and apply again.


def _hand_off_media(conn: Connection, events: list[MediaEvent]) -> None:
    # The media actor (queue `media`) places the file and writes its media_objects
    # row; enqueued in this transaction so a frame is never dropped between.
    # The event carries the bridge's staging reference, never the bytes.
    if not events:
        return
    with raw_cursor(conn) as cursor:
        for e in events:
            if e.staged is None:
                raise PermanentError("media event without a staging reference")
            broker.enqueue_in(cursor, Message(queue_name=MEDIA_QUEUE, actor_name=MEDIA_ACTOR, args=(),
                                              kwargs={"event": e.model_dump(mode="json",
                                                                            exclude={"image_b64"})},
                                              options={}))


def _ask_for_summary(conn: Connection, e: SessionEvent) -> None:
    # The inference queue sends the session summary once every frame of the
    # finalized session has a result (actors/inference.py); in this transaction,
    # so a finalize is never left without its check. A session with no stored
    # frame yet needs none: the inference run that weighs its first frame
    # checks it (and waits for this transaction's row lock on the session).
    if not conn.execute(SESSION_HAS_FRAMES, {"tenant_id": e.tenant_id, "session_id": e.session_id}).scalar():
        return
    with raw_cursor(conn) as cursor:
        broker.enqueue_in(cursor, Message(queue_name=INFERENCE_QUEUE, actor_name=SUMMARY_ACTOR, args=(),
                                          kwargs={"session_id": str(e.session_id)}, options={}))


def _state_of(row: Any) -> SessionState:
    ended_by = {"finalized": "finalize", "cancelled": "cancel"}.get(row.status)
    return SessionState(status=row.status, start_at=row.start_at, end_at=row.end_at,
                        initial_weight_kg=row.initial_weight_kg, final_weight_kg=row.final_weight_kg,
                        batch_id=row.batch_id, ended_by=ended_by)


def _topic(e: Any) -> str:
    return f"farmiq/v1/{e.tenant_id}/{e.farm_id}/{e.barn_id}/{e.device_id}/{e.kind}"


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None
