"""`farmiq-edge bench queue`: drain a backlog of no-op messages, ours against stock dramatiq-pg.

A scratch database on EDGE_DATABASE_URL's server (migrated, dropped at the
end). For each broker: write the backlog straight into `dramatiq.queue`, start
`dramatiq workers.bench.queue_actors --processes P --threads T` (the same CLI,
processes and threads for both), and time from the first message taken to the
queue empty. Sampled meanwhile: pg_locks rows of the database (all, and
advisory) and the workers' RSS (whole process tree).

The stock broker drains a smaller backlog (--stock-messages): it holds one
advisory lock per message until idle, and 100,000 of them would exhaust
PostgreSQL's shared lock table (max_locks_per_transaction × max_connections,
6,400 by default) and with it every other session of the server.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import psycopg2
from dramatiq.message import Message

from models.settings import Settings
from workers.bench.ingest import Bench, Db, RssSampler, say
from workers.bench.queue_actors import ACTOR, EDGE_QUEUE, STOCK_QUEUE
from workers.dev.processes import EdgeProcess

from workers.exit_codes import EXIT_FAILURE, EXIT_OK
SAMPLE_SECONDS = 0.1

LOCKS = """
    SELECT count(*), count(*) FILTER (WHERE locktype = 'advisory')
      FROM pg_locks
     WHERE database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND pid <> pg_backend_pid()
"""
LEFT = "SELECT count(*) FROM dramatiq.queue WHERE queue_name = %s AND state IN ('queued', 'consumed')"


def write_backlog(db_url: str, queue: str, n: int) -> None:
    """n messages in one COPY (no NOTIFY: a backlog waiting for workers)."""
    import io
    import json
    buf = io.StringIO()
    for i in range(n):
        m = Message(queue_name=queue, actor_name=ACTOR, args=(i,), kwargs={}, options={})
        body = json.dumps(m.asdict(), separators=(",", ":")).replace("\\", "\\\\")
        buf.write(f"{queue}\t{m.message_id}\tqueued\t{body}\n")
    buf.seek(0)
    conn = psycopg2.connect(db_url)
    with conn, conn.cursor() as cur:
        cur.copy_expert("COPY dramatiq.queue (queue_name, message_id, state, message) FROM STDIN", buf)
    conn.close()


class Run:
    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n
        self.seconds = 0.0
        self.peak_locks = self.peak_advisory = 0
        self.peak_rss = 0
        self.done = False

    @property
    def rate(self) -> float:
        return self.n / self.seconds if self.seconds else 0.0


def drain(db_url: str, tmp: Path, run: Run, queue: str, *, processes: int, threads: int,
          timeout: float, stock: bool) -> Run:
    write_backlog(db_url, queue, run.n)
    env = {"EDGE_DATABASE_URL": db_url, "EDGE_METRICS_PORT": "0", "FARMIQ_BENCH_STOCK": "1" if stock else "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "dramatiq", "workers.bench.queue_actors", "--queues", queue,
            "--processes", str(processes), "--threads", str(threads)]
    db = Db(db_url)
    worker = EdgeProcess(f"{run.name}-workers", argv, env, tmp / f"{run.name}.log").start()
    sampler = RssSampler({"workers": worker.pid})
    sampler.start()
    started = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            locks, advisory = db.one(LOCKS)
            run.peak_locks, run.peak_advisory = max(run.peak_locks, locks), max(run.peak_advisory, advisory)
            left = db.one(LEFT, (queue,))[0]
            if started is None and left < run.n:
                started = time.monotonic()
            if left == 0:
                run.seconds, run.done = time.monotonic() - (started or time.monotonic()), True
                break
            if not worker.alive():
                say(f"{run.name}: workers exited; last log lines:\n" + "\n".join(worker.log().splitlines()[-10:]))
                break
            time.sleep(SAMPLE_SECONDS)
    finally:
        worker.stop()
        sampler.stop()
        db.close()
    run.peak_rss = sampler.peak["workers"]
    return run


def run_queue_bench(settings: Settings, args: Any) -> int:
    bench = Bench(settings, args)
    try:
        bench.setup_database()
        db_url, tmp = bench.db_url, bench.tmp
        say(f"queue bench: {args.processes} worker processes × {args.threads} threads, no-op actor; logs in {tmp}")
        ours = drain(db_url, tmp, Run("ours", args.messages), EDGE_QUEUE, processes=args.processes,
                     threads=args.threads, timeout=args.timeout, stock=False)
        report(ours)
        stock = None
        if args.stock_messages:
            stock = drain(db_url, tmp, Run("stock", args.stock_messages), STOCK_QUEUE,
                          processes=args.processes, threads=args.threads, timeout=args.timeout, stock=True)
            report(stock)
        if stock and stock.done and ours.done:
            say(f"ratio      ours / stock dramatiq-pg: {ours.rate / stock.rate:.1f}× messages/s")
        size = bench.db.one("SELECT pg_total_relation_size('dramatiq.queue')")[0]
        say(f"table      dramatiq.queue {size / 2**20:.1f} MiB after the runs (acked rows deleted)")
        return EXIT_OK if ours.done else EXIT_FAILURE
    finally:
        bench.teardown()


def report(run: Run) -> None:
    if not run.done:
        say(f"{run.name:<10} did not drain {run.n:,} messages in time")
        return
    say(f"{run.name:<10} {run.n:>9,} messages in {run.seconds:6.2f} s = {run.rate:8,.0f} msg/s; "
        f"peak pg_locks rows {run.peak_locks} (advisory {run.peak_advisory}); "
        f"workers' peak RSS {run.peak_rss / 2**20:.0f} MiB")

