"""`farmiq-edge dlq` and `farmiq-edge outbox` (workers/operator.py), run as the
real CLI in-process against a real, freshly migrated database.

Queue dead letters come from a real dramatiq Worker on the hardened broker with
the project's middleware (Retries + DeadLetters), so the reason the operator
sees is the one production records.
"""

import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import dramatiq
import psycopg2
import pytest
from dramatiq import Worker
from dramatiq.message import Message
from psycopg2.extras import Json

from actors.broker import EdgeBroker, edge_middleware
from actors.queue_dead_letters import PermanentError, retry_unless_permanent
from models.ids import new_id
from models.settings import load_settings
from tests.support.processes import rows as sql
from workers.cli import main

QUEUE = "opsq"
CLI = Callable[..., tuple[int, str, str]]


# --------------------------------------------------------------------------- helpers

@pytest.fixture
def cli(db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> CLI:
    """Run `farmiq-edge ARGS…` in-process against db_url: (exit code, stdout, stderr)."""
    monkeypatch.setenv("EDGE_DATABASE_URL", db_url)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err
    return run


@pytest.fixture
def broker(db_url: str) -> Iterator[EdgeBroker]:
    # The project's middleware without Prometheus (metrics_port=0).
    settings = load_settings(database_url=db_url, metrics_port=0)
    b = EdgeBroker(url=db_url, middleware=edge_middleware(settings))
    yield b
    b.close()


def queue_row(url: str, message_id: str) -> tuple[str, str, dict[str, Any]] | None:
    """(queue_name, state, message) of one queue row, or None."""
    rows = sql(url, "SELECT queue_name, state::text, message FROM dramatiq.queue WHERE message_id = %s",
               (message_id,))
    return rows[0] if rows else None


def run_worker_until(broker: EdgeBroker, done: Callable[[], bool], timeout: float = 20) -> None:
    worker = Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "the worker did not get there in time"
            time.sleep(0.05)
    finally:
        worker.stop()


def insert_rejected(url: str, *, queue: str = QUEUE, actor: str = "parse_reading",
                    options: dict[str, Any] | None = None, age: timedelta = timedelta(0),
                    state: str = "rejected") -> str:
    """A queue row as dramatiq-pg leaves it after a nack (for cases a worker cannot make quickly)."""
    m = Message(queue_name=queue, actor_name=actor, args=("payload-body-marker",), kwargs={},
                options=options or {})
    sql(url, "INSERT INTO dramatiq.queue (queue_name, message_id, state, message, mtime) "
             "VALUES (%s, %s, %s, %s, now() - %s)", (queue, m.message_id, state, Json(m.asdict()), age))
    return m.message_id


def line_of(out: str, start: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith(start)]
    assert len(lines) == 1, f"expected one line starting {start!r} in:\n{out}"
    return lines[0]


# --------------------------------------------------------------------------- dlq

def test_worker_rejected_message_is_listed_redriven_and_then_done(db_url, broker, cli):
    calls: list[str] = []
    broken = {"yes": True}

    def parse_reading(raw: str) -> None:
        calls.append(raw)
        if broken["yes"]:
            raise PermanentError("reading cannot be parsed")

    actor = dramatiq.actor(parse_reading, broker=broker, queue_name=QUEUE, actor_name="parse_reading")
    message_id = actor.send("payload-body-marker").message_id
    run_worker_until(broker, lambda: queue_row(db_url, message_id)[1] == "rejected")
    assert calls == ["payload-body-marker"]  # permanent: not retried

    rc, out, _ = cli("dlq", "list")
    assert rc == 0
    row = line_of(out, message_id)
    # RETRIES is dramatiq's options.retries: failed attempts, here the only one.
    assert row.split()[:4] == [message_id, QUEUE, "parse_reading", "1"]
    assert row.endswith("PermanentError: reading cannot be parsed")
    assert out.splitlines()[0].split() == ["MESSAGE_ID", "QUEUE", "ACTOR", "RETRIES", "AGE", "REASON"]
    assert "1 rejected queue message\n" in out
    assert "payload-body-marker" not in out  # no payload bodies in list output

    listener = psycopg2.connect(db_url)
    listener.autocommit = True
    try:
        with listener.cursor() as cur:
            cur.execute(f'LISTEN "dramatiq.{QUEUE}.enqueue"')
        rc, out, _ = cli("dlq", "redrive", message_id)
        assert (rc, out) == (0, "1 rejected queue message re-driven\n")
        deadline = time.monotonic() + 5
        while not listener.notifies and time.monotonic() < deadline:
            listener.poll()
            time.sleep(0.02)
        assert [n.channel for n in listener.notifies] == [f"dramatiq.{QUEUE}.enqueue"]  # idle consumers woken
    finally:
        listener.close()

    queue_name, state, message = queue_row(db_url, message_id)
    assert (queue_name, state) == (QUEUE, "queued")
    assert message["options"]["retries"] == 0
    assert "dead_letter_reason" not in message["options"] and "traceback" not in message["options"]

    broken["yes"] = False
    run_worker_until(broker, lambda: queue_row(db_url, message_id) is None)  # acked: deleted
    assert calls == ["payload-body-marker"] * 2

    rc, out, _ = cli("dlq", "list")
    assert (rc, message_id in out) == (0, False)
    assert "0 rejected queue messages\n" in out


def test_exhausted_retries_show_count_and_reason_on_the_canonical_queue(db_url, broker, cli):
    def flaky() -> None:
        raise ConnectionResetError("cloud went away")

    # One retry, quickly: the retry waits in its queue row until due.
    actor = dramatiq.actor(flaky, broker=broker, queue_name=QUEUE, actor_name="flaky",
                           retry_when=retry_unless_permanent(1), min_backoff=10, max_backoff=20)
    message_id = actor.send().message_id
    run_worker_until(broker, lambda: queue_row(db_url, message_id)[1] == "rejected")

    rc, out, _ = cli("dlq", "list", "--queue", QUEUE)
    assert rc == 0
    assert line_of(out, message_id).split()[1:4] == [QUEUE, "flaky", "2"]
    assert line_of(out, message_id).endswith("ConnectionResetError: cloud went away")
    assert out.endswith(f"1 rejected queue message in queue {QUEUE}\n")
    assert "ingress" not in out  # --queue narrows to that queue


def test_list_falls_back_to_the_traceback_and_redrive_makes_it_due_now(db_url, cli):
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'device_id'\n"
    stuck = insert_rejected(db_url, options={"retries": 4, "traceback": traceback, "eta": 1})
    other = insert_rejected(db_url, queue="elsewhere", age=timedelta(hours=3))

    rc, out, _ = cli("dlq", "list")
    assert rc == 0
    assert line_of(out, stuck).split()[1:4] == [QUEUE, "parse_reading", "4"]
    assert line_of(out, stuck).endswith("KeyError: 'device_id'")
    assert line_of(out, other).split()[4] == "3h00m"
    assert line_of(out, other).endswith("(no reason recorded)")
    lines = out.splitlines()
    assert lines.index(line_of(out, stuck)) < lines.index(line_of(out, other))  # newest first
    assert "2 rejected queue messages\n" in out

    rc, out, _ = cli("dlq", "list", "--queue", "elsewhere")
    assert (rc, stuck in out, other in out) == (0, False, True)

    rc, out, _ = cli("dlq", "redrive", "--all", "--queue", QUEUE)
    assert (rc, out) == (0, "1 rejected queue message re-driven\n")
    queue_name, state, message = queue_row(db_url, stuck)
    assert (queue_name, state, message["queue_name"]) == (QUEUE, "queued", QUEUE)
    assert sql(db_url, "SELECT due_at <= now() FROM dramatiq.queue WHERE message_id = %s", (stuck,)) == [(True,)]
    assert message["options"] == {"retries": 0}
    assert queue_row(db_url, other)[1] == "rejected"  # other queue untouched


def test_show_prints_one_message_in_full(db_url, cli):
    traceback = "Traceback (most recent call last):\n  File \"a.py\", line 9, in f\nValueError: bad weight\n"
    message_id = insert_rejected(db_url, options={"retries": 3, "traceback": traceback,
                                                  "dead_letter_reason": "ValueError: bad weight"})
    rc, out, _ = cli("dlq", "show", message_id)
    assert rc == 0
    assert re.search(rf"^message_id:\s+{message_id}$", out, re.M)
    assert re.search(r"^reason:\s+ValueError: bad weight$", out, re.M)
    assert re.search(r"^retries:\s+3$", out, re.M)
    assert "\ntraceback:\n  Traceback (most recent call last):\n" in out
    body = json.loads(out.split("\nmessage:\n", 1)[1])
    assert body == queue_row(db_url, message_id)[2]
    assert body["args"] == ["payload-body-marker"]


def test_show_unknown_or_malformed_id(cli):
    rc, out, err = cli("dlq", "show", str(new_id()))
    assert (rc, out) == (1, "")
    assert "no queue message" in err
    rc, _, err = cli("dlq", "show", "not-an-id")
    assert rc == 2 and "not a message id" in err


@pytest.mark.parametrize("argv", [("dlq", "redrive"), ("dlq", "purge"), ("dlq", "purge", "--queue", QUEUE),
                                  ("outbox", "redrive")])
def test_changes_need_ids_or_all(db_url, cli, argv):
    message_id = insert_rejected(db_url)
    rc, out, err = cli(*argv)
    assert (rc, out) == (2, "")
    assert "--all" in err
    assert queue_row(db_url, message_id)[1] == "rejected"


def test_ids_and_all_together_is_a_usage_error(db_url, cli):
    message_id = insert_rejected(db_url)
    rc, _, err = cli("dlq", "purge", "--all", message_id)
    assert rc == 2 and "not both" in err
    assert queue_row(db_url, message_id) is not None


def test_an_unmatched_id_changes_nothing(db_url, cli):
    rejected = insert_rejected(db_url)
    queued = insert_rejected(db_url, state="queued")  # not a dead letter: not matched
    for action in ("redrive", "purge"):
        for ids in ([rejected, str(new_id())], [queued]):
            rc, out, err = cli("dlq", action, *ids)
            assert (rc, out) == (1, "")
            assert ids[-1] in err and "nothing changed" in err
    assert queue_row(db_url, rejected)[1] == "rejected"
    assert queue_row(db_url, queued)[1] == "queued"


def test_purge_deletes_only_rejected_messages(db_url, cli):
    first, second = insert_rejected(db_url), insert_rejected(db_url, queue="elsewhere")
    queued = insert_rejected(db_url, state="queued")

    rc, out, _ = cli("dlq", "purge", first)
    assert (rc, out) == (0, "1 rejected queue message purged\n")
    assert queue_row(db_url, first) is None and queue_row(db_url, second) is not None

    rc, out, _ = cli("dlq", "purge", "--all", "--queue", QUEUE)
    assert (rc, out) == (0, "0 rejected queue messages purged\n")

    rc, out, _ = cli("dlq", "purge", "--all")
    assert (rc, out) == (0, "1 rejected queue message purged\n")
    assert queue_row(db_url, second) is None
    assert queue_row(db_url, queued)[1] == "queued"


def test_list_counts_ingress_dead_letters_by_reason(db_url, cli):
    for reason, n in (("bad_topic", 2), ("invalid_json", 1)):
        for _ in range(n):
            sql(db_url, "INSERT INTO ingress_dead_letters (id, topic, payload, reason) VALUES (%s, %s, %s, %s)",
                (str(new_id()), "farmiq/v1/t/f/b/d/bogus", b"SECRET-PAYLOAD", reason))
    rc, out, _ = cli("dlq", "list")
    assert rc == 0
    section = out.split("MQTT ingress dead letters", 1)[1]
    assert re.search(r"^bad_topic\s+2\s+\d+s ago$", section, re.M)
    assert re.search(r"^invalid_json\s+1\s+\d+s ago$", section, re.M)
    assert section.index("bad_topic") < section.index("invalid_json")  # most frequent first
    assert section.endswith("3 ingress dead letters\n")
    assert "SECRET" not in out


@pytest.mark.parametrize("argv", [("dlq", "list"), ("outbox", "status")])
def test_no_database_exits_3(monkeypatch, capsys, argv):
    monkeypatch.setenv("EDGE_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/nothing")
    assert main(list(argv)) == 3
    assert "cannot connect to the database" in capsys.readouterr().err


# --------------------------------------------------------------------------- outbox

def add_event(url: str, tenant: str, status: str, *, error: str | None = None, attempts: int = 0,
              created_ago: timedelta = timedelta(0)) -> str:
    event_id = str(new_id())
    sql(url, """INSERT INTO sync_outbox (id, tenant_id, farm_id, barn_id, device_id, event_type,
                                         occurred_at, payload_json, status, attempt_count, last_error,
                                         created_at)
                VALUES (%s, %s, 'f1', 'b1', 'd1', 'telemetry.aggregated', now(), '{"secret": 1}',
                        %s, %s, %s, now() - %s)""",
        (event_id, tenant, status, attempts, error, created_ago))
    return event_id


def outbox_row(url: str, event_id: str) -> tuple[str, int, str | None]:
    return sql(url, "SELECT status, attempt_count, last_error FROM sync_outbox WHERE id = %s", (event_id,))[0]


def test_outbox_status(db_url, cli):
    add_event(db_url, "t1", "pending", created_ago=timedelta(hours=2, minutes=5))
    add_event(db_url, "t1", "pending")
    add_event(db_url, "t1", "acked")
    add_event(db_url, "t1", "failed", error="unknown device")
    add_event(db_url, "t2", "failed", error="unknown device")
    add_event(db_url, "t2", "failed", error="payload too large")
    add_event(db_url, "t2", "claimed")
    sql(db_url, "INSERT INTO sync_state (tenant_id, last_acked_at, consecutive_failures, paused_until, "
                "                        pause_reason, last_error) "
                "VALUES ('t1', '2026-01-02T03:04:05Z', 3, now() + interval '10 minutes', 'network', "
                "        'network: NewConnectionError'), "
                "       ('t3', NULL, 0, NULL, NULL, NULL)")

    rc, out, _ = cli("outbox", "status")
    assert rc == 0
    counts = dict(re.findall(r"^(pending|claimed|sent|acked|failed)\s+(\d+)$", out, re.M))
    assert counts == {"pending": "2", "claimed": "1", "sent": "0", "acked": "1", "failed": "3"}
    assert re.search(r"^oldest pending: 2h0[45]m \(\d{4}-\d\d-\d\dT[\d:]{8}Z\)$", out, re.M)

    tenants = out.split("Per tenant (sync_state):\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert tenants[0].split() == ["TENANT", "PENDING", "CLAIMED", "FAILED", "OLDEST_PENDING", "LAST_ACKED_AT",
                                  "CONSECUTIVE_FAILURES", "PAUSED_UNTIL", "LAST_ERROR"]
    t1 = tenants[1].split()
    assert t1[:4] == ["t1", "2", "0", "1"] and re.fullmatch(r"2h0[45]m", t1[4])
    assert t1[5] == "2026-01-02T03:04:05Z" and "3" in t1 and "(for" in tenants[1]
    assert ", network)" in tenants[1] and tenants[1].rstrip().endswith("network: NewConnectionError")
    assert tenants[2].split()[:5] == ["t2", "0", "1", "2", "-"] and tenants[2].rstrip().endswith("-")
    assert tenants[3].split() == ["t3", "0", "0", "0", "-", "-", "0", "-", "-"]

    reasons = out.split("Top failure reasons", 1)[1].splitlines()[1:]
    assert [r.split(None, 1) for r in reasons] == [["COUNT", "REASON"], ["2", "unknown device"],
                                                   ["1", "payload too large"]]
    assert "secret" not in out


def test_outbox_status_when_empty(cli):
    rc, out, _ = cli("outbox", "status")
    assert rc == 0
    assert re.search(r"^pending\s+0$", out, re.M)
    assert "oldest pending: none" in out and "no tenants" in out and "no failed events" in out


def test_outbox_redrive(db_url, cli):
    first = add_event(db_url, "t1", "failed", error="unknown device", attempts=4)
    second = add_event(db_url, "t2", "failed", error="payload too large", attempts=1)
    acked = add_event(db_url, "t1", "acked", attempts=1)

    rc, out, err = cli("outbox", "redrive", first, acked)  # acked is not failed: nothing changes
    assert (rc, out) == (1, "") and acked in err
    assert outbox_row(db_url, first) == ("failed", 4, "unknown device")

    rc, out, _ = cli("outbox", "redrive", first)
    assert (rc, out) == (0, "1 failed outbox event set back to pending\n")
    assert outbox_row(db_url, first) == ("pending", 4, None)
    assert outbox_row(db_url, second) == ("failed", 1, "payload too large")

    rc, out, _ = cli("outbox", "redrive", "--all")
    assert (rc, out) == (0, "1 failed outbox event set back to pending\n")
    assert outbox_row(db_url, second) == ("pending", 1, None)
    assert outbox_row(db_url, acked) == ("acked", 1, None)
