"""Queue `media`: put a spooled frame at its SPEC path and record it, exactly once.

The message carries the event with a staging reference, never the bytes (see
actors/media_volume.py for the whole path of a frame and its commit points).
Here, inside ONE transaction that holds an advisory lock on the media_id:
look for the row, verify the staged bytes, rename them into place, fsync the
folders, then insert the media_objects row, the `media.stored` outbox event,
an `inference_pending` row and a wake-up for the inference queue; COMMIT is
the commit point. A redelivery finds row and file and does nothing more; a
crash (or error) after the rename leaves the file for the redelivery, which
verifies it and commits the row.
"""

from actors.broker import broker  # noqa: I001 - the broker is set before any actor

import hashlib
import logging
import os
from pathlib import Path

import dramatiq
from dramatiq.message import Message
from dramatiq.middleware import Middleware
from pydantic import ValidationError
from sqlalchemy import Connection, insert, select, text

from actors.dead_letters import PermanentError
from actors.faults import crash_point
from actors.media_volume import (OutsideRoot, contained, fsync_dir, make_folder, sha256_of,
                                 staging_dir, sweep_stale_staging)
from actors.metrics import MEDIA_STORED
from models.media_path import STAGING_NAME_RE, media_path
from models.messages import MediaEvent, image_problem
from models.outbox_events import outbox_row
from models.settings import Settings, get_settings
from models.tables import media_objects, sync_outbox
from schema.db import raw_cursor, transaction

log = logging.getLogger("farmiq_edge.media")
INFERENCE_QUEUE, INFERENCE_ACTOR = "inference", "infer_pending"

# Serializes work on one media_id until the transaction ends.
LOCK_MEDIA_ID = text("SELECT pg_advisory_xact_lock(hashtext(:media_id))")
# The frame's inference work item (the inference actor's durable work list).
ADD_PENDING = text("INSERT INTO inference_pending (media_id) VALUES (:media_id) ON CONFLICT DO NOTHING")
# Is a staging file still named by a message that may yet run (queued or delayed, in work, or
# rejected and waiting for `farmiq-edge dlq redrive`)? Processed messages are deleted.
NAMED_IN_QUEUE = """
    SELECT 1 FROM dramatiq.queue
     WHERE state IS DISTINCT FROM 'done' AND queue_name IN ('ingest', 'media')
       AND strpos(message::text, %s) > 0
     LIMIT 1
"""


@dramatiq.actor(queue_name="media", max_retries=10)
def store_media(event: dict) -> None:
    try:
        parsed = MediaEvent.model_validate(event)
    except ValidationError as exc:
        raise PermanentError(f"media event fails validation ({exc.error_count()} errors)") from None
    settings = get_settings()
    result = store_frame(settings, parsed)
    MEDIA_STORED.labels(result).inc()


def store_frame(settings: Settings, e: MediaEvent) -> str:
    """Place and record one frame; returns `stored` or `already_stored`."""
    if e.staged is None:
        raise PermanentError("media event has no staging reference")
    root = Path(settings.media_root)
    staged = e.staged
    try:
        final = media_path(root, tenant_id=e.tenant_id, farm_id=e.farm_id, barn_id=e.barn_id,
                           device_id=e.device_id, session_id=e.session_id, captured_at=e.captured_at,
                           media_id=e.media_id, mime_type=e.mime_type)
    except ValueError as exc:
        raise PermanentError(str(exc)) from None
    if STAGING_NAME_RE.fullmatch(staged.name) is None:  # validated already; it becomes a path
        raise PermanentError("staging name does not match its pattern")
    staging = staging_dir(root) / staged.name
    with transaction(settings.database_url) as conn:  # commit point (see module docstring)
        # One frame per media_id at a time: two events naming the same media_id
        # (a device bug) must not both rename into place before either commits.
        conn.execute(LOCK_MEDIA_ID, {"media_id": str(e.media_id)})
        row = _row(conn, e)
        if row is not None:
            if (row.path, row.sha256) != (str(final), staged.sha256):
                raise PermanentError("media_id is already stored with other bytes or another path")
            if final.is_file():
                staging.unlink(missing_ok=True)  # a re-spooled copy from a redelivered MQTT message
                return "already_stored"
            raise PermanentError("media_objects row exists but its file is missing")
        _place(settings, root, staging, final, e)
        crash_point("media.before_commit")
        conn.execute(insert(media_objects).values(
            id=e.media_id, tenant_id=e.tenant_id, farm_id=e.farm_id, barn_id=e.barn_id,
            device_id=e.device_id, session_id=e.session_id, path=str(final), mime_type=e.mime_type,
            size_bytes=staged.size_bytes, sha256=staged.sha256, captured_at=e.captured_at))
        conn.execute(insert(sync_outbox), outbox_row(
            "media.stored", tenant_id=e.tenant_id, farm_id=e.farm_id, barn_id=e.barn_id,
            device_id=e.device_id, occurred_at=e.captured_at, session_id=e.session_id,
            trace_id=e.trace_id,
            payload={"media_id": str(e.media_id), "source_event_id": str(e.event_id),
                     "path": str(final.relative_to(root)), "mime_type": e.mime_type,
                     "size_bytes": staged.size_bytes, "sha256": staged.sha256,
                     "captured_at": e.captured_at.isoformat()}))
        conn.execute(ADD_PENDING, {"media_id": e.media_id})
        with raw_cursor(conn) as cursor:
            broker.enqueue_in(cursor, Message(queue_name=INFERENCE_QUEUE, actor_name=INFERENCE_ACTOR,
                                              args=(), kwargs={}, options={}))
    log.info("event=media_stored media_id=%s size_bytes=%d", e.media_id, staged.size_bytes)
    return "stored"


def _place(settings: Settings, root: Path, staging: Path, final: Path, e: MediaEvent) -> None:
    """The verified staged bytes at `final`, durably (or already there from a crashed attempt)."""
    staged = e.staged
    assert staged is not None
    try:
        make_folder(root, final.parent)
        contained(root, final)
    except OutsideRoot as exc:
        raise PermanentError(str(exc)) from None
    if staging.is_file():
        _verify(settings, staging, e)
        crash_point("media.before_rename")
        os.rename(staging, final)  # the file's commit point (atomic, same filesystem)
        fsync_dir(final.parent)
        fsync_dir(staging.parent)
    elif not final.is_file():
        raise PermanentError("staging file is missing and the frame is not in place")
    elif sha256_of(final) != (staged.sha256, staged.size_bytes):
        raise PermanentError("a different file is already at the frame's path")
    # else: renamed by an attempt that crashed before its commit; the bytes are verified.


def _row(conn: Connection, e: MediaEvent):  # noqa: ANN202 - a Row or None
    return conn.execute(select(media_objects.c.path, media_objects.c.sha256)
                        .where(media_objects.c.id == e.media_id)).first()


def _verify(settings: Settings, staging: Path, e: MediaEvent) -> None:
    """The staged bytes are the referenced ones and really an image of the declared type."""
    staged = e.staged
    assert staged is not None
    if staging.stat().st_size > settings.media_max_bytes:
        raise PermanentError("staged frame is over EDGE_MEDIA_MAX_BYTES")
    data = staging.read_bytes()
    if (len(data), hashlib.sha256(data).hexdigest()) != (staged.size_bytes, staged.sha256):
        raise PermanentError("staged bytes do not match their reference (size or sha256)")
    problem = image_problem(data, e.mime_type)
    if problem is not None:
        raise PermanentError(f"{problem[0]}: {problem[1]}")


def named_in_queue(database_url: str):  # noqa: ANN201 - Callable[[str], bool]
    """`keep` for sweep_stale_staging: the name is in a message that may still run."""
    import psycopg2

    def keep(name: str) -> bool:
        conn = psycopg2.connect(database_url)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(NAMED_IN_QUEUE, (name,))
                return cur.fetchone() is not None
        finally:
            conn.close()
    return keep


class SweepStagingAtBoot(Middleware):
    """Stale staging files (a bridge crashed before its commit) go when a media worker starts."""

    def after_worker_boot(self, broker, worker) -> None:
        queues = getattr(worker, "consumer_whitelist", None)
        if queues and "media" not in queues:
            return
        s = get_settings()
        try:
            sweep_stale_staging(s.media_root, s.media_staging_max_age_seconds,
                                keep=named_in_queue(s.database_url))
        except Exception:  # never keep the worker from starting; retention sweeps too
            log.exception("event=staging_sweep_failed")


broker.add_middleware(SweepStagingAtBoot())
