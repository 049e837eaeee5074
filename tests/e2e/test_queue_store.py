"""The queue store with real `dramatiq` worker processes: replicas, kill -9, a lost table.

Three worker processes consume one queue (tests/support/queue_probe.py, which
records each processed value in `probe_seen`). Counting by value shows what
was processed and how often; pg_locks, sampled throughout, shows the locks.
"""

import random
import threading
import time

import psutil
import psycopg2
import pytest
from dramatiq.message import Message
from psycopg2.extras import Json, execute_values

from actors.queue_consumer import LEASE_SECONDS, SWEEP_SECONDS
from tests.support.processes import edge_env, scalar, wait_until
from tests.support.queue_probe import CREATE_TABLE, QUEUE
from workers.dev.processes import EdgeProcess

WORKERS = 3


def start_worker(db_url: str, tmp, n: int) -> EdgeProcess:
    env = edge_env(db_url, "mqtt://127.0.0.1:1", tmp)
    argv = [__import__("sys").executable, "-m", "dramatiq", "tests.support.queue_probe", "--queues", QUEUE,
            "--processes", "1", "--threads", "4"]
    return EdgeProcess(f"probe-worker-{n}", argv, env, tmp / f"probe-worker-{n}.log").start()


def enqueue(db_url: str, values: range) -> None:
    rows = []
    for i in values:
        m = Message(queue_name=QUEUE, actor_name="record", args=(i,), kwargs={}, options={})
        rows.append((QUEUE, m.message_id, "queued", Json(m.asdict())))
    conn = psycopg2.connect(db_url)
    with conn, conn.cursor() as cur:
        execute_values(cur, "INSERT INTO dramatiq.queue (queue_name, message_id, state, message) VALUES %s",
                       rows, page_size=2000)
        cur.execute(f"NOTIFY \"dramatiq.{QUEUE}.enqueue\"")
    conn.close()


class LockSampler(threading.Thread):
    """Peak pg_locks rows (all, and advisory) of one database, every 50 ms."""

    def __init__(self, db_url: str) -> None:
        super().__init__(daemon=True)
        self.db_url, self.stopped = db_url, threading.Event()
        self.peak_locks = self.peak_advisory = 0

    def run(self) -> None:
        conn = psycopg2.connect(self.db_url)
        conn.autocommit = True
        with conn.cursor() as cur:
            while not self.stopped.is_set():
                cur.execute("""SELECT count(*), count(*) FILTER (WHERE locktype = 'advisory')
                                 FROM pg_locks
                                WHERE database = (SELECT oid FROM pg_database WHERE datname = current_database())
                                  AND pid <> pg_backend_pid()""")
                locks, advisory = cur.fetchone()
                self.peak_locks, self.peak_advisory = max(self.peak_locks, locks), max(self.peak_advisory, advisory)
                self.stopped.wait(0.05)
        conn.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)


def idle_locks(db_url: str) -> int:
    return scalar(db_url, """SELECT count(*) FROM pg_locks
                              WHERE database = (SELECT oid FROM pg_database WHERE datname = current_database())
                                AND pid <> pg_backend_pid()""")


@pytest.fixture
def probe_db(db_url):
    conn = psycopg2.connect(db_url)
    with conn, conn.cursor() as cur:
        cur.execute(CREATE_TABLE)
    conn.close()
    return db_url


def seen(db_url: str) -> tuple[int, int]:
    """(processed values, processings)."""
    return scalar(db_url, "SELECT count(DISTINCT i) FROM probe_seen"), scalar(db_url, "SELECT count(*) FROM probe_seen")


def test_three_workers_process_20k_exactly_once_with_no_lock_held(probe_db, tmp_path):
    n = 20_000
    enqueue(probe_db, range(n))
    sampler = LockSampler(probe_db)
    sampler.start()
    workers = [start_worker(probe_db, tmp_path, i) for i in range(WORKERS)]
    try:
        wait_until(lambda: seen(probe_db)[0] == n, 180, "20,000 messages processed")
    finally:
        for w in workers:
            w.stop()
        sampler.stop()
    assert seen(probe_db) == (n, n)  # once each
    assert scalar(probe_db, "SELECT count(DISTINCT pid) FROM probe_seen") == WORKERS
    assert sampler.peak_advisory == 0
    assert sampler.peak_locks < 150, sampler.peak_locks
    assert scalar(probe_db, "SELECT count(*) FROM dramatiq.queue") == 0
    wait_until(lambda: idle_locks(probe_db) == 0, 15, "no lock left once idle (backends of stopped workers exit)")


def test_kill_9_of_a_worker_loses_nothing_and_its_claims_return_within_the_lease(probe_db, tmp_path):
    n = 20_000
    enqueue(probe_db, range(n))
    sampler = LockSampler(probe_db)
    sampler.start()
    workers = [start_worker(probe_db, tmp_path, i) for i in range(WORKERS)]
    rng = random.Random(7)
    recoveries = []
    try:
        for kill in range(3):
            wait_until(lambda: seen(probe_db)[0] >= (kill + 1) * 4_000, 120, "progress before a kill")
            victim = rng.randrange(WORKERS)
            pids = [c.pid for c in psutil.Process(workers[victim].pid).children(recursive=True)]
            workers[victim].kill9()
            killed_at = time.monotonic()
            stranded = scalar(probe_db, """SELECT count(*) FROM dramatiq.queue q JOIN dramatiq.consumers c
                                                  USING (consumer_id)
                                            WHERE q.state = 'consumed' AND c.pid = ANY(%s)""", (pids,))
            # Its claims are stranded until the lease runs out; then another worker takes them.
            wait_until(lambda: scalar(probe_db, """SELECT count(*) FROM dramatiq.consumers WHERE pid = ANY(%s)""",
                                      (pids,)) == 0,
                       LEASE_SECONDS + SWEEP_SECONDS + 20, "the dead worker's claims to return")
            recoveries.append((stranded, time.monotonic() - killed_at))
            workers[victim] = start_worker(probe_db, tmp_path, 10 + kill)  # as Kubernetes would
        wait_until(lambda: seen(probe_db)[0] == n, 180, "every message processed")
    finally:
        for w in workers:
            w.stop()
        sampler.stop()
    print("claims of a killed worker back in the queue: "
          + ", ".join(f"{n} after {t:.1f}s" for n, t in recoveries))
    assert all(t <= LEASE_SECONDS + SWEEP_SECONDS + 5 for _, t in recoveries), recoveries
    assert sum(n for n, _ in recoveries) > 0  # the kills did strand claims
    assert seen(probe_db)[0] == n  # at-least-once: a killed worker's in-flight ones may run twice
    assert sampler.peak_advisory == 0
    assert sampler.peak_locks < 150, sampler.peak_locks
    assert scalar(probe_db, "SELECT count(*) FROM dramatiq.queue") == 0
    wait_until(lambda: idle_locks(probe_db) == 0, 15, "no lock left once idle (backends of stopped workers exit)")


def test_a_lost_table_for_40s_under_load_then_every_message_arrives(probe_db, tmp_path):
    """The work's target disappears; every message fails into retries, then all arrive."""
    n, outage = 20_000, 40.0
    sampler = LockSampler(probe_db)
    sampler.start()
    workers = [start_worker(probe_db, tmp_path, i) for i in range(WORKERS)]
    feeding = threading.Thread(target=lambda: [enqueue(probe_db, range(i, i + 500)) or time.sleep(0.1)
                                               for i in range(0, n, 500)])
    try:
        feeding.start()  # load: 500 messages every ~0.1 s
        wait_until(lambda: seen(probe_db)[0] >= 1_000, 60, "the first messages")
        conn = psycopg2.connect(probe_db)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ALTER TABLE probe_seen RENAME TO probe_seen_away")
            time.sleep(outage)
            waiting = scalar(probe_db, "SELECT count(*) FROM dramatiq.queue WHERE state = 'queued' "
                                       "AND (message->'options'->>'retries')::int > 0")
            cur.execute("ALTER TABLE probe_seen_away RENAME TO probe_seen")
        conn.close()
        feeding.join(60)
        wait_until(lambda: seen(probe_db)[0] == n, 180, "every message after the outage")
    finally:
        for w in workers:
            w.stop()
        sampler.stop()
    assert waiting > 1_000  # the outage did push messages into retries
    assert seen(probe_db)[0] == n
    assert sampler.peak_advisory == 0
    assert sampler.peak_locks < 150, sampler.peak_locks
    wait_until(lambda: idle_locks(probe_db) == 0, 15, "no lock left once idle (backends of stopped workers exit)")
