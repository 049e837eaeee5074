"""Queue `inference`: weigh stored frames with the ONNX model; session summaries.

Work list: the media actor adds an `inference_pending` row in the transaction
that stores a frame, and sends `infer_pending` (a wake-up, no payload). A run
claims up to EDGE_INFERENCE_BATCH pending frames (SKIP LOCKED: runs in other
threads and processes take other frames), runs the model once per group of
equal-sized frames, and in ONE transaction (commit point) writes
inference_results (ON CONFLICT (media_id, model_version) DO NOTHING: idempotent),
one `inference.completed` outbox event per new result, deletes the pending
rows and refreshes the summaries of the sessions it touched. A crash before
the commit leaves the frames pending for the next run.

Session summary trigger, from both sides (whichever completes a session last):
ingest sends `summarize_session` in the transaction that finalizes a session
(if it has stored frames), and every run re-checks the sessions of the frames
it weighed. The summary is written only when the session is finalized and no
stored frame of it still waits for inference (a frame whose file could not be
read is counted as skipped, not waited for); `weighvision_session_summaries` remembers the
last one sent, so a summary goes out once, and again, with a new event id,
only when a late frame changes it. The session row is locked while checking,
so two runs finishing frames of one session cannot both miss (or both send) it.
"""

from actors.broker import broker  # noqa: F401,I001 - the broker is set before any actor

import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from uuid import UUID

import dramatiq
import numpy as np
from sqlalchemy import Connection, insert, text

from actors.metrics import INFERENCE_FRAMES, INFERENCE_SECONDS, INFERENCE_SKIPPED
from actors.weight_model import WeightModel, get_model, to_input
from models.ids import new_id
from models.outbox_events import outbox_row
from models.settings import Settings, get_settings
from models.tables import sync_outbox
from schema.db import transaction

log = logging.getLogger("farmiq_edge.inference")
MAX_BATCHES_PER_RUN = 20
# Frames per model call. Measured on the 2-core box with the baseline model:
# 5 ms/frame alone, 6 in pairs, 12-22 in fours and eights (640x480 float
# tensors outgrow the caches), so bigger calls only cost.
RUN_CHUNK = 2

# Claim waiting frames with what a result row needs.
CLAIM_PENDING = text("""
    SELECT m.id, m.tenant_id, m.farm_id, m.barn_id, m.device_id, m.session_id, m.path, m.captured_at
      FROM inference_pending p JOIN media_objects m ON m.id = p.media_id
     ORDER BY p.created_at
     LIMIT :batch
       FOR UPDATE OF p SKIP LOCKED
""")
DELETE_PENDING = text("DELETE FROM inference_pending WHERE media_id = ANY(:ids)")
# Idempotent per (media_id, model_version): a re-run adds nothing.
INSERT_RESULT = text("""
    INSERT INTO inference_results (id, tenant_id, farm_id, barn_id, device_id, session_id, media_id,
                                   predicted_weight_kg, predicted_size, confidence, model_version,
                                   occurred_at)
    VALUES (:id, :tenant_id, :farm_id, :barn_id, :device_id, :session_id, :media_id,
            :predicted_weight_kg, :predicted_size, :confidence, :model_version, :occurred_at)
    ON CONFLICT (media_id, model_version) DO NOTHING
    RETURNING id
""")
# The session, locked while its summary is decided.
LOCK_SESSION = text("""
    SELECT tenant_id, farm_id, barn_id, device_id, status, end_at
      FROM weight_sessions WHERE id = :session_id FOR UPDATE
""")
# A session's frames: how many have a result of this model (and their median
# weight), how many still wait for inference (index media_objects_tenant_session_idx).
SESSION_FRAMES = text("""
    SELECT count(r.id) AS weighed, count(p.media_id) AS waiting,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY r.predicted_weight_kg) AS median
      FROM media_objects m
      LEFT JOIN inference_results r ON r.media_id = m.id AND r.model_version = :model_version
      LEFT JOIN inference_pending p ON p.media_id = m.id
     WHERE m.tenant_id = :tenant_id AND m.session_id = :session_id
""")
LAST_SUMMARY = text("""
    SELECT frame_count, median_weight_kg, event_id FROM weighvision_session_summaries
     WHERE session_id = :session_id AND model_version = :model_version
""")
SAVE_SUMMARY = text("""
    INSERT INTO weighvision_session_summaries (session_id, model_version, frame_count,
                                               median_weight_kg, event_id)
    VALUES (:session_id, :model_version, :frame_count, :median, :event_id)
    ON CONFLICT (session_id, model_version) DO UPDATE
       SET frame_count = excluded.frame_count, median_weight_kg = excluded.median_weight_kg,
           event_id = excluded.event_id, updated_at = now()
""")


def model_for(settings: Settings) -> WeightModel:
    return get_model(settings.model_path, settings.inference_threads)


@dramatiq.actor(queue_name="inference", max_retries=10, time_limit=600_000)
def infer_pending() -> None:
    settings = get_settings()
    model = model_for(settings)
    for _ in range(MAX_BATCHES_PER_RUN):  # bounded; the next wake-up carries on
        with transaction(settings.database_url) as conn:  # commit point (see module docstring)
            claimed = infer_batch(conn, model, settings.inference_batch)
        if claimed < settings.inference_batch:
            break


@dramatiq.actor(queue_name="inference", max_retries=10)
def summarize_session(session_id: str) -> None:
    settings = get_settings()
    with transaction(settings.database_url) as conn:
        refresh_summary(conn, UUID(session_id), model_for(settings).version)


def infer_batch(conn: Connection, model: WeightModel, batch: int) -> int:
    """Weigh up to `batch` waiting frames; return how many were claimed. Caller owns the transaction."""
    rows = conn.execute(CLAIM_PENDING, {"batch": batch}).all()
    if not rows:
        return 0
    inputs: dict[tuple, list] = defaultdict(list)  # frames of one shape run together
    for row in rows:
        try:
            tensor = to_input(Path(row.path).read_bytes())
        except FileNotFoundError:
            INFERENCE_SKIPPED.labels("file_missing").inc()
            log.warning("event=inference_skipped reason=file_missing media_id=%s", row.id)
            continue
        except Exception:  # stored frames were verified; a damaged file must not block the rest
            INFERENCE_SKIPPED.labels("unreadable").inc()
            log.warning("event=inference_skipped reason=unreadable media_id=%s", row.id)
            continue
        inputs[tensor.shape].append((row, tensor))
    results, outbox, sessions = [], [], set()
    for group in inputs.values():
        for start in range(0, len(group), RUN_CHUNK):
            chunk = group[start:start + RUN_CHUNK]
            began = time.perf_counter()
            predictions = model.predict(np.stack([tensor for _, tensor in chunk]))
            per_frame = (time.perf_counter() - began) / len(chunk)
            for (row, _), p in zip(chunk, predictions):
                INFERENCE_SECONDS.observe(per_frame)
                results.append((row, p))
    for row, p in results:
        if not all(math.isfinite(v) for v in (p.weight_kg, p.confidence, p.size) if v is not None):
            # A model (EDGE_MODEL_PATH) that answers NaN/inf for one frame: set it aside,
            # the rest of the batch flows on (NaN would also be refused in the event's JSON).
            INFERENCE_SKIPPED.labels("non_finite").inc()
            log.warning("event=inference_skipped reason=non_finite media_id=%s", row.id)
            continue
        inserted = conn.execute(INSERT_RESULT, {
            "id": new_id(), "tenant_id": row.tenant_id, "farm_id": row.farm_id, "barn_id": row.barn_id,
            "device_id": row.device_id, "session_id": row.session_id, "media_id": row.id,
            "predicted_weight_kg": p.weight_kg, "predicted_size": p.size, "confidence": p.confidence,
            "model_version": model.version, "occurred_at": row.captured_at}).first()
        if inserted is None:
            continue  # weighed by this model already
        outbox.append(outbox_row(
            "inference.completed", tenant_id=row.tenant_id, farm_id=row.farm_id, barn_id=row.barn_id,
            device_id=row.device_id, occurred_at=row.captured_at, session_id=row.session_id,
            payload={"inference_result_id": str(inserted.id), "media_id": str(row.id),
                     "predicted_weight_kg": p.weight_kg, "predicted_size": p.size,
                     "confidence": p.confidence, "model_version": model.version}))
        if row.session_id is not None:
            sessions.add(row.session_id)
    if outbox:
        conn.execute(insert(sync_outbox), outbox)
    conn.execute(DELETE_PENDING, {"ids": [row.id for row in rows]})
    for session_id in sorted(sessions, key=str):  # one lock order for concurrent runs
        refresh_summary(conn, session_id, model.version)
    INFERENCE_FRAMES.labels(model.version).inc(len(outbox))
    log.info("event=inference_batch claimed=%d results=%d model_version=%s", len(rows), len(outbox),
             model.version)
    return len(rows)


def refresh_summary(conn: Connection, session_id: UUID, model_version: str) -> bool:
    """Write a `weighvision.session.summary` event if the session is complete and it changed."""
    session = conn.execute(LOCK_SESSION, {"session_id": session_id}).first()
    if session is None or session.status != "finalized":
        return False
    frames = conn.execute(SESSION_FRAMES, {"tenant_id": session.tenant_id, "session_id": session_id,
                                           "model_version": model_version}).one()
    if frames.waiting or frames.weighed == 0:
        return False  # frames still waiting: the run that weighs the last one sends it
    last = conn.execute(LAST_SUMMARY, {"session_id": session_id, "model_version": model_version}).first()
    if last is not None and (last.frame_count, last.median_weight_kg) == (frames.weighed, frames.median):
        return False
    event = outbox_row(
        "weighvision.session.summary", tenant_id=session.tenant_id, farm_id=session.farm_id,
        barn_id=session.barn_id, device_id=session.device_id, occurred_at=session.end_at,
        session_id=session_id,
        payload={"session_id": str(session_id), "frame_count": frames.weighed,
                 "median_predicted_weight_kg": frames.median, "model_version": model_version,
                 "supersedes_event_id": str(last.event_id) if last is not None else None})
    conn.execute(insert(sync_outbox), event)
    conn.execute(SAVE_SUMMARY, {"session_id": session_id, "model_version": model_version,
                                "frame_count": frames.weighed, "median": frames.median,
                                "event_id": event["id"]})
    log.info("event=session_summary session_id=%s frames=%d model_version=%s", session_id,
             frames.weighed, model_version)
    return True
