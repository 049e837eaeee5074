"""Frames end to end: Mosquitto -> bridge (spool) -> ingest -> media (file + row) -> inference.

Real processes, real PostgreSQL, real Mosquitto. Covers the media must-shows of
issue 8: exact paths and hashes, weights against the NumPy law, the session
summary, dead letters with reasons, no image bytes in the queue table, kill -9
on both sides of the media commit points and of the bridge after spooling, and
a full disk (injected ENOSPC) that holds frames back until space returns.
"""

import hashlib
import os
import statistics
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from models.media_path import media_path
from tests.support import corpus
from tests.support.processes import queue_idle, scalar, wait_until
from tests.support.publisher import publish_all
from workers.dev.build_model import MODEL_VERSION, reference_weight
from workers.dev.frames import Frame, bird_frame

N_FRAMES = 10
MEDIA_MAX = 1024 * 1024  # a small limit, so an oversized payload stays small too
SID = UUID("0199a0b2-6c1e-7d3a-9f10-2b6f3f0e9b01")
CAMERA = "camera-1"


def rows(db_url: str, sql: str) -> list[tuple]:
    import psycopg2
    conn = psycopg2.connect(db_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


class Session:
    """A weighing session: start, N frames of known bird area, finalize (and a monitoring frame)."""

    def __init__(self, n: int = N_FRAMES, monitoring: bool = True) -> None:
        self.t0 = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)
        self.frames: dict[UUID, tuple[Frame, datetime, UUID | None]] = {}
        for i in range(n):
            self.frames[uuid4()] = (bird_frame(scale=0.7 + 0.06 * i, seed=i),
                                    self.t0 + timedelta(seconds=1 + i, milliseconds=250), SID)
        if monitoring:
            self.frames[uuid4()] = (bird_frame(seed=100), self.t0 + timedelta(seconds=30), None)

    def messages(self) -> list[tuple[str, bytes]]:
        out = [(corpus.topic("session", device_id=CAMERA),
                corpus.session_payload(uuid4(), self.t0, SID, "start"))]
        for media_id, (frame, at, sid) in self.frames.items():
            out.append((corpus.topic("media", device_id=CAMERA), corpus.media_payload(
                uuid4(), at, frame.data, media_id=media_id, session_id=sid, captured_at=at)))
        out.append((corpus.topic("session", device_id=CAMERA),
                    corpus.session_payload(uuid4(), self.t0 + timedelta(minutes=1), SID, "finalize")))
        return out

    def path(self, root: Path, media_id: UUID) -> Path:
        _, at, sid = self.frames[media_id]
        return media_path(root, tenant_id=corpus.TENANT, farm_id=corpus.FARM, barn_id=corpus.BARN,
                          device_id=CAMERA, session_id=sid, captured_at=at, media_id=media_id,
                          mime_type="image/jpeg")


def start_all(pipeline, **env: str):
    p = pipeline(EDGE_MEDIA_MAX_BYTES=str(MEDIA_MAX), EDGE_MEDIA_MIN_FREE_BYTES="0", **env)
    p.bridge()
    for queue in ("ingest", "media", "inference"):
        p.worker(queue)
    return p


def assert_stored_once(db_url: str, root: Path, session: Session) -> None:
    """Exactly one file and one row per frame, at the exact path, nothing else on the volume."""
    n = len(session.frames)
    wait_until(lambda: scalar(db_url, "SELECT count(*) FROM inference_results") == n
               and queue_idle(db_url), 180, f"{n} frames stored and weighed")
    stored = {UUID(str(r[0])): r[1:] for r in rows(
        db_url, "SELECT id, path, size_bytes, sha256, mime_type FROM media_objects")}
    assert set(stored) == set(session.frames)
    for media_id, (frame, _, _) in session.frames.items():
        path = session.path(root, media_id)
        assert stored[media_id] == (str(path), len(frame.data), hashlib.sha256(frame.data).hexdigest(),
                                    "image/jpeg")
        assert path.read_bytes() == frame.data
    on_disk = sorted(p for p in root.rglob("*") if p.is_file())
    assert on_disk == sorted(session.path(root, m) for m in session.frames)  # no temp, no staging


def queue_bytes(db_url: str, queue: str) -> tuple[int, int, int]:
    """(messages, message bytes, messages holding JPEG base64) of `queue` in dramatiq.queue."""
    return rows(db_url, "SELECT count(*), coalesce(sum(pg_column_size(message)), 0), "
                        "count(*) FILTER (WHERE strpos(message::text, '/9j/') > 0) "
                        f"FROM dramatiq.queue WHERE queue_name = '{queue}'")[0]


def test_session_of_frames_end_to_end(pipeline, db_url):
    # Stage by stage, so the queue can be inspected while it holds each hand-off
    # (processed messages are deleted from it).
    p = pipeline(EDGE_MEDIA_MAX_BYTES=str(MEDIA_MAX), EDGE_MEDIA_MIN_FREE_BYTES="0")
    p.bridge()
    root = Path(p.env["EDGE_MEDIA_ROOT"])
    session = Session()
    jpeg = bird_frame(seed=7).data
    invalid = {  # SPEC §1.4 / §1.5: each rejected with its reason, the frames around flow on
        "png_as_jpeg": (corpus.png_bytes(), {}, "bad_image"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], {}, "bad_image"),
        "sixty_megapixels": (corpus.png_claiming_size(10_000, 6_000), {"mime_type": "image/png"}, "too_large"),
        "base64_garbage": (jpeg, {"image_b64": "this is not base64 at all!"}, "bad_image"),
        "oversized": (bytes(MEDIA_MAX + 200_000), {}, "too_large"),
    }
    bad = [(corpus.topic("media", device_id=CAMERA), corpus.media_payload(uuid4(), session.t0, data, **kw))
           for data, kw, _ in invalid.values()]
    messages = session.messages()
    publish_all(p.env["EDGE_MQTT_URL"], messages[:4] + bad + messages[4:])
    n = len(session.frames)

    # The queue holds no image bytes: the bridge's ingest messages carry references...
    wait_until(lambda: scalar(db_url, "SELECT coalesce(sum(json_array_length(message->'args'->0)), 0) "
                                      "FROM dramatiq.queue WHERE queue_name = 'ingest'") == n + 2,
               60, "every valid message enqueued by the bridge")
    count, size, with_jpeg = queue_bytes(db_url, "ingest")
    assert with_jpeg == 0 and size < 1024 * (n + 2)  # frames are ~125 KB each
    assert len(list((root / ".staging").iterdir())) == n  # the bytes are on the volume
    # ...and so do the ingest worker's media messages.
    p.worker("ingest")
    wait_until(lambda: queue_bytes(db_url, "media")[0] == n, 60, "the media hand-offs")
    count, size, with_jpeg = queue_bytes(db_url, "media")
    assert with_jpeg == 0 and size < 1024 * n
    p.worker("media")
    p.worker("inference")

    assert_stored_once(db_url, root, session)
    monitoring = [m for m, (_, _, sid) in session.frames.items() if sid is None]
    assert session.path(root, monitoring[0]).parent == root / corpus.TENANT / corpus.FARM / corpus.BARN / \
        "monitoring" / CAMERA

    # Weights: the NumPy law on the drawn area, within 2%.
    results = {UUID(str(m)): (w, v) for m, w, v in rows(
        db_url, "SELECT media_id, predicted_weight_kg, model_version FROM inference_results")}
    for media_id, (frame, _, _) in session.frames.items():
        weight, version = results[media_id]
        reference = float(reference_weight(frame.area_fraction))
        assert version == MODEL_VERSION and abs(weight - reference) <= 0.02 * reference

    # The session summary, once every frame of the finalized session has a result.
    wait_until(lambda: scalar(db_url, "SELECT count(*) FROM sync_outbox "
                                      "WHERE event_type = 'weighvision.session.summary'") == 1, 60,
               "the session summary")
    [(summary,)] = rows(db_url, "SELECT payload_json FROM sync_outbox "
                                "WHERE event_type = 'weighvision.session.summary'")
    in_session = [results[m][0] for m, (_, _, sid) in session.frames.items() if sid == SID]
    assert summary["frame_count"] == N_FRAMES and summary["model_version"] == MODEL_VERSION
    assert summary["median_predicted_weight_kg"] == pytest.approx(statistics.median(in_session))
    counts = dict(rows(db_url, "SELECT event_type, count(*) FROM sync_outbox GROUP BY 1"))
    assert counts["media.stored"] == counts["inference.completed"] == N_FRAMES + 1

    # Dead letters with reasons.
    letters = sorted(r[0] for r in rows(db_url, "SELECT reason FROM ingress_dead_letters"))
    assert letters == sorted(reason for _, _, reason in invalid.values())
    details = " | ".join(r[0] for r in rows(db_url, "SELECT detail FROM ingress_dead_letters"))
    assert "truncated" in details and "50 megapixels" in details and "base64" in details

    # After the frames are stored, the queue table holds nothing of them.
    assert rows(db_url, "SELECT count(*), coalesce(sum(pg_column_size(message)), 0) FROM dramatiq.queue "
                        "WHERE strpos(message::text, '/9j/') > 0 OR state <> 'queued'") == [(0, 0)]


@pytest.mark.parametrize("crash_at", ["media.before_rename", "media.before_commit"])
def test_media_worker_killed_at_each_commit_point(pipeline, db_url, crash_at):
    p = pipeline(EDGE_MEDIA_MAX_BYTES=str(MEDIA_MAX), EDGE_MEDIA_MIN_FREE_BYTES="0")
    p.bridge()
    p.worker("ingest")
    p.worker("inference")
    crashing = p.worker("media", EDGE_CRASH_AT=crash_at)
    session = Session(monitoring=False)
    publish_all(p.env["EDGE_MQTT_URL"], session.messages())
    # dramatiq's master stops when its worker process dies (its "exited unexpectedly"
    # line can be lost with the dead worker's log pipe: the exit code is what counts).
    wait_until(lambda: crashing.proc.poll() is not None, 90, "the media worker to crash")
    assert crashing.proc.returncode != 0
    root = Path(p.env["EDGE_MEDIA_ROOT"])
    in_place = [m for m in session.frames if session.path(root, m).exists()]
    # The crash left its frames (one per worker thread at most) half done:
    # staged only, or in place without a row.
    assert scalar(db_url, "SELECT count(*) FROM media_objects") == 0
    assert (len(in_place) > 0) == (crash_at == "media.before_commit")
    p.worker("media")
    assert_stored_once(db_url, root, session)


def test_bridge_killed_after_spooling(pipeline, db_url):
    p = pipeline(EDGE_MEDIA_MAX_BYTES=str(MEDIA_MAX), EDGE_MEDIA_MIN_FREE_BYTES="0")
    crashing = p.bridge(EDGE_CRASH_AT="bridge.after_spool")
    for queue in ("ingest", "media", "inference"):
        p.worker(queue)
    session = Session(monitoring=False)
    publish_all(p.env["EDGE_MQTT_URL"], session.messages())
    wait_until(lambda: crashing.proc.poll() is not None, 30, "the bridge to crash")
    root = Path(p.env["EDGE_MEDIA_ROOT"])
    assert len(list((root / ".staging").iterdir())) == 1  # spooled, never committed
    p.bridge()  # same client id: the persistent session redelivers; the staging file is reused
    assert_stored_once(db_url, root, session)


def test_disk_full_holds_frames_and_resumes(pipeline, db_url, tmp_path):
    disk_full = tmp_path / "disk-full"
    disk_full.touch()
    p = start_all(pipeline, EDGE_ENOSPC_WHILE=str(disk_full))
    root = Path(p.env["EDGE_MEDIA_ROOT"])
    session = Session(n=4, monitoring=False)
    telemetry = [(corpus.topic("telemetry"), corpus.telemetry_payload(
        uuid4(), session.t0, [("temperature", 20.0 + i, "C")])) for i in range(5)]
    publish_all(p.env["EDGE_MQTT_URL"], session.messages() + telemetry)
    # Other messages flow on; frames wait un-acked, nothing half written anywhere.
    wait_until(lambda: scalar(db_url, "SELECT count(*) FROM telemetry_raw") == 5, 60, "telemetry")
    wait_until(lambda: "event=media_volume_full" in p.processes[0].log(), 30, "the full-disk log line")
    wait_until(lambda: p.processes[0].log().count("holding_frames") >= 1, 5, "holding")
    assert scalar(db_url, "SELECT count(*) FROM media_objects") == 0
    assert [f for f in root.rglob("*") if f.is_file()] == []  # no partial file, no orphan
    assert scalar(db_url, "SELECT count(*) FROM weight_sessions") == 1
    disk_full.unlink()  # space returns
    assert_stored_once(db_url, root, session)
    log = p.processes[0].log()
    assert log.count("event=media_volume_full") == 1 and log.count("event=media_volume_ok") == 1


def test_media_worker_sweeps_stale_staging_at_start(pipeline, db_url):
    p = pipeline(EDGE_MEDIA_STAGING_MAX_AGE_SECONDS="60")
    staging = Path(p.env["EDGE_MEDIA_ROOT"]) / ".staging"
    staging.mkdir(parents=True)
    stale, fresh, temp = (staging / f"{uuid4().hex}-{'0' * 16}.jpg", staging / f"{uuid4().hex}-{'1' * 16}.jpg",
                          staging / f"{uuid4().hex}-{'2' * 16}.jpg.tmp-0badc0de")
    for f in (stale, fresh, temp):
        f.write_bytes(b"left by a bridge that crashed before its commit")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(temp, (old, old))
    worker = p.worker("media")
    wait_until(lambda: "event=staging_swept files=2" in worker.log(), 60, "the startup sweep")
    assert sorted(staging.iterdir()) == [fresh]
