"""Media volume and media actor (actors/media_volume.py, actors/media.py) against real PostgreSQL.

Frames are parsed with `parse_message` and spooled with the bridge's `Spool`,
exactly as the bridge does, then stored with `store_frame`, the media actor's body.
"""

import hashlib
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from actors.queue_dead_letters import PermanentError
from actors.ingest import ingest_events
from actors.media import named_in_queue, store_frame
from actors.media_volume import Spool, VolumeFull, staging_dir, sweep_stale_staging
from models.media_path import media_path
from models.messages import MediaEvent, parse_message
from models.settings import load_settings
from schema.db import transaction
from tests.support.processes import rows as query
from tests.support import corpus
from workers.dev.frames import bird_frame

NOW = datetime.now(timezone.utc)
CAPTURED = datetime(2026, 11, 27, 10, 0, 1, 250_000, tzinfo=timezone.utc)
SID = UUID("0199a0b2-6c1e-7d3a-9f10-2b6f3f0e9a12")


def settings(db_url: str, root: Path, **kw):
    return load_settings(database_url=db_url, media_root=str(root), media_min_free_bytes=0, **kw)


def parsed(data: bytes, *, mime_type: str = "image/jpeg", session_id: UUID | None = SID,
           event_id: UUID | None = None, device_id: str = corpus.DEVICE) -> MediaEvent:
    payload = corpus.media_payload(event_id or uuid4(), NOW, data, mime_type=mime_type,
                                   session_id=session_id, captured_at=CAPTURED)
    return parse_message(corpus.topic("media", device_id=device_id), payload, now=NOW,
                         max_clock_skew=timedelta(hours=24), media_max_bytes=corpus.DEFAULT_MEDIA_MAX_BYTES,
                         max_payload_bytes=corpus.default_max_payload_bytes(corpus.DEFAULT_MEDIA_MAX_BYTES))


def spooled(root: Path, event: MediaEvent) -> MediaEvent:
    spool = Spool(root, min_free_bytes=0)
    queued = spool.event_json(event)
    spool.sync()
    assert "image_b64" not in queued
    return MediaEvent.model_validate(queued)


def counts(db_url: str) -> dict[str, int]:
    return {t: query(db_url, f"SELECT count(*) FROM {t}")[0][0]
            for t in ("media_objects", "sync_outbox", "inference_pending", "dramatiq.queue")}


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_frame_lands_at_its_spec_path_once(db_url, tmp_path):
    root, frame = tmp_path / "media", bird_frame(seed=1)
    s = settings(db_url, root)
    event = spooled(root, parsed(frame.data))
    assert len(list(staging_dir(root).iterdir())) == 1

    assert store_frame(s, event) == "stored"
    expected = root / corpus.TENANT / corpus.FARM / corpus.BARN / str(SID) / \
        f"20261127T100001250Z_{event.media_id}.jpg"
    assert files(root) == [str(expected.relative_to(root))]  # staging emptied, no temp file
    assert expected.read_bytes() == frame.data
    [(path, mime, size, sha, captured)] = query(
        db_url, "SELECT path, mime_type, size_bytes, sha256, captured_at FROM media_objects")
    assert (path, mime, size, sha, captured) == (str(expected), "image/jpeg", len(frame.data),
                                                 hashlib.sha256(frame.data).hexdigest(), CAPTURED)
    [(event_type, payload)] = query(db_url, "SELECT event_type, payload_json FROM sync_outbox")
    assert event_type == "media.stored" and payload["sha256"] == sha
    [(queue, actor)] = query(db_url, "SELECT queue_name, message->>'actor_name' FROM dramatiq.queue")
    assert (queue, actor) == ("inference", "infer_pending")
    before = counts(db_url)
    assert before == {"media_objects": 1, "sync_outbox": 1, "inference_pending": 1, "dramatiq.queue": 1}

    # A redelivery of the queue message, and one after the MQTT message was spooled again.
    assert store_frame(s, event) == "already_stored"
    spooled(root, parsed(frame.data, event_id=event.event_id))
    assert store_frame(s, event) == "already_stored"
    assert counts(db_url) == before and files(root) == [str(expected.relative_to(root))]


def test_a_redelivered_frame_is_handed_off_again_so_its_spooled_copy_goes(db_url, tmp_path):
    root, frame = tmp_path / "media", bird_frame(seed=3)
    s = settings(db_url, root)
    first = spooled(root, parsed(frame.data))
    with transaction(db_url) as conn:
        assert ingest_events(conn, [first], sync_telemetry="agg").accepted == {"media": 1}
    assert store_frame(s, first) == "stored"
    # Its PUBACK was lost: the broker redelivers it and the bridge spools it again.
    again = spooled(root, parsed(frame.data, event_id=first.event_id))
    assert len(list(staging_dir(root).iterdir())) == 1
    with transaction(db_url) as conn:
        assert ingest_events(conn, [again], sync_telemetry="agg").duplicates == {"media": 1}
    handed_off = [MediaEvent.model_validate(m["kwargs"]["event"]) for (m,) in query(
        db_url, "SELECT message FROM dramatiq.queue WHERE queue_name = 'media' ORDER BY mtime")]
    assert [e.event_id for e in handed_off] == [first.event_id] * 2
    assert store_frame(s, handed_off[1]) == "already_stored"
    assert not any(staging_dir(root).iterdir())
    assert counts(db_url)["media_objects"] == 1


def test_monitoring_frame_goes_under_monitoring_device(db_url, tmp_path):
    root = tmp_path / "media"
    event = spooled(root, parsed(corpus.png_bytes(), mime_type="image/png", session_id=None,
                                 device_id="cam-7"))
    store_frame(settings(db_url, root), event)
    assert files(root) == [f"{corpus.TENANT}/{corpus.FARM}/{corpus.BARN}/monitoring/cam-7/"
                           f"20261127T100001250Z_{event.media_id}.png"]


def test_crash_after_rename_is_completed_by_the_redelivery(db_url, tmp_path):
    root, frame = tmp_path / "media", bird_frame(seed=2)
    s = settings(db_url, root)
    event = spooled(root, parsed(frame.data))
    final = media_path(root, tenant_id=event.tenant_id, farm_id=event.farm_id, barn_id=event.barn_id,
                       device_id=event.device_id, session_id=event.session_id,
                       captured_at=event.captured_at, media_id=event.media_id, mime_type=event.mime_type)
    final.parent.mkdir(parents=True)
    os.rename(staging_dir(root) / event.staged.name, final)  # what the crashed attempt did
    assert store_frame(s, event) == "stored"
    assert counts(db_url)["media_objects"] == 1 and final.read_bytes() == frame.data


@pytest.mark.parametrize("damage", ["other_bytes", "png_declared_jpeg", "truncated"])
def test_staged_bytes_are_verified_before_anything_is_placed(db_url, tmp_path, damage):
    root, frame = tmp_path / "media", bird_frame(seed=3)
    event = spooled(root, parsed(frame.data))
    staged = staging_dir(root) / event.staged.name
    bad = {"other_bytes": bird_frame(seed=4).data, "png_declared_jpeg": corpus.png_bytes(),
           "truncated": frame.data[: len(frame.data) // 2]}[damage]
    if damage != "other_bytes":  # the reference matches; the image check must catch it
        event = event.model_copy(update={"staged": event.staged.model_copy(
            update={"sha256": hashlib.sha256(bad).hexdigest(), "size_bytes": len(bad)})})
    staged.write_bytes(bad)
    with pytest.raises(PermanentError):
        store_frame(settings(db_url, root), event)
    assert counts(db_url)["media_objects"] == 0
    assert [p for p in files(root) if not p.startswith(".staging/")] == []


def test_spool_refuses_below_the_floor_and_on_enospc_leaving_nothing(tmp_path, monkeypatch):
    root, frame = tmp_path / "media", bird_frame(seed=5)
    with pytest.raises(VolumeFull):
        Spool(root, min_free_bytes=1 << 62).event_json(parsed(frame.data))
    marker = tmp_path / "disk-full"
    marker.touch()
    monkeypatch.setenv("EDGE_ENOSPC_WHILE", str(marker))
    with pytest.raises(VolumeFull):
        Spool(root, min_free_bytes=0).event_json(parsed(frame.data))
    assert files(root) == []  # no partial file, no temp file
    marker.unlink()  # space returns
    queued = Spool(root, min_free_bytes=0).event_json(parsed(frame.data))
    assert (staging_dir(root) / queued["staged"]["name"]).read_bytes() == frame.data


def test_sweep_removes_only_stale_unnamed_staging_files(db_url, tmp_path):
    root = tmp_path / "media"
    stale = spooled(root, parsed(bird_frame(seed=6).data)).staged.name
    named = spooled(root, parsed(bird_frame(seed=7).data)).staged.name
    fresh = spooled(root, parsed(bird_frame(seed=8).data)).staged.name
    temp = staging_dir(root) / f"{stale}.tmp-1234abcd"
    temp.write_bytes(b"partial")
    old = time.time() - 7200
    for name in (stale, named, temp.name):
        os.utime(staging_dir(root) / name, (old, old))
    query(db_url, "INSERT INTO dramatiq.queue (queue_name, message_id, message, state) VALUES "
                  "('media', %s, %s, 'queued')", (str(uuid4()), '{"kwargs": {"event": {"staged": {"name": "%s"}}}}'
                                        % named))
    assert sweep_stale_staging(root, 3600, keep=named_in_queue(db_url)) == 2
    assert sorted(p.name for p in staging_dir(root).iterdir()) == sorted([named, fresh])


def test_a_second_event_with_the_same_media_id_never_replaces_the_file(db_url, tmp_path):
    root = tmp_path / "media"
    s = settings(db_url, root)
    first = spooled(root, parsed(bird_frame(seed=10).data))
    store_frame(s, first)
    media_id = str(first.media_id)
    payload = corpus.media_payload(uuid4(), NOW, bird_frame(seed=11).data, session_id=SID,
                                   captured_at=CAPTURED, media_id=UUID(media_id))
    other = parse_message(corpus.topic("media"), payload, now=NOW, max_clock_skew=timedelta(hours=24),
                          media_max_bytes=corpus.DEFAULT_MEDIA_MAX_BYTES,
                          max_payload_bytes=corpus.default_max_payload_bytes(corpus.DEFAULT_MEDIA_MAX_BYTES))
    second = spooled(root, other)
    with pytest.raises(PermanentError, match="already stored with other bytes"):
        store_frame(s, second)
    [(path, sha)] = query(db_url, "SELECT path, sha256 FROM media_objects")
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha == first.staged.sha256


@pytest.fixture
def small_volume(tmp_path, monkeypatch):
    """A 2 MiB tmpfs as the media volume when this process may mount one (root), else a
    folder whose writes fail with ENOSPC while a marker file exists (injected)."""
    import subprocess
    root = tmp_path / "media"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)],
                             capture_output=True).returncode == 0
    marker = tmp_path / "disk-full"
    if not mounted:
        monkeypatch.setenv("EDGE_ENOSPC_WHILE", str(marker))
    yield root, mounted, marker
    if mounted:
        subprocess.run(["umount", str(root)], check=True)


def test_full_volume_leaves_no_partial_file_and_recovers(small_volume):
    root, mounted, marker = small_volume
    frames = [bird_frame(seed=20 + i, quality=95) for i in range(40)]  # ~150 KB each: > 2 MiB
    spool, stored = Spool(root, min_free_bytes=0), []
    if not mounted:
        marker.touch()
    with pytest.raises(VolumeFull):
        for frame in frames:
            stored.append(spool.event_json(parsed(frame.data))["staged"]["name"])
    spool.sync()
    staging = staging_dir(root)
    # Only whole frames: every file is one that was spooled, no temp file.
    assert sorted(p.name for p in staging.iterdir()) == sorted(stored)
    for name in stored:
        data = (staging / name).read_bytes()
        assert hashlib.sha256(data).hexdigest().startswith(name.split("-")[1].split(".")[0])
    # Space returns (a frame is placed elsewhere / retention): spooling resumes.
    if mounted:
        for name in stored[:3]:
            (staging / name).unlink()
    else:
        marker.unlink()
    queued = spool.event_json(parsed(frames[-1].data))
    assert (staging / queued["staged"]["name"]).read_bytes() == frames[-1].data
