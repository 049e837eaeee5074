"""The hardened dramatiq-pg broker (actors/broker.py) against the stock one.

Each stock defect is shown on the stock class with a backlog well below
PostgreSQL's shared lock table (the lock leak would otherwise take the whole
cluster down), and shown fixed on EdgeBroker.
"""

import logging
import threading
import time
from datetime import timedelta

import dramatiq
import psutil
import psycopg2
import pytest
from dramatiq import Worker
from dramatiq.message import Message
from dramatiq_pg import PostgresBroker
from psycopg2.extras import Json, execute_values

from actors.broker import BACKLOG_PAGE, EdgeBroker

THREADS = 4


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self, *args: object) -> None:
        with self.lock:
            self.n += 1


def stock_broker(url: str) -> PostgresBroker:
    return PostgresBroker(url=url, results=False, middleware=[])


def edge_broker(url: str) -> EdgeBroker:
    return EdgeBroker(url=url, threads=THREADS, middleware=[])


def declare(broker, queue: str, func) -> dramatiq.Actor:
    return dramatiq.actor(func, broker=broker, queue_name=queue, actor_name=f"count_{queue}")


def bulk_enqueue(url: str, queue: str, actor_name: str, n: int) -> None:
    """Write n messages straight into the queue table (no NOTIFY: a backlog)."""
    rows = []
    for i in range(n):
        m = Message(queue_name=queue, actor_name=actor_name, args=(i,), kwargs={}, options={})
        rows.append((queue, m.message_id, "queued", Json(m.asdict())))
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        execute_values(cur, "INSERT INTO dramatiq.queue (queue_name, message_id, state, message) VALUES %s",
                       rows, page_size=2000)
    conn.close()


def advisory_locks(cur) -> int:
    cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
    return cur.fetchone()[0]


def drain(broker, url: str, queue: str, n: int, *, on_sample=None, timeout: float = 240) -> dict:
    """Run a real dramatiq Worker until n messages are processed; sample while it runs."""
    count = Counter()
    actor = declare(broker, queue, count)
    bulk_enqueue(url, queue, actor.actor_name, n)
    worker = Worker(broker, worker_threads=THREADS, worker_timeout=100)
    peak_locks = 0
    watcher = psycopg2.connect(url)
    watcher.autocommit = True
    worker.start()
    try:
        deadline = time.monotonic() + timeout
        with watcher.cursor() as cur:
            while count.n < n and time.monotonic() < deadline:
                peak_locks = max(peak_locks, advisory_locks(cur))
                if on_sample:
                    on_sample(count.n)
                time.sleep(0.02)
    finally:
        worker.stop()
        broker.close()
        watcher.close()
    return {"processed": count.n, "peak_locks": peak_locks}


def test_stock_consumer_holds_a_lock_per_message_until_idle(db_url):
    result = drain(stock_broker(db_url), db_url, "leak", 2_000)
    assert result["processed"] == 2_000
    # One advisory lock per consumed message piles up while the backlog drains.
    assert result["peak_locks"] > 1_000


def test_edge_consumer_drains_20k_with_a_handful_of_locks_and_flat_memory(db_url):
    process = psutil.Process()
    rss: dict[str, int] = {}

    def sample(done: int) -> None:
        if done >= 1_000:
            rss.setdefault("after_first_1000", process.memory_info().rss)
            rss["peak"] = max(rss.get("peak", 0), process.memory_info().rss)

    result = drain(edge_broker(db_url), db_url, "drain", 20_000, on_sample=sample)
    assert result["processed"] == 20_000
    # prefetch (2 x threads) in flight, plus locks awaiting release: a handful.
    assert result["peak_locks"] <= 2 * THREADS + 4
    growth_mib = (rss["peak"] - rss["after_first_1000"]) / 2**20
    assert growth_mib < 16, f"consumer memory grew {growth_mib:.1f} MiB while draining"


@pytest.mark.parametrize("make_broker, bounded", [(stock_broker, False), (edge_broker, True)])
def test_backlog_is_read_in_bounded_pages(db_url, make_broker, bounded):
    broker = make_broker(db_url)
    actor = declare(broker, "backlog", Counter())
    bulk_enqueue(db_url, "backlog", actor.actor_name, 2_000)
    consumer = broker.consume("backlog", prefetch=8, timeout=100)
    try:
        next(consumer)
        held = len(consumer.pending_ids if bounded else consumer.notifies)
    finally:
        consumer.close()
        broker.close()
    if bounded:
        assert held <= BACKLOG_PAGE
    else:
        assert held >= 1_999  # the stock consumer loaded the whole backlog


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
            broker.enqueue_in(cur, actor.message("rolled back"))
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM dramatiq.queue WHERE queue_name = 'tx'")
            assert cur.fetchone()[0] == 0
            broker.enqueue_in(cur, actor.message("committed"))
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
    assert count.n == 1


@pytest.mark.parametrize("make_broker, kept", [(stock_broker, False), (edge_broker, True)])
def test_rejected_messages_are_kept_for_the_operator(db_url, make_broker, kept, monkeypatch):
    broker = make_broker(db_url)
    m = Message(queue_name="dlq", actor_name="x", args=(), kwargs={}, options={})
    with psycopg2.connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO dramatiq.queue (queue_name, message_id, state, message, mtime) "
                    "VALUES ('dlq', %s, 'rejected', %s, now() - %s)",
                    (m.message_id, Json(m.asdict()), timedelta(days=60)))
    conn.close()
    monkeypatch.setattr("dramatiq_pg.broker.randint", lambda a, b: 0)  # force the random purge
    consumer = broker.consume("dlq", prefetch=1, timeout=100)
    try:
        consumer.get_consume_conn()
        consumer.auto_purge()
    finally:
        consumer.close()
        broker.close()
    with psycopg2.connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM dramatiq.queue WHERE state = 'rejected'")
        assert (cur.fetchone()[0] == 1) is kept
    conn.close()


def test_per_queue_lookup_uses_its_index(db_url):
    from actors.broker import FETCH_PENDING_PAGE
    with psycopg2.connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SET enable_seqscan = off")
        cur.execute("EXPLAIN " + FETCH_PENDING_PAGE, ("ingest", 10))
        plan = "\n".join(row[0] for row in cur.fetchall())
    conn.close()
    assert "queue_unfinished_idx" in plan
