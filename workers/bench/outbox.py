"""`farmiq-edge bench outbox`: drain an offline backlog to the cloud, then catch up after an outage.

Everything is its own and temporary, as in `bench ingest`: a scratch database
on EDGE_DATABASE_URL's server (embedded if none answers), the reference cloud
sink (`farmiq-edge cloud-sink`, its SQLite file in a temp folder) and the real
processes an operator runs: `farmiq-edge worker --queues outbox` (the
forwarder) and `scheduler`. Other EDGE_* variables pass through to them
(EDGE_OUTBOX_CONCURRENCY, EDGE_OUTBOX_BATCH_MAX_EVENTS, …).

1. Drain: --events pending events (default 1,000,000, about a week offline
   for 200 devices) are
   written straight into sync_outbox (1-minute aggregates, one tenant), then
   the forwarder starts. Figures:
   events/s, time to empty, forwarder RSS (start, quartiles, peak: flat means
   memory does not grow with the backlog), CPU per component.
2. Catch-up: the sink goes down (nothing listens), --catch-up-events new
   events arrive, the forwarder fails and backs off for --outage-seconds; the
   sink comes back. Figure: seconds from "up" to the first ack recorded at the
   edge (sync_state.last_acked_at), and how long the backoff alone would
   still have paused the tenant.
3. Correctness: every event acked at the edge and stored once at the sink,
   no device's events out of order. FAIL (exit 1) on any mismatch.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from models.settings import Settings
from workers.bench.ingest import (EXIT_FAILURE, EXIT_USAGE, Bench, BenchError, CpuMeter,
                                  RssSampler, _mb, _redact, say)
from workers.dev.embedded import free_port
from workers.dev.processes import NotReady, edge_command

FILL_CHUNK = 100_000
TENANT = "bench-tenant"
STALL_SECONDS = 60.0
BACKOFF_LEFT_SECONDS = 5.0
BENCH_TOKEN = "bench-token"

# 1-minute aggregates, occurred_at one minute apart per device; ids are UUIDv7-shaped
# (time first, as models.ids.new_id makes them), so index inserts stay local as in production.
FILL = """
    INSERT INTO sync_outbox (id, tenant_id, farm_id, barn_id, device_id, event_type, occurred_at,
                             payload_json, created_at)
    SELECT (lpad(to_hex((extract(epoch FROM %(start)s::timestamptz + (i / %(devices)s) * interval '1 minute')
                         * 1000)::bigint), 12, '0')
            || '7' || substr(md5(i::text), 1, 3) || '8' || substr(md5(i::text), 4, 15))::uuid, %(tenant)s, 'farm-1', 'barn-1', 'device-' || lpad((i %% %(devices)s)::text, 4, '0'),
           'telemetry.aggregated', %(start)s::timestamptz + (i / %(devices)s) * interval '1 minute',
           jsonb_build_object('window', '1m', 'metric_type', 'temperature',
                              'bucket_start_at', %(start)s::timestamptz + (i / %(devices)s) * interval '1 minute',
                              'bucket_end_at', %(start)s::timestamptz + (i / %(devices)s + 1) * interval '1 minute',
                              'count', 60, 'avg_value', 21.5 + (i %% 7), 'min_value', 20.0, 'max_value', 24.0),
           now() - interval '7 days'
      FROM generate_series(%(first)s, %(last)s) AS i
"""
# Anything not yet acked? Two index probes (the monitor sets enable_seqscan off:
# a count over the backlog would cost PostgreSQL more than the forwarder does).
UNFINISHED = """
    SELECT EXISTS (SELECT 1 FROM sync_outbox WHERE status = 'pending')
        OR EXISTS (SELECT 1 FROM sync_outbox WHERE status IN ('claimed', 'sent'))
"""


class OutboxBench(Bench):
    def setup(self) -> None:
        self.setup_database()
        self._execute("SET enable_seqscan = off", {})
        self.sink_port, self.sink_admin = free_port(), free_port()
        self.env = {"EDGE_DATABASE_URL": self.db_url, "EDGE_METRICS_PORT": "0",
                    "EDGE_CLOUD_URL": f"http://127.0.0.1:{self.sink_port}", "EDGE_CLOUD_TOKEN": BENCH_TOKEN}
        version, sync_commit = self.db.one("SELECT current_setting('server_version'), "
                                           "current_setting('synchronous_commit')")
        s = self.settings
        say(f"database   PostgreSQL {version} at {_redact(self.admin_url)}, scratch database "
            f"{self.db_name} (synchronous_commit={sync_commit})")
        say(f"forwarder  batches of ≤{s.outbox_batch_max_events} events / {s.outbox_batch_max_bytes:,} bytes, "
            f"{s.outbox_concurrency} in flight, worker threads {s.worker_threads}; logs in {self.tmp}")

    def fill(self, first: int, last: int) -> None:
        assert self.db is not None
        start = "2026-11-20T00:00:00Z"
        for lo in range(first, last + 1, FILL_CHUNK):
            hi = min(last, lo + FILL_CHUNK - 1)
            self._execute(FILL, {"tenant": TENANT, "devices": self.args.devices, "start": start,
                                 "first": lo, "last": hi})
            say(f"  filled {hi - first + 1:>9,}/{last - first + 1:,}")

    def _execute(self, sql: str, params: dict[str, Any]) -> None:
        assert self.db is not None
        with self.db.conn.cursor() as cur:
            cur.execute(sql, params)

    def sink(self, name: str = "cloud-sink") -> None:
        sink = self.start_child(name, edge_command(
            "cloud-sink", "--port", str(self.sink_port), "--admin-port", str(self.sink_admin),
            "--db", str(self.tmp / "cloud-sink.sqlite3"), "--token", BENCH_TOKEN))
        sink.wait_for_log("event=sink_started")

    def sink_admin_call(self, path: str, method: str = "POST") -> dict[str, Any]:
        import json
        import urllib.request
        request = urllib.request.Request(f"http://127.0.0.1:{self.sink_admin}{path}", method=method,
                                         data=b"{}" if method == "POST" else None,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def unfinished(self) -> bool:
        assert self.db is not None
        return bool(self.db.one(UNFINISHED)[0])

    def watch_drain(self, expected: int, sampler: RssSampler) -> tuple[float, list[int]]:
        """Until nothing is pending or claimed; returns (seconds, forwarder RSS at 0/25/50/75/100%).

        Progress is the sink's count of events stored (from its memory); the end is
        confirmed at the edge: nothing pending, claimed or sent.
        """
        started = time.monotonic()
        marks, rss = [0.25, 0.5, 0.75], [sampler.last["forwarder"]]
        last_left, last_change, last_print = expected, started, 0.0
        while True:
            for child in self.children:
                if not child.alive():
                    raise BenchError(f"{child.name} exited during the run; last log lines:\n"
                                     + "\n".join(child.log().splitlines()[-15:]))
            done = min(expected, int(self.sink_admin_call("/admin/counters", "GET")["stored"]))
            left = expected - done if done < expected else int(self.unfinished())
            now = time.monotonic()
            while marks and done >= marks[0] * expected:
                marks.pop(0)
                rss.append(sampler.last["forwarder"])
            if left != last_left:
                last_left, last_change = left, now
            if now - last_print >= 1.0 or left == 0:
                last_print = now
                say(f"  {now - started:6.1f}s  at the sink {done:>9,}/{expected:,}  "
                    f"{done / max(1e-9, now - started):>8,.0f} events/s  "
                    f"forwarder RSS {_mb(sampler.last['forwarder'])}")
            if left == 0:
                rss.append(sampler.last["forwarder"])
                return now - started, rss
            if now - last_change > STALL_SECONDS:
                raise BenchError(f"the drain stalled at {left:,} events left")
            time.sleep(0.25)

    def catch_up(self) -> tuple[float, float]:
        """Sink down, new events, outage; sink up. Returns (first ack after up, backoff left then)."""
        assert self.db is not None
        a = self.args
        say("")
        say(f"== catch-up: sink down, {a.catch_up_events:,} new events, {a.outage_seconds:.0f} s outage, sink up")
        self.sink_admin_call("/admin/down")
        n = a.events
        self.fill(n + 1, n + a.catch_up_events)
        time.sleep(a.outage_seconds)
        # Then the moment the backoff still has a while to run (≥ BACKOFF_LEFT_SECONDS),
        # so the figure shows the probe, not the end of a backoff.
        deadline = time.monotonic() + 60
        while True:
            failures, paused_for = self.db.one(
                "SELECT consecutive_failures, greatest(0, extract(epoch FROM paused_until - now()))::float "
                "FROM sync_state WHERE tenant_id = %s", (TENANT,))
            if (paused_for or 0) >= BACKOFF_LEFT_SECONDS or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        say(f"  during the outage: consecutive_failures {failures}, backoff still pausing the tenant "
            f"for {paused_for or 0:.1f} s")
        up_at = float(self.sink_admin_call("/admin/up")["up_at"])
        while True:
            acked_at = self.db.one("SELECT extract(epoch FROM last_acked_at)::float FROM sync_state "
                                   "WHERE tenant_id = %s", (TENANT,))[0]
            if acked_at is not None and acked_at > up_at:
                break
            if time.time() - up_at > 60:
                raise BenchError("no ack within 60 s of the sink coming back")
            time.sleep(0.02)
        delay = acked_at - up_at
        say(f"  first ack {delay:.2f} s after the sink came back (the backoff alone: {paused_for or 0:.1f} s)")
        while self.unfinished():
            time.sleep(0.5)
        return delay, float(paused_for or 0)

    def check(self, total: int) -> None:  # type: ignore[override]
        import sqlite3
        assert self.db is not None
        acked, not_acked = self.db.one("SELECT count(*) FILTER (WHERE status = 'acked'), "
                                       "count(*) FILTER (WHERE status <> 'acked') FROM sync_outbox")
        sink = sqlite3.connect(f"file:{self.tmp / 'cloud-sink.sqlite3'}?mode=ro", uri=True)
        try:
            stored, late = sink.execute("SELECT count(*), coalesce(sum(out_of_order), 0) FROM events").fetchone()
        finally:
            sink.close()
        checks = [("events acked at the edge", acked, total), ("events not acked at the edge", not_acked, 0),
                  ("events stored at the sink (by event id)", stored, total),
                  ("events out of their device's order at the sink", late, 0)]
        say("  correctness:")
        for what, got, want in checks:
            ok = got == want
            say(f"    {'ok  ' if ok else 'FAIL'} {what}: {got:,}" + ("" if ok else f" (expected {want:,})"))
            if not ok:
                self.failures.append(f"{what}: {got:,}, expected {want:,}")


def run_outbox_bench(settings: Settings, args: Any) -> int:
    problems = [text for bad, text in (
        (args.events < 1, "--events must be ≥ 1"), (args.devices < 1, "--devices must be ≥ 1"),
        (args.catch_up_events < 1, "--catch-up-events must be ≥ 1"),
        (args.outage_seconds < 0, "--outage-seconds must be ≥ 0")) if bad]
    if problems:
        say("farmiq-edge bench outbox: " + "; ".join(problems))
        return EXIT_USAGE

    def on_sigterm(*_: object) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    bench = OutboxBench(settings, args)
    try:
        bench.setup()
        say("")
        say(f"== drain: {args.events:,} pending events of {args.devices} devices (one tenant)")
        t0 = time.monotonic()
        bench.fill(1, args.events)
        bench._execute("VACUUM ANALYZE sync_outbox", {})
        say(f"  backlog written in {time.monotonic() - t0:.1f} s")
        bench.sink()
        forwarder = bench.start_child("forwarder", edge_command("worker", "--queues", "outbox"))
        forwarder.wait_for_log("Worker process is ready for action")
        sampler = RssSampler({"forwarder": forwarder.pid, "cloud-sink": bench.children[0].pid})
        sampler.start()
        time.sleep(0.5)  # a first RSS sample before any work
        bench.warn_if_busy()
        cpu = CpuMeter({"forwarder": [forwarder.pid], "cloud-sink": [bench.children[0].pid]},
                       alone={}, pg_processes=bench.pg_processes)
        cpu.start()
        scheduler = bench.start_child("scheduler", edge_command("scheduler"))
        seconds, rss = bench.watch_drain(args.events, sampler)
        cpu.stop()
        rate = args.events / seconds
        delay, backoff_left = bench.catch_up()
        sampler.stop()
        scheduler.stop()
        say("")
        say("== figures")
        say(f"  drain: {args.events:,} events in {seconds:.1f} s = {rate:,.0f} events/s "
            f"(time to empty, scheduler start → nothing pending or claimed)")
        say("  forwarder RSS at 0/25/50/75/100% of the drain: " + " / ".join(_mb(r) for r in rss)
            + f"; peak {_mb(sampler.peak['forwarder'])} (cloud sink peak {_mb(sampler.peak['cloud-sink'])})")
        say(f"  catch-up: first ack {delay:.2f} s after the sink came back "
            f"(backoff alone would have waited {backoff_left:.1f} s more)")
        for line in cpu.lines():
            say(line)
        bench.check(args.events + args.catch_up_events)
    except KeyboardInterrupt:
        say("\ninterrupted: stopping everything the benchmark started")
        return EXIT_FAILURE
    except NotReady as exc:
        say(f"\nFAIL: {exc}")
        return EXIT_FAILURE
    finally:
        bench.teardown()
        signal.signal(signal.SIGTERM, previous)
    return bench.verdict()
