"""The queue store (actors/broker.py, actors/queue_consumer.py) on real PostgreSQL.

Claim with SKIP LOCKED, lease by heartbeat, delete at ack, delays in the table.
Stock dramatiq-pg's defects are shown on the stock class with a backlog far
below PostgreSQL's shared lock table; ours is shown without them.
"""

import logging
import threading
import time
from collections import defaultdict

import dramatiq
import psutil
import psycopg2
import pytest
from dramatiq import Worker
from dramatiq.message import Message
from dramatiq.middleware import Retries
from dramatiq_pg import PostgresBroker
from psycopg2.extras import Json, execute_values

from actors.broker import EdgeBroker
from actors.queue_dead_letters import DeadLetters
from actors.queue_consumer import CLAIM, EdgeConsumer
from tests.support.processes import rows as query

THREADS = 4


class Counter:
    def __init__(self) -> None:
        self.by_value: dict[int, int] = defaultdict(int)
        self.lock = threading.Lock()

    def __call__(self, i: int = 0) -> None:
        with self.lock:
            self.by_value[i] += 1

    @property
    def n(self) -> int:
        return sum(self.by_value.values())


def stock_broker(url: str) -> PostgresBroker:
    return PostgresBroker(url=url, results=False, middleware=[])


def edge_broker(url: str, middleware=None) -> EdgeBroker:
    return EdgeBroker(url=url, middleware=middleware or [])


def declare(broker, queue: str, func) -> dramatiq.Actor:
    return dramatiq.actor(func, broker=broker, queue_name=queue, actor_name=f"count_{queue}")


def bulk_enqueue(url: str, queue: str, actor_name: str, n: int) -> list[str]:
    """Write n messages straight into the queue table (no NOTIFY: a backlog)."""
    rows, ids = [], []
    for i in range(n):
        m = Message(queue_name=queue, actor_name=actor_name, args=(i,), kwargs={}, options={})
        rows.append((queue, m.message_id, "queued", Json(m.asdict())))
        ids.append(m.message_id)
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        execute_values(cur, "INSERT INTO dramatiq.queue (queue_name, message_id, state, message) VALUES %s",
                       rows, page_size=2000)
    conn.close()
    return ids



LOCKS = """
    SELECT count(*) FILTER (WHERE locktype = 'advisory'), count(*)
      FROM pg_locks WHERE database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def drain(broker, url: str, queue: str, n: int, *, on_sample=None, timeout: float = 240) -> dict:
    """Run a real dramatiq Worker until n messages are processed; sample while it runs."""
    count = Counter()
    actor = declare(broker, queue, count)
    bulk_enqueue(url, queue, actor.actor_name, n)
    worker = Worker(broker, worker_threads=THREADS, worker_timeout=100)
    peak_advisory = peak_locks = 0
    watcher = psycopg2.connect(url)
    watcher.autocommit = True
    worker.start()
    try:
        deadline = time.monotonic() + timeout
        with watcher.cursor() as cur:
            while count.n < n and time.monotonic() < deadline:
                cur.execute(LOCKS)
                advisory, locks = cur.fetchone()
                peak_advisory, peak_locks = max(peak_advisory, advisory), max(peak_locks, locks)
                if on_sample:
                    on_sample(count.n)
                time.sleep(0.02)
    finally:
        worker.stop()
        broker.close()
        watcher.close()
    return {"count": count, "peak_advisory": peak_advisory, "peak_locks": peak_locks}


def test_stock_consumer_holds_a_lock_per_message_until_idle(db_url):
    result = drain(stock_broker(db_url), db_url, "leak", 2_000)
    assert result["count"].n == 2_000
    # One advisory lock per consumed message piles up while the backlog drains.
    assert result["peak_advisory"] > 1_000


def test_edge_consumer_drains_20k_once_each_without_locks_and_with_flat_memory(db_url):
    process = psutil.Process()
    rss: dict[str, int] = {}

    def sample(done: int) -> None:
        if done >= 1_000:
            rss.setdefault("after_first_1000", process.memory_info().rss)
            rss["peak"] = max(rss.get("peak", 0), process.memory_info().rss)

    result = drain(edge_broker(db_url), db_url, "drain", 20_000, on_sample=sample)
    assert result["count"].by_value == {i: 1 for i in range(20_000)}
    assert result["peak_advisory"] == 0
    # Only the locks of statements in flight (a few relations each), whatever the backlog.
    assert result["peak_locks"] < 60
    growth_mib = (rss["peak"] - rss["after_first_1000"]) / 2**20
    assert growth_mib < 16, f"consumer memory grew {growth_mib:.1f} MiB while draining"
    # Acked messages leave the table; the consumer left the lease table on stop.
    assert query(db_url, "SELECT count(*) FROM dramatiq.queue") == [(0,)]
    assert query(db_url, "SELECT count(*) FROM dramatiq.consumers") == [(0,)]


def test_a_claim_takes_a_bounded_batch_and_reads_nothing_it_does_not_claim(db_url):
    broker = edge_broker(db_url)
    actor = declare(broker, "backlog", Counter())
    bulk_enqueue(db_url, "backlog", actor.actor_name, 2_000)
    # Oldest due first: the last message enqueued was due before all others.
    query(db_url, "UPDATE dramatiq.queue SET due_at = now() - interval '1 hour' "
                  "WHERE (message->'args'->>0)::int = 1999")
    consumer = broker.consume("backlog", prefetch=8, timeout=100)
    try:
        first = next(consumer)
        assert first.args == (1999,)
        held = 1 + len(consumer.ready)
        assert held == consumer.prefetch <= 64
        rows = query(db_url, "SELECT state::text, consumer_id::text, count(*) FROM dramatiq.queue "
                             "GROUP BY 1, 2 ORDER BY 1")
        assert rows == [("consumed", consumer.consumer_id, held), ("queued", None, 2_000 - held)]
    finally:
        consumer.close()
        broker.close()
    # close() gave the unstarted claims back (the one handed out is still ours).
    assert query(db_url, "SELECT count(*) FROM dramatiq.queue WHERE state = 'queued'") == [(1_999,)]


def test_two_consumers_never_claim_the_same_message(db_url):
    broker = edge_broker(db_url)
    actor = declare(broker, "race", Counter())
    ids = bulk_enqueue(db_url, "race", actor.actor_name, 3_000)
    claimed: dict[str, list[str]] = {"a": [], "b": []}

    def take(name: str) -> None:
        consumer = broker.consume("race", prefetch=16, timeout=50)
        idle = 0
        while idle < 5:
            message = next(consumer)
            if message is None:
                idle += 1
                continue
            idle = 0
            claimed[name].append(message.message_id)
            consumer.ack(message)
        consumer.close()

    threads = [threading.Thread(target=take, args=(name,)) for name in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    broker.close()
    assert not set(claimed["a"]) & set(claimed["b"])
    assert sorted(claimed["a"] + claimed["b"]) == sorted(ids)
    assert claimed["a"] and claimed["b"]
    assert query(db_url, "SELECT count(*) FROM dramatiq.queue") == [(0,)]


def test_an_ack_applies_only_to_the_claim_it_was_given_for(db_url):
    broker = edge_broker(db_url)
    actor = declare(broker, "claims", Counter())
    message_id = actor.send(1).message_id
    consumer = broker.consume("claims", prefetch=1, timeout=50)
    try:
        first = next(consumer)
        # Retries puts the message back (same id) before the worker acks the first attempt.
        broker.enqueue(first._message)
        second = next(consumer) or next(consumer)
        assert second.message_id == message_id and second.claim_id != first.claim_id
        consumer.ack(first)
        next(consumer)  # flushes the ack of the stale claim: nothing happens
        assert query(db_url, "SELECT state::text FROM dramatiq.queue WHERE message_id = %s",
                     (message_id,)) == [("consumed",)]
        consumer.ack(second)
        next(consumer)
        assert query(db_url, "SELECT count(*) FROM dramatiq.queue") == [(0,)]
    finally:
        consumer.close()
        broker.close()


def test_a_closed_consumer_gives_its_unstarted_claims_to_others_at_once(db_url):
    broker = edge_broker(db_url)
    actor = declare(broker, "handover", Counter())
    bulk_enqueue(db_url, "handover", actor.actor_name, 100)
    first = broker.consume("handover", prefetch=32, timeout=50)
    handed = next(first)
    first.ack(handed)
    first.close()  # e.g. dramatiq restarting it: 31 unstarted claims go back
    other = EdgeBroker(url=db_url, middleware=[])
    declare(other, "handover", Counter())
    second = other.consume("handover", prefetch=100, timeout=50)
    try:
        got = [next(second)]
        got += list(second.ready)
        assert len(got) == 99  # everything but the acked one, with no wait for a lease
    finally:
        second.close()
        broker.close()
        other.close()


def test_a_dead_consumers_claims_return_after_its_lease(db_url):
    broker = edge_broker(db_url)
    actor = declare(broker, "lease", Counter())
    bulk_enqueue(db_url, "lease", actor.actor_name, 50)
    dead = broker.consume("lease", prefetch=32, timeout=50)
    next(dead)
    dead._close_connection()  # dies without a word: its row and claims stay
    assert query(db_url, "SELECT count(*) FROM dramatiq.queue WHERE state = 'consumed'") == [(32,)]

    other = EdgeBroker(url=db_url, middleware=[])
    declare(other, "lease", Counter())
    alive = other.consume("lease", prefetch=64, timeout=50)
    try:
        assert len([next(alive)] + list(alive.ready)) == 18  # the lease still holds
        # Time passes: the dead consumer's heartbeat is older than the lease.
        query(db_url, "UPDATE dramatiq.consumers SET beat_at = now() - interval '1 minute' "
                      "WHERE consumer_id = %s", (dead.consumer_id,))
        alive.last_sweep = 0.0
        for m in [*alive.ready]:
            alive.ack(m)
        alive.ready.clear()
        alive.held = 0
        recovered = next(alive)
        assert recovered is not None and 1 + len(alive.ready) == 32
        assert query(db_url, "SELECT count(*) FROM dramatiq.consumers WHERE consumer_id = %s",
                     (dead.consumer_id,)) == [(0,)]
    finally:
        alive.close()
        broker.close()
        other.close()


def test_retries_wait_in_the_table_on_schedule_and_hold_no_locks(db_url):
    """5,000 messages failing once: each retried after its backoff, driven by due_at."""
    broker = edge_broker(db_url, [DeadLetters(), Retries(max_retries=3, min_backoff=1000, max_backoff=1000)])
    attempts: dict[int, list[float]] = defaultdict(list)
    lock = threading.Lock()

    def flaky(i: int) -> None:
        with lock:
            attempts[i].append(time.time())
            first = len(attempts[i]) == 1
        if first:
            raise dramatiq.Retry  # (a Retry is not logged as an error)

    actor = dramatiq.actor(flaky, broker=broker, queue_name="retry", actor_name="flaky")
    n = 5_000
    bulk_enqueue(db_url, "retry", actor.actor_name, n)
    worker = Worker(broker, worker_threads=8, worker_timeout=100)
    watcher = psycopg2.connect(db_url)
    watcher.autocommit = True
    waiting_seen = peak_advisory = peak_locks = 0
    worker.start()
    try:
        deadline = time.monotonic() + 180
        with watcher.cursor() as cur:
            while sum(len(a) == 2 for a in attempts.values()) < n and time.monotonic() < deadline:
                cur.execute(LOCKS)
                advisory, locks = cur.fetchone()
                peak_advisory, peak_locks = max(peak_advisory, advisory), max(peak_locks, locks)
                cur.execute("SELECT count(*) FROM dramatiq.queue WHERE state = 'queued' AND due_at > now()")
                waiting_seen = max(waiting_seen, cur.fetchone()[0])
                time.sleep(0.05)
    finally:
        worker.stop()
        broker.close()
        watcher.close()
    assert sorted(len(a) for a in attempts.values()) == [2] * n
    gaps = sorted(a[1] - a[0] for a in attempts.values())
    # Retries' backoff is 500–1000 ms (jittered): no retry runs before its due time.
    # (How soon after it runs depends on the backlog ahead of it: printed, not asserted.)
    assert gaps[0] >= 0.45, gaps[:5]
    print(f"retry gaps: min {gaps[0]:.2f}s, median {gaps[len(gaps) // 2]:.2f}s, max {gaps[-1]:.2f}s")
    assert waiting_seen > 100  # the retries did wait in the table, not in memory
    assert peak_advisory == 0 and peak_locks < 80
    assert query(db_url, "SELECT count(*) FROM dramatiq.queue") == [(0,)]


def test_a_lost_connection_is_resumed_in_place_with_no_message_lost(db_url, caplog):
    caplog.set_level(logging.INFO, logger="dramatiq")
    broker = edge_broker(db_url)
    count = Counter()
    actor = declare(broker, "reconnect", count)
    bulk_enqueue(db_url, "reconnect", actor.actor_name, 5_000)
    worker = Worker(broker, worker_threads=THREADS, worker_timeout=100)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        killed = 0
        while count.n < 5_000 and time.monotonic() < deadline:
            if count.n > 1_000 * (killed + 1) and killed < 3:
                query(db_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE application_name LIKE 'farmiq-edge consumer%%'")
                killed += 1
            time.sleep(0.01)
    finally:
        worker.stop()
        broker.close()
    assert killed == 3
    assert set(count.by_value) == set(range(5_000))
    assert query(db_url, "SELECT count(*) FROM dramatiq.queue") == [(0,)]
    # Resumed by the consumer itself, not by dramatiq's 3-second consumer restart.
    assert not [r for r in caplog.records if "Restarting consumer" in r.getMessage()]


@pytest.mark.parametrize("make_broker, served", [(stock_broker, False), (edge_broker, True)])
def test_six_queues_in_one_worker(db_url, make_broker, served, caplog):
    caplog.set_level(logging.CRITICAL, logger="dramatiq")
    broker = make_broker(db_url)
    counts = {f"q{i}": Counter() for i in range(6)}
    actors = {q: declare(broker, q, c) for q, c in counts.items()}
    for actor in actors.values():  # before the worker holds the pool's connections
        actor.send()
    worker = Worker(broker, worker_threads=THREADS, worker_timeout=100)
    worker.start()
    try:
        deadline = time.monotonic() + 15
        while sum(c.n for c in counts.values()) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # let acks land
    finally:
        worker.stop()
        broker.close()
    pool_errors = [r for r in caplog.records if "exhausted" in r.getMessage()
                   or "exhausted" in str(r.exc_info and r.exc_info[1])]
    if served:
        assert {q: c.n for q, c in counts.items()} == {q: 1 for q in counts}
        assert pool_errors == []
    else:
        assert pool_errors, "the stock 16-connection pool should run out with 6 queues"


def test_enqueue_in_follows_the_callers_transaction(db_url):
    broker = edge_broker(db_url)
    count = Counter()
    actor = declare(broker, "tx", count)
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            broker.enqueue_in(cur, actor.message(1))
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM dramatiq.queue WHERE queue_name = 'tx'")
            assert cur.fetchone()[0] == 0
            broker.enqueue_in(cur, actor.message(2))
        conn.commit()
    finally:
        conn.close()
    worker = Worker(broker, worker_threads=THREADS, worker_timeout=100)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while count.n < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()
        broker.close()
    assert dict(count.by_value) == {2: 1}


def test_enqueue_new_in_copies_the_body_exactly_and_follows_the_transaction(db_url):
    broker = edge_broker(db_url)
    actor = declare(broker, "copied", Counter())
    # What COPY's text format would misread unescaped: backslashes (JSON's own
    # escapes, a literal "\\N"), tabs, newlines; and text beyond ASCII.
    tricky = ["back\\slash", 'quote"', "tab\t new\nline\r", "\\N", "\\.", "ünïcødé ✓", 1e15, None]
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            broker.enqueue_new_in(cur, actor.message(["rolled back"]))
        conn.rollback()
        with conn.cursor() as cur:
            broker.enqueue_new_in(cur, actor.message(tricky))
        conn.commit()
    finally:
        conn.close()
    consumer = broker.consume("copied", prefetch=1, timeout=50)
    try:
        message = next(consumer)
        assert message.args == (tricky,) and message.queue_name == "copied"
        assert next(consumer) is None  # the rolled-back one never existed
    finally:
        consumer.close()
        broker.close()


def test_a_delayed_message_waits_for_its_due_time(db_url):
    broker = edge_broker(db_url)
    actor = declare(broker, "later", Counter())
    actor.send_with_options(args=(1,), delay=60_000)
    consumer = broker.consume("later", prefetch=1, timeout=50)
    try:
        assert next(consumer) is None
        query(db_url, "UPDATE dramatiq.queue SET due_at = now() - interval '1 second'")
        assert next(consumer).args == (1,)
    finally:
        consumer.close()
        broker.close()


def test_the_claim_uses_its_index(db_url):
    with psycopg2.connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SET enable_seqscan = off")
        cur.execute("EXPLAIN " + CLAIM, {"consumer": "00000000-0000-0000-0000-000000000000",
                                         "queue": "ingest", "n": 10})
        plan = "\n".join(row[0] for row in cur.fetchall())
    conn.close()
    assert "queue_due_idx" in plan


def test_consumer_is_the_only_kind_the_broker_makes():
    assert EdgeBroker(url="postgresql://unused", middleware=[]).get_declared_delay_queues() == set()
    assert issubclass(EdgeConsumer, dramatiq.broker.Consumer)
