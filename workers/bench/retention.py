"""`farmiq-edge bench retention`: maintenance under ingest load (issue 10's figures).

Builds what `bench ingest` builds (workers/bench.py: scratch database, private
Mosquitto, the real bridge, ingest and aggregate workers and scheduler), seeds
--seed-rows expired ingress_dedupe rows and as many 'done' dramatiq.queue rows
(small bodies: real done rows of ingest batches are larger and TOASTed), then
offers --rate telemetry msg/s and:

1. after --warmup seconds, runs the `dedupe` and `queue` maintenance jobs in
   this process (actors.retention.run_job, default limits: batches of
   5,000, each its own transaction), and reports the time they took, the
   longest lock wait any backend of the bridge or ingest worker had while they
   ran (pg_locks.waitstart, sampled every LOCK_SAMPLE_SECONDS), and ingest
   publish→commit p50/p99 during the cleanup next to the warm-up's;
2. then starts the `maintenance` worker (as the Procfile does; the scheduler
   has been sending its messages all along) and, for --duration seconds,
   prints the queue table's size (pg_total_relation_size) every
   SIZE_EVERY_SECONDS: start, end and peak bytes. `--duration 600` is the
   10-minute run.

Other EDGE_* variables pass through to the processes (e.g.
EDGE_RETENTION_QUEUE_DONE_MINUTES=1 for a shorter done-row window).
Exit 1 when ingest falls below 90 % of the offered rate or the cleanup left
expired rows behind.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timezone
from typing import Any

import psutil

from models.settings import Settings
from workers.bench import mqtt as bench_mqtt
from workers.bench.ingest import Bench, BenchError, Db, Publishers, say, tree
from workers.dev.processes import NotReady, edge_command

LOCK_SAMPLE_SECONDS = 0.02
SIZE_EVERY_SECONDS = 10.0
SETTLE_SECONDS = 5.0
SLOW_P99_SECONDS = 1.0
RUN_LINE = re.compile(r"^\[(?P<at>[^\]]+)\].*event=retention_done job=(?P<job>\S+).*seconds=(?P<seconds>[\d.]+)")
from workers.exit_codes import EXIT_FAILURE, EXIT_OK

SEED_DEDUPE = """
    INSERT INTO ingress_dedupe (tenant_id, event_id, first_seen_at)
    SELECT 'seed-tenant', gen_random_uuid(), now() - interval '100 hours' + g * interval '1 ms'
      FROM generate_series(1, %s) AS g
"""
SEED_DONE = """
    INSERT INTO dramatiq.queue (message_id, queue_name, state, mtime, message)
    SELECT gen_random_uuid(), 'ingest', 'done', now() - interval '1 hour' + g * interval '1 ms',
           jsonb_build_object('queue_name', 'ingest', 'actor_name', 'ingest_batch', 'args', '[]',
                              'kwargs', '{}', 'options', '{}', 'message_id', gen_random_uuid(),
                              'message_timestamp', 0, 'padding', repeat('x', 200))
      FROM generate_series(1, %s) AS g
"""
# Latency of telemetry published in [t0, t1) (occurred_at is the publish time).
LATENCY_BETWEEN = """
    SELECT count(*) / 2,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM ingested_at - occurred_at)),
           percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM ingested_at - occurred_at))
      FROM telemetry_raw
     WHERE occurred_at >= to_timestamp(%s) AND occurred_at < to_timestamp(%s)
"""
# Longest current lock wait of backends connected from the given client ports, and on what.
LOCK_WAITS = """
    SELECT extract(epoch FROM clock_timestamp() - l.waitstart),
           l.locktype || coalesce(' ' || CAST(l.relation AS regclass)::text, '')
      FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE NOT l.granted AND a.datname = %s AND a.client_port = ANY(%s)
     ORDER BY 1 DESC LIMIT 1
"""
QUEUE_SIZE = """
    SELECT pg_total_relation_size('dramatiq.queue'), count(*),
           count(*) FILTER (WHERE state = 'done') FROM dramatiq.queue
"""


class LockWaitSampler(threading.Thread):
    """Longest lock wait seen by the backends of the given processes (by their client ports), per phase."""

    def __init__(self, url: str, db_name: str, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.db, self.db_name, self.pids = Db(url), db_name, pids
        self.phase = "warm-up"
        self.longest: dict[str, tuple[float, str]] = {}
        self.samples = 0
        self._halt = threading.Event()

    def ports(self) -> list[int]:
        found = []
        for pid in self.pids:
            for proc in tree(pid):
                try:
                    found += [c.laddr.port for c in proc.net_connections("tcp") if c.raddr]
                except psutil.Error:
                    pass
        return found

    def run(self) -> None:
        ports, listed = [], 0.0
        while not self._halt.is_set():
            if time.monotonic() - listed > 1.0:
                ports, listed = self.ports(), time.monotonic()
            row = self.db.all(LOCK_WAITS, (self.db_name, ports))
            if row and float(row[0][0]) > self.longest.get(self.phase, (0.0, ""))[0]:
                self.longest[self.phase] = (float(row[0][0]), row[0][1])
            self.samples += 1
            self._halt.wait(LOCK_SAMPLE_SECONDS)

    def worst(self, phase: str) -> str:
        seconds, what = self.longest.get(phase, (0.0, ""))
        return f"{seconds * 1000:,.0f} ms" + (f" ({what})" if what else "")

    def stop(self) -> None:
        if not self._halt.is_set():
            self._halt.set()
            self.join(5)
            self.db.close()


def run_retention_bench(settings: Settings, args: Any) -> int:
    bench = Bench(settings, args)
    failures: list[str] = []
    sampler: LockWaitSampler | None = None
    try:
        bench.setup()
        db = bench.db
        assert db is not None
        say(f"\n== seeding {args.seed_rows:,} expired ingress_dedupe rows and {args.seed_rows:,} done queue rows")
        t = time.monotonic()
        _execute(db, SEED_DEDUPE, args.seed_rows)
        _execute(db, SEED_DONE, args.seed_rows)
        _execute(db, "VACUUM ANALYZE", None)
        say(f"  seeded in {time.monotonic() - t:.1f}s; queue table {_size(db)}")

        total_seconds = args.warmup + args.cleanup_max + args.duration + 10
        plan = bench_mqtt.Plan(int(args.rate * total_seconds), args.devices, 0.0, args.publishers, seed=11)
        say(f"\n== ingest: {args.rate:,} msg/s offered ({args.devices} devices, {args.publishers} publishers)")
        procs = bench.start_pipeline()
        pubs = Publishers(bench.broker.port, plan, args.rate)
        bench.publishers.append(pubs)
        pubs.prepare()
        sampler = LockWaitSampler(bench.db_url, bench.db_name,
                                  [procs["bridge"].pid, procs["ingest worker"].pid])
        sampler.start()
        pubs.go()
        t_start = time.time()
        _wait(bench, args.warmup, "warm-up")

        say("\n== cleanup while ingest runs: jobs `dedupe` then `queue` (batches of 5,000)")
        from actors.retention import run_job
        sampler.phase = "cleanup"
        job_settings = settings.model_copy(update={"database_url": bench.db_url})
        t0 = time.time()
        reports = [run_job(job_settings, job, now=datetime.now(timezone.utc)) for job in ("dedupe", "queue")]
        t1 = time.time()
        sampler.phase = "maintenance worker"
        left = db.one("SELECT (SELECT count(*) FROM ingress_dedupe WHERE tenant_id = 'seed-tenant'),"
                      " (SELECT count(*) FROM dramatiq.queue WHERE state = 'done'"
                      "    AND mtime < now() - interval '50 minutes')")
        for r in reports:
            assert r is not None
            say(f"  {r.job}: {sum(r.rows.values()):,} rows in {r.seconds:.1f}s "
                f"({sum(r.rows.values()) / max(r.seconds, 1e-9):,.0f} rows/s)")
        say(f"  cleanup total        {t1 - t0:.1f}s; seeded rows left: dedupe {left[0]:,}, queue {left[1]:,}")
        say(f"  longest lock wait    {sampler.worst('cleanup')} (bridge and ingest worker backends; "
            f"warm-up: {sampler.worst('warm-up')})")
        if any(left):
            failures.append("the cleanup left seeded expired rows behind")
        worker = "off (control run)" if args.no_maintenance else "on"
        say(f"\n== maintenance worker {worker}, {args.duration:.0f}s: queue table size")
        maintenance = None
        if not args.no_maintenance:
            maintenance = bench.start_child("maintenance", edge_command("worker", "--queues", "maintenance"))
            maintenance.wait_for_log("Worker process is ready for action")
        sizes, marks = [], []
        t_phase = time.monotonic()
        while True:
            size, rows, done = db.one(QUEUE_SIZE)
            sizes.append(size)
            marks.append(time.time())
            say(f"  {time.monotonic() - t_phase:6.0f}s  dramatiq.queue {size:>13,} bytes, {rows:,} rows "
                f"({done:,} done)")
            if time.monotonic() - t_phase >= args.duration:
                break
            _wait(bench, min(SIZE_EVERY_SECONDS, args.duration - (time.monotonic() - t_phase)), None)
        t_end = time.time()
        _wait(bench, SETTLE_SECONDS, None)  # what was published last is committed by now
        say("\n== results")
        say(f"  cleanup              dedupe + queue, {2 * args.seed_rows:,} rows in {t1 - t0:.1f}s; "
            f"longest lock wait seen by ingest {sampler.worst('cleanup')}")
        base = db.one(LATENCY_BETWEEN, (t_start + 2, t0))
        during = db.one(LATENCY_BETWEEN, (t0, t1))
        say(f"  ingest before        {base[0] / max(t0 - t_start - 2, 1e-9):,.0f} msg/s, publish→commit "
            f"p50 {_ms(base[1])}, p99 {_ms(base[2])} (warm-up)")
        say(f"  ingest during        {during[0] / max(t1 - t0, 1e-9):,.0f} msg/s, publish→commit "
            f"p50 {_ms(during[1])}, p99 {_ms(during[2])} (cleanup)")
        if during[0] < 0.9 * args.rate * (t1 - t0):
            failures.append(f"ingest fell below 90% of {args.rate:,} msg/s during the cleanup")
        phase = db.one(LATENCY_BETWEEN, (t_end - args.duration, t_end))
        say(f"  ingest maintenance   {phase[0] / max(args.duration, 1e-9):,.0f} msg/s, p50 {_ms(phase[1])}, "
            f"p99 {_ms(phase[2])} ({args.duration:.0f}s, maintenance worker {worker})")
        sampler.stop()
        say(f"  lock waits           longest seen by ingest: warm-up {sampler.worst('warm-up')}, cleanup "
            f"{sampler.worst('cleanup')}, maintenance worker {sampler.worst('maintenance worker')} "
            f"({sampler.samples:,} samples every {LOCK_SAMPLE_SECONDS * 1000:.0f} ms)")
        say(f"  queue table          start {sizes[0]:,} bytes, end {sizes[-1]:,} bytes, "
            f"peak {max(sizes):,} bytes")
        slow = [(a, b, db.one(LATENCY_BETWEEN, (a, b))[2]) for a, b in zip(marks, marks[1:])]
        slow = [(a, p99) for a, _, p99 in slow if p99 is not None and p99 > SLOW_P99_SECONDS]
        say(f"  windows with p99 > {SLOW_P99_SECONDS:.0f}s: " + (", ".join(
            f"{a - marks[0]:.0f}s ({_ms(p99)})" for a, p99 in slow) if slow else "none"))
        if maintenance is not None:
            runs = []
            for line in maintenance.log().splitlines():
                m = RUN_LINE.search(line)
                if m:
                    at = datetime.strptime(m["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    runs.append(f"{at - marks[0]:.0f}s {m['job']} ({float(m['seconds']):.1f}s)")
            say("  maintenance runs     " + (", ".join(runs) or "none"))
    except KeyboardInterrupt:
        say("\ninterrupted: stopping everything the benchmark started")
        return EXIT_FAILURE
    except NotReady as exc:
        say(f"\nFAIL: {exc}")
        return EXIT_FAILURE
    finally:
        if sampler is not None:
            sampler.stop()
        bench.teardown()
    if failures:
        say("\nFAIL: " + "; ".join(failures))
        return EXIT_FAILURE
    say("\nPASS")
    return EXIT_OK


def _execute(db: Db, sql: str, n: int | None) -> None:
    with db.conn.cursor() as cur:
        cur.execute(sql, (n,) if n is not None else None)


def _wait(bench: Bench, seconds: float, label: str | None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for child in bench.children:
            if not child.alive():
                raise BenchError(f"{child.name} exited; last log lines:\n"
                                 + "\n".join(child.log().splitlines()[-15:]))
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    if label:
        say(f"  {label}: {seconds:.0f}s")


def _size(db: Db) -> str:
    return f"{db.one(QUEUE_SIZE)[0]:,} bytes"


def _ms(seconds: Any) -> str:
    return f"{float(seconds or 0) * 1000:,.0f} ms"
