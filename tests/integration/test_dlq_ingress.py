"""`farmiq-edge dlq ingress list|show|redrive|purge` on a real database, with a
real ingest worker process consuming what `redrive` enqueues.

Dead letters are made as the bridge makes them: `parse_message` under the
settings of the day rejects a message, `dead_letter_row` stores it. Then a
setting is relaxed (EDGE_MAX_CLOCK_SKEW) and `redrive` ingests what passes.
"""

import re
import uuid
from datetime import datetime, timedelta, timezone

import psycopg2
import pytest
from sqlalchemy import insert

from models.ingress_dead_letters import MAX_DEAD_LETTER_PAYLOAD, dead_letter_row
from models.messages import Rejected, parse_message
from models.tables import ingress_dead_letters
from schema.db import transaction
from tests.support import corpus
from tests.support.processes import edge_env, queue_idle, scalar, wait_until
from workers.cli import main
from workers.dev.processes import EdgeProcess, edge_command

NOW = datetime.now(timezone.utc)


def _dead_letter(topic: str, payload: bytes, *, skew: timedelta = timedelta(hours=1)) -> dict:
    """What the bridge writes for this message under EDGE_MAX_CLOCK_SKEW=`skew`."""
    try:
        parse_message(topic, payload, now=NOW, max_clock_skew=skew, media_max_bytes=corpus.DEFAULT_MEDIA_MAX_BYTES,
                      max_payload_bytes=corpus.default_max_payload_bytes(corpus.DEFAULT_MEDIA_MAX_BYTES))
    except Rejected as rejected:
        return dead_letter_row(topic, payload, rejected.reason, rejected.detail)
    raise AssertionError("expected a rejection")


def _future(device: str, n: int = 1) -> list[dict]:
    """Telemetry from a device whose clock runs 2 h ahead: rejected (clock_skew) under a 1 h limit."""
    return [_dead_letter(corpus.topic("telemetry", device_id=device), corpus.telemetry_payload(
        uuid.uuid4(), NOW + timedelta(hours=2), [{"metric_type": "temperature", "metric_value": 20 + i, "unit": "C"}]))
        for i in range(n)]


@pytest.fixture
def dead_letters(db_url):
    rows = [
        *_future("clock-ahead", 3),
        _dead_letter(corpus.topic("telemetry", device_id="bad-firmware"),
                     corpus.telemetry_payload(uuid.uuid4(), NOW, [])),                # schema: no readings
        _dead_letter("farmiq/v1/tenant-a/farm-1/barn-1/cam-1/unknown", b"{}"),      # bad_topic
        # A 64 KiB payload: what the bridge kept of a larger message (cut JSON).
        _dead_letter(corpus.topic("telemetry", device_id="chatty"), b'{"event_id": "' + b"x" * 70_000),
    ]
    assert [r["reason"] for r in rows] == ["clock_skew"] * 3 + ["schema", "bad_topic", "invalid_json"]
    assert len(rows[-1]["payload"]) == MAX_DEAD_LETTER_PAYLOAD
    with transaction(db_url) as conn:
        conn.execute(insert(ingress_dead_letters), rows)
        # The bad_topic one arrived yesterday.
        conn.exec_driver_sql("UPDATE ingress_dead_letters SET received_at = now() - interval '1 day' "
                             "WHERE reason = 'bad_topic'")
    return rows


@pytest.fixture
def cli(db_url, monkeypatch, capsys):
    monkeypatch.setenv("EDGE_DATABASE_URL", db_url)
    monkeypatch.setenv("EDGE_MAX_CLOCK_SKEW", "PT1H")

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main(["dlq", "ingress", *argv])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def _reasons(db_url: str) -> dict[str, int]:
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT reason, count(*) FROM ingress_dead_letters GROUP BY reason")
            return dict(cur.fetchall())
    finally:
        conn.close()


def test_list_counts_by_reason_with_filters(cli, dead_letters):
    rc, out, _ = cli("list")
    assert rc == 0
    assert "6 ingress dead letters" in out
    assert re.search(r"^clock_skew +3 ", out, re.M) and re.search(r"^schema +1 ", out, re.M)
    assert "65,536*" in out and "may be truncated" in out

    assert "3 ingress dead letters" in cli("list", "--reason", "clock_skew")[1]
    # A glob, and the same as a LIKE pattern.
    assert "3 ingress dead letters" in cli("list", "--topic", "farmiq/v1/*/clock-ahead/*")[1]
    assert "3 ingress dead letters" in cli("list", "--topic", "%/clock-ahead/%")[1]
    assert "1 ingress dead letter\n" in cli("list", "--older-than", "2h")[1]
    assert "5 ingress dead letters" in cli("list", "--newer-than", "2h")[1]
    assert "0 ingress dead letters" in cli("list", "--reason", "bad_image")[1]


def test_show_prints_one_dead_letter_with_its_payload(cli, dead_letters):
    row = dead_letters[3]
    rc, out, _ = cli("show", str(row["id"]))
    assert rc == 0
    assert "reason:         schema" in out
    assert "readings" in out  # the payload, as text
    assert row["topic"] in out
    assert cli("show", str(uuid.uuid4()))[0] == 1
    assert cli("show", "not-a-uuid")[0] == 2


def test_redrive_ingests_what_passes_today_and_is_safe_twice(cli, dead_letters, db_url, monkeypatch, tmp_path):
    # No filter and no --all: a usage error, nothing changed.
    rc, _, err = cli("redrive")
    assert rc == 2 and "--all" in err
    # Under the setting that rejected them, nothing passes; reasons stay.
    rc, out, _ = cli("redrive", "--all")
    assert rc == 0
    assert "6 ingress dead letters examined: 0 re-driven" in out
    assert _reasons(db_url) == {"clock_skew": 3, "schema": 1, "bad_topic": 1, "invalid_json": 1}

    # The operator relaxes the clock-skew limit: the three pass, the rest stay with today's verdict.
    monkeypatch.setenv("EDGE_MAX_CLOCK_SKEW", "PT24H")
    rc, out, _ = cli("redrive", "--all")
    assert rc == 0
    assert "6 ingress dead letters examined: 3 re-driven (enqueued for ingest), 3 still failing" in out
    assert "1 dead letter with a payload of 64 KiB may be truncated" in out
    assert _reasons(db_url) == {"schema": 1, "bad_topic": 1, "invalid_json": 1}
    detail = scalar(db_url, "SELECT detail FROM ingress_dead_letters WHERE reason = 'invalid_json'")
    assert "cannot be re-driven" in detail
    assert scalar(db_url, "SELECT count(*) FROM dramatiq.queue WHERE queue_name = 'ingest'") == 1

    # Twice: nothing more is enqueued, the same three still fail.
    rc, out, _ = cli("redrive", "--all")
    assert "3 ingress dead letters examined: 0 re-driven (enqueued for ingest), 3 still failing" in out
    assert scalar(db_url, "SELECT count(*) FROM dramatiq.queue WHERE queue_name = 'ingest'") == 1

    # A real ingest worker takes the re-driven batch: three readings land.
    worker = EdgeProcess("worker-ingest", edge_command("worker", "--queues", "ingest"),
                         edge_env(db_url, "mqtt://127.0.0.1:1883", tmp_path, EDGE_MAX_CLOCK_SKEW="PT24H"),
                         tmp_path / "worker.log").start()
    try:
        wait_until(lambda: queue_idle(db_url) and scalar(db_url, "SELECT count(*) FROM telemetry_raw") == 3,
                   60, "the re-driven readings to be ingested")
    finally:
        assert worker.stop() == 0, worker.log()[-2000:]
    assert scalar(db_url, "SELECT count(DISTINCT device_id) FROM telemetry_raw") == 1
    assert scalar(db_url, "SELECT count(*) FROM ingress_dedupe") == 3


def test_redrive_with_filters_leaves_other_dead_letters_alone(cli, dead_letters, db_url, monkeypatch):
    monkeypatch.setenv("EDGE_MAX_CLOCK_SKEW", "PT24H")
    rc, out, _ = cli("redrive", "--reason", "schema")
    assert rc == 0 and "1 ingress dead letter examined: 0 re-driven" in out
    assert _reasons(db_url)["clock_skew"] == 3
    rc, out, _ = cli("redrive", "--topic", "*/clock-ahead/*", "--newer-than", "1h")
    assert "3 ingress dead letters examined: 3 re-driven" in out


def test_purge_deletes_matching_dead_letters_and_is_safe_twice(cli, dead_letters, db_url):
    assert cli("purge")[0] == 2  # no filter, no --all
    rc, out, _ = cli("purge", "--older-than", "2h")
    assert rc == 0 and "1 ingress dead letter purged" in out
    assert "bad_topic" not in _reasons(db_url)
    assert "0 ingress dead letters purged" in cli("purge", "--older-than", "2h")[1]
    assert "5 ingress dead letters purged" in cli("purge", "--all")[1]
    assert _reasons(db_url) == {}
