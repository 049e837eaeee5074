"""Both sides of the scheduler's and the media job's commit points, with real processes killed."""

import os
import subprocess
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import psycopg2

from tests.support.processes import SCHEDULED_SLOTS, edge_env, scalar, wait_until
from workers.dev.processes import EdgeProcess, edge_command
from workers.scheduler import jobs


def crashed_scheduler(db_url: str, tmp_path, point: str) -> None:
    env = edge_env(db_url, "mqtt://127.0.0.1:1", tmp_path, EDGE_CRASH_AT=point)
    proc = EdgeProcess(point, edge_command("scheduler"), env, tmp_path / f"{point}.log").start()
    assert proc.proc.wait(60) == -9, proc.log()[-2000:]


def run_scheduler_until(db_url: str, tmp_path, condition) -> None:
    env = edge_env(db_url, "mqtt://127.0.0.1:1", tmp_path)
    proc = EdgeProcess("scheduler", edge_command("scheduler"), env, tmp_path / "scheduler.log").start()
    try:
        wait_until(lambda: condition(scalar(db_url, SCHEDULED_SLOTS)), 60, "the restarted scheduler's slots")
    finally:
        assert proc.stop() == 0


def test_scheduler_killed_before_its_commit_sent_nothing_and_the_next_one_sends(db_url, tmp_path):
    crashed_scheduler(db_url, tmp_path, "scheduler.before_commit")
    assert scalar(db_url, SCHEDULED_SLOTS) == [] and scalar(db_url, "SELECT count(*) FROM scheduled_jobs") == 0
    run_scheduler_until(db_url, tmp_path, lambda slots: {s.split("@")[0] for s in slots} == {j.name for j in jobs()})
    assert max(Counter(scalar(db_url, SCHEDULED_SLOTS)).values()) == 1


def test_scheduler_killed_after_its_commit_is_not_repeated(db_url, tmp_path):
    crashed_scheduler(db_url, tmp_path, "scheduler.after_commit")
    first = scalar(db_url, SCHEDULED_SLOTS)
    assert sorted(s.split("@")[0] for s in first) == sorted(j.name for j in jobs())  # all, once
    run_scheduler_until(db_url, tmp_path,
                        lambda slots: sum(s.startswith("aggregate@") for s in slots) >= 3)
    slots = scalar(db_url, SCHEDULED_SLOTS)
    assert max(Counter(slots).values()) == 1
    # The hourly and quarter-hourly jobs' slot was sent before the crash: not again
    # (unless the restart crossed into their next slot).
    for name in ("retention.outbox",):
        assert sum(s.startswith(name + "@") for s in slots) <= 2


def test_media_job_killed_between_files_and_rows_finishes_on_the_next_run(db_url, tmp_path):
    root = tmp_path / "media"
    captured = datetime.now(timezone.utc) - timedelta(days=60)
    conn = psycopg2.connect(db_url)
    paths = []
    with conn, conn.cursor() as cur:
        for i in range(4):
            path = root / "t1/f1/b1/monitoring/cam" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\xff\xd8" + b"x" * 98)
            paths.append(path)
            cur.execute("INSERT INTO media_objects (id, tenant_id, farm_id, barn_id, device_id, path, mime_type, "
                        "size_bytes, sha256, captured_at) VALUES (%s, 't1', 'f1', 'b1', 'cam', %s, 'image/jpeg', "
                        "100, 'x', %s)", (str(uuid.uuid4()), str(path), captured + timedelta(seconds=i)))
    conn.close()
    env = {**os.environ, **edge_env(db_url, "mqtt://127.0.0.1:1", tmp_path)}
    command = edge_command("retention", "run", "--job", "media")
    killed = subprocess.run(command, env={**env, "EDGE_CRASH_AT": "retention.media_files_removed"},
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9
    assert not any(p.exists() for p in paths)                              # files went first
    assert scalar(db_url, "SELECT count(*) FROM media_objects") == 4       # rows not yet
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "media: deleted media_objects 4 rows, 0 files (0 bytes), 4 already missing" in done.stdout
    assert scalar(db_url, "SELECT count(*) FROM media_objects") == 0
