"""`farmiq-edge bench ingest`: MQTT → PostgreSQL ingest throughput, latency, memory.

Everything is its own and temporary: a scratch database `farmiq_bench_<pid>`
on the server of EDGE_DATABASE_URL (embedded pgserver if that does not
answer), migrated and dropped at the end; a private Mosquitto with the
project's config (deploy/mosquitto/mosquitto.conf) on a free port (amqtt,
MQTT 3.1.1, if Mosquitto is not installed); and the real processes an operator
runs — `farmiq-edge bridge`, `worker --queues ingest`, `worker --queues
aggregate`, `scheduler` — as subprocesses. Other EDGE_* variables in the
environment (batch size, worker threads, …) pass through to them, so a
setting can be tried without editing anything.

Figures, all printed:
- sustained rate: unique events accepted / (first publish → last commit), and
  the publisher's own rate (workers/bench/mqtt.py);
- publish→commit latency p50/p99: telemetry_raw.ingested_at − occurred_at
  (occurred_at is stamped at publish time; ingested_at is now() of the ingest
  transaction, i.e. its start, so a figure is short by that transaction's
  duration — milliseconds; one clock, as everything runs on this machine);
- peak RSS of the bridge and ingest worker (whole process trees), sampled;
- aggregation lag: oldest telemetry_agg_pending row seen during the run, and
  last commit → pending empty;
- correctness: exact row counts, aggregates equal to GROUP BY over the raw
  rows; FAIL (exit 1) on any mismatch;
- references: (a) the naive pipeline (workers/bench/naive.py), bounded to
  NAIVE_MAX_MESSAGES / NAIVE_MAX_SECONDS, (b) bare MQTT with Mosquitto's C
  clients (`mosquitto_pub -l` processes → `mosquitto_sub`, the pipeline's
  messages, no database; the headline ratio), (c) bare MQTT with our
  publishers → a paho QoS 1 subscriber; and the ratios.
- CPU seconds per component during the run, to show where the machine's time
  went (the bottleneck), and CPU µs per MQTT message per component with the
  rate the machine's cores could carry at that cost.
- with --profile, py-spy on the bridge, ingest and aggregate worker processes for a
  few seconds mid-drain (workers/bench/profile.py): top frames per process.

Ctrl-C or SIGTERM stops every process it started and removes what it made.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg2

from models.settings import Settings
from schema.databases import create_database, database_answers, drop_database
from workers.bench import mqtt as bench_mqtt
from workers.dev.processes import ROOT, EdgeProcess, NotReady, edge_command

MOSQUITTO_CONFIG = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
POLL_SECONDS = 0.5             # database progress poll (also the lag sampling period)
PRINT_EVERY_SECONDS = 1.0
RSS_SAMPLE_SECONDS = 0.2
STALL_SECONDS = 60.0           # no new commit for this long: the pipeline is stuck, FAIL
SETTLE_TIMEOUT_SECONDS = 120.0
NAIVE_MAX_MESSAGES = 10_000
NAIVE_MAX_SECONDS = 60.0
BARE_TIMEOUT_SECONDS = 120.0
PROFILE_FROM = 0.10            # --profile starts once this share of the events is committed
PROFILE_SECONDS = 5.0
WINDOW_UNITS = {"1m": "minute", "1h": "hour", "1d": "day"}
from workers.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE


# --- child processes -----------------------------------------------------------

class BenchError(NotReady):
    """Setup failed or the pipeline got stuck; the message says what happened."""


# --- process-tree measurements -------------------------------------------------

def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class RssSampler(threading.Thread):
    """Peak RSS (sum over each process tree) of the named processes while it runs.

    Cheap on purpose (it shares the machine it measures): the trees are
    re-listed every TREE_REFRESH_SECONDS, the RSS of their members read every
    RSS_SAMPLE_SECONDS.
    """

    TREE_REFRESH_SECONDS = 2.0

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self.last = dict.fromkeys(pids, 0)
        self._halt = threading.Event()

    def run(self) -> None:
        trees: dict[str, list[psutil.Process]] = {}
        listed = 0.0
        while not self._halt.is_set():
            if time.monotonic() - listed > self.TREE_REFRESH_SECONDS:
                trees = {name: tree(pid) for name, pid in self.pids.items()}
                listed = time.monotonic()
            for name, procs in trees.items():
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                self.last[name] = total
                self.peak[name] = max(self.peak[name], total)
            self._halt.wait(RSS_SAMPLE_SECONDS)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


class CpuMeter:
    """CPU seconds used by each component between `start()` and `stop()`.

    PostgreSQL is counted by its processes serving the scratch database plus
    its background processes (WAL writer, checkpointer, …); sessions of other
    databases — someone else's work on a shared server — are left out, and
    show up, with the kernel's own time, as "other".
    """

    def __init__(self, groups: dict[str, list[int]], alone: dict[str, int],
                 pg_processes: Callable[[], dict[int, str]]) -> None:
        self.groups = groups              # name -> root pids (their trees are counted)
        self.alone = alone                # name -> a pid counted without its children
        self.pg_processes = pg_processes  # pid -> name, asked at start and at stop
        self.used: dict[str, float] = {}
        self.wall = 0.0
        self.busy = 0.0                   # core-seconds the whole machine was busy

    def _snapshot(self) -> tuple[dict[int, tuple[str, float]], Any, float]:
        members: list[tuple[str, int]] = [(name, p.pid) for name, roots in self.groups.items()
                                          for root in roots for p in tree(root)]
        members += [(name, pid) for name, pid in self.alone.items()]
        members += [(name, pid) for pid, name in self.pg_processes().items()]
        seen: dict[int, tuple[str, float]] = {}
        for name, pid in members:
            try:
                t = psutil.Process(pid).cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            seen.setdefault(pid, (name, t.user + t.system))
        return seen, psutil.cpu_times(), time.monotonic()

    def start(self) -> None:
        self._before = self._snapshot()

    def stop(self) -> None:
        after, cpu_after, t_after = self._snapshot()
        before, cpu_before, t_before = self._before
        used: dict[str, float] = {}
        for pid, (name, seconds) in after.items():
            used[name] = used.get(name, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
        self.used, self.wall = used, t_after - t_before
        self.busy = _busy(cpu_after) - _busy(cpu_before)

    def lines(self) -> list[str]:
        cores = psutil.cpu_count() or 1
        accounted = sum(self.used.values())
        out = [f"  CPU during the run ({self.wall:.1f} s × {cores} cores = {self.wall * cores:.1f} core-s; "
               f"machine busy {self.busy / max(1e-9, self.wall * cores):.0%}):"]
        for name, seconds in sorted(self.used.items(), key=lambda kv: -kv[1]):
            out.append(f"    {name:<28} {seconds:6.1f} core-s  ({seconds / self.wall:4.0%} of one core)")
        out.append(f"    {'other (kernel, other users)':<28} {max(0.0, self.busy - accounted):6.1f} core-s")
        return out

    def per_message(self, messages: float) -> tuple[list[tuple[str, float]], float]:
        """CPU µs per MQTT message of each pipeline component, largest first, and their total.

        The load generator (publishers) and the benchmark's monitor are not
        the pipeline and are left out; PostgreSQL's processes count as one.
        """
        us: dict[str, float] = {}
        for name, seconds in self.used.items():
            short = name.split(" (")[0]
            if short not in NOT_PIPELINE:
                us[short] = us.get(short, 0.0) + seconds * 1e6 / max(1.0, messages)
        parts = sorted(us.items(), key=lambda kv: -kv[1])
        return parts, sum(us.values())

    def per_message_line(self, messages: float) -> str:
        parts, total = self.per_message(messages)
        cores = psutil.cpu_count() or 1
        return ("CPU per message: " + ", ".join(f"{name} {us:,.0f} µs" for name, us in parts if us >= 0.5)
                + f"; total {total:,.0f} µs ({cores} cores → ceiling ≈ {ceiling(total, cores):,.0f} msg/s)")


NOT_PIPELINE = ("publishers", "bench")


def ceiling(us_per_message: float, cores: int) -> float:
    """Messages/s the machine could carry if the pipeline had every core to itself."""
    return cores * 1e6 / us_per_message if us_per_message > 0 else float("inf")


def _busy(t: Any) -> float:
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def machine_load(seconds: float = 1.0) -> float:
    """Share of the machine that was busy over `seconds` (0..1)."""
    before = psutil.cpu_times()
    time.sleep(seconds)
    after = psutil.cpu_times()
    total = sum(after) - sum(before)
    return (_busy(after) - _busy(before)) / total if total > 0 else 0.0


# --- database ------------------------------------------------------------------

class Db:
    """An autocommit connection for the monitor's queries."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg2.connect(url, application_name="farmiq-edge bench")
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute("SET TIME ZONE 'UTC'")

    def one(self, sql: str, params: tuple | dict = ()) -> tuple:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()

    def all(self, sql: str, params: tuple | dict = ()) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def close(self) -> None:
        self.conn.close()


PROGRESS = """
    SELECT (SELECT count(*) FROM ingress_dedupe),
           (SELECT count(*) FROM dramatiq.queue WHERE queue_name = %(q)s AND state IN ('queued', 'consumed')),
           (SELECT count(*) FROM telemetry_agg_pending),
           (SELECT coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)
              FROM telemetry_agg_pending)
"""
LATENCY = """
    SELECT count(*),
           percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM ingested_at - occurred_at)),
           percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM ingested_at - occurred_at)),
           max(extract(epoch FROM ingested_at - occurred_at)),
           extract(epoch FROM max(ingested_at))
      FROM telemetry_raw
"""
# Aggregate rows of `window` that differ from GROUP BY over telemetry_raw (or are missing / extra).
AGG_MISMATCH = """
    WITH expected AS (
        SELECT tenant_id, device_id, metric_type, date_trunc(%(unit)s, occurred_at) AS bucket,
               count(*) AS n, sum(metric_value) AS s, min(metric_value) AS lo, max(metric_value) AS hi
          FROM telemetry_raw GROUP BY 1, 2, 3, 4),
    actual AS (SELECT * FROM telemetry_agg WHERE "window" = %(window)s)
    SELECT count(*) FROM expected e FULL JOIN actual a
        ON (a.tenant_id, a.device_id, a.metric_type, a.bucket_start_at)
         = (e.tenant_id, e.device_id, e.metric_type, e.bucket)
     WHERE e.n IS NULL OR a.count IS NULL OR a.count <> e.n
        OR abs(a.sum_value - e.s) > 1e-9 * greatest(1, abs(e.s))
        OR a.min_value <> e.lo OR a.max_value <> e.hi
"""


# --- MQTT sessions ---------------------------------------------------------------

def prepare_session(mqtt_url: str, client_id: str, protocol: str, expiry: int) -> None:
    """Create `client_id`'s persistent session with the bridge's subscription.

    Messages published before the subscriber's own first connect are then
    queued for it instead of being dropped (nobody subscribed yet).
    """
    _session(mqtt_url, client_id, protocol, expiry, subscribe=True)


def clear_session(mqtt_url: str, client_id: str, protocol: str) -> None:
    """Remove `client_id`'s session, so the broker stops queueing for it."""
    _session(mqtt_url, client_id, protocol, 0, subscribe=False)


def _session(mqtt_url: str, client_id: str, protocol: str, expiry: int, *, subscribe: bool) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from workers.bridge import TOPIC_FILTER  # the bridge's own subscription, exactly

    v5 = protocol == "5"
    url = urlsplit(mqtt_url)
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                         # 3.1.1: a clean session ends with the connection.
                         clean_session=None if v5 else not subscribe)

    def on_connect(c, userdata, flags, reason_code, properties):
        if subscribe:
            c.subscribe(TOPIC_FILTER, qos=1)
        else:
            done.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *a: done.set()
    kwargs: dict = {}
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = expiry
        kwargs = {"clean_start": True, "properties": props}
    client.connect(url.hostname or "127.0.0.1", url.port or 1883, keepalive=30, **kwargs)
    client.loop_start()
    try:
        if not done.wait(20):
            raise BenchError(f"MQTT session setup for {client_id} timed out")
    finally:
        client.disconnect()
        client.loop_stop()


# --- publishers ------------------------------------------------------------------

@dataclass
class PublishResult:
    total: int
    t_first: float
    t_last: float
    t_acked: float
    acked: int

    @property
    def rate(self) -> float:
        return self.total / max(1e-9, self.t_last - self.t_first)

    @property
    def acked_rate(self) -> float:
        return self.acked / max(1e-9, self.t_acked - self.t_first)


class Publishers:
    """`n` publisher processes (spawned: nothing of ours crosses a fork)."""

    def __init__(self, port: int, plan: bench_mqtt.Plan, rate: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.plan = plan
        self.results = ctx.Queue()
        self.start_event = ctx.Event()
        self.release_event = ctx.Event()  # publishers disconnect when it is set
        self.progress = [ctx.Value("q", 0, lock=False) for _ in range(plan.publishers)]
        self.procs = [ctx.Process(target=bench_mqtt.publish, daemon=True, name=f"bench-publisher-{p}",
                                  args=("127.0.0.1", port, plan, p, rate / plan.publishers,
                                        self.start_event, self.release_event, self.progress[p],
                                        self.results))
                      for p in range(plan.publishers)]
        self.done: list[dict] = []

    def prepare(self) -> None:
        """Start the processes; return once each has encoded its packets and connected."""
        for proc in self.procs:
            proc.start()
        for _ in self.procs:
            self._get("ready")

    def go(self) -> None:
        self.start_event.set()

    def sent(self) -> int:
        return sum(v.value for v in self.progress)

    def poll(self) -> None:
        while len(self.done) < len(self.procs) and not self.results.empty():
            self.done.append(self._get("done")[2])
        if len(self.done) < len(self.procs) and any(p.exitcode not in (None, 0) for p in self.procs):
            raise BenchError("a publisher process died (see its traceback above)")

    def finished(self) -> bool:
        self.poll()
        return len(self.done) == len(self.procs)

    def result(self) -> PublishResult:
        while not self.finished():
            time.sleep(0.05)
        return PublishResult(total=sum(d["sent"] for d in self.done),
                             t_first=min(d["t_first"] for d in self.done),
                             t_last=max(d["t_last"] for d in self.done),
                             t_acked=max(d["t_acked"] for d in self.done),
                             acked=sum(d["acked"] for d in self.done))

    def _get(self, kind: str) -> tuple:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                item = self.results.get(timeout=0.5)
            except Exception:  # queue.Empty
                if not all(p.is_alive() or p.exitcode == 0 for p in self.procs):
                    raise BenchError("a publisher process died") from None
                continue
            if item[0] != kind:
                raise BenchError(f"publisher protocol: expected {kind}, got {item[0]}")
            return item
        raise BenchError(f"publishers: no {kind!r} within 120 s")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def stop(self) -> None:
        self.release_event.set()
        started = [p for p in self.procs if p.pid is not None]
        for p in started:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)


# --- one benchmark run -------------------------------------------------------------

@dataclass
class Phase:
    """What a drain of `expected` events into the database measured."""

    expected: int
    published: PublishResult | None = None
    committed: int = 0
    complete: bool = False
    t_last_commit: float = 0.0
    max_pending_age: float = 0.0
    pending_empty_after: float | None = None
    latency: dict[str, float] = field(default_factory=dict)

    @property
    def elapsed(self) -> float:
        assert self.published is not None
        return max(1e-9, self.t_last_commit - self.published.t_first)

    @property
    def events_per_second(self) -> float:
        return self.committed / self.elapsed

    @property
    def mqtt_messages(self) -> float:
        """MQTT messages (duplicates included) behind the committed events."""
        assert self.published is not None
        return self.published.total * self.committed / self.expected

    @property
    def mqtt_per_second(self) -> float:
        return self.mqtt_messages / self.elapsed


class Bench:
    def __init__(self, settings: Settings, args: Any) -> None:
        self.settings, self.args = settings, args
        self.tmp = Path(tempfile.mkdtemp(prefix="farmiq-bench-"))
        self.children: list[EdgeProcess] = []
        self.publishers: list[Publishers] = []
        self.services: list[Any] = []
        self.admin_url = ""
        self.db_name = f"farmiq_bench_{os.getpid()}"
        self.db_url = ""
        self.db: Db | None = None
        self.broker: Any = None
        self.protocol = "5"
        self.env: dict[str, str] = {}
        self.failures: list[str] = []
        self.aggregation: list[EdgeProcess] = []
        self.profiler: Any = None         # workers.bench.profile.Profiler with --profile
        self.profile_lines: list[str] = []

    # -- setup and teardown --------------------------------------------------

    def setup_database(self) -> None:
        """A migrated scratch database on EDGE_DATABASE_URL's server (embedded if none answers)."""
        from schema.migrate import migrate
        from workers.dev.embedded import start_postgres

        self.admin_url = self.settings.database_url
        if not database_answers(self.admin_url):
            say(f"no PostgreSQL answers at {_redact(self.admin_url)}; starting an embedded one (pgserver)")
            pg = start_postgres(self.tmp / "pgdata")
            self.services.append(pg)
            self.admin_url = pg.url
        self.db_url = create_database(self.admin_url, self.db_name)
        migrate(self.db_url)
        self.db = Db(self.db_url)

    def setup(self) -> None:
        from workers.dev.embedded import MOSQUITTO, start_mosquitto, start_mqtt

        self.setup_database()
        if MOSQUITTO.exists():
            self.broker = start_mosquitto(MOSQUITTO_CONFIG, self.tmp / "mosquitto")
            broker_name = f"Mosquitto ({MOSQUITTO}) with {MOSQUITTO_CONFIG.relative_to(ROOT)}"
        else:
            say(f"{MOSQUITTO} is missing: falling back to amqtt (MQTT 3.1.1 only, in memory, "
                "much slower than Mosquitto; figures are not comparable)")
            self.broker = start_mqtt()
            self.protocol = "3.1.1"
            broker_name = "amqtt (fallback)"
        self.services.append(self.broker)
        (self.tmp / "prom").mkdir()
        self.env = {"EDGE_DATABASE_URL": self.db_url, "EDGE_MQTT_URL": self.broker.url,
                    "EDGE_MQTT_PROTOCOL": self.protocol, "EDGE_METRICS_PORT": "0",
                    "EDGE_MEDIA_ROOT": str(self.tmp / "media"),
                    "EDGE_BRIDGE_HEARTBEAT_PATH": str(self.tmp / "bridge.heartbeat"),
                    "dramatiq_prom_db": str(self.tmp / "prom")}
        version, sync_commit = self.db.one("SELECT current_setting('server_version'), "
                                           "current_setting('synchronous_commit')")
        s = self.settings
        say(f"database   PostgreSQL {version} at {_redact(self.admin_url)}, scratch database "
            f"{self.db_name} (synchronous_commit={sync_commit})")
        say(f"broker     {broker_name} at {self.broker.url}, bridge speaks MQTT {self.protocol}")
        say(f"pipeline   batches of ≤{s.batch_max_messages} msgs / {s.batch_max_ms} ms, "
            f"receive maximum {s.mqtt_receive_maximum}, worker threads {s.worker_threads}")
        say(f"machine    {psutil.cpu_count()} cores, {platform.python_implementation()} "
            f"{platform.python_version()}; logs in {self.tmp}")

    def start_child(self, name: str, argv: list[str], **env: str) -> EdgeProcess:
        child = EdgeProcess(name, argv, {**self.env, **env}, self.tmp / f"{name}.log").start()
        self.children.append(child)
        return child

    def stop_children(self, children: list[EdgeProcess]) -> None:
        for child in children:
            child.stop()
            if child in self.children:
                self.children.remove(child)

    def teardown(self) -> None:
        """Stop and remove everything, each step on its own: one failing skips none of the others."""
        steps: list[tuple[str, Callable[[], object]]] = [
            *(("publishers", pubs.stop) for pubs in self.publishers),
            *((child.name, child.stop) for child in reversed(self.children))]
        if self.db is not None:
            steps.append(("monitor connection", self.db.close))
        if self.db_url:
            steps.append((f"database {self.db_name}", lambda: drop_database(self.admin_url, self.db_name)))
        steps += [(type(service).__name__, service.stop) for service in reversed(self.services)]
        steps.append((str(self.tmp), lambda: shutil.rmtree(self.tmp, ignore_errors=True)))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # keep cleaning up; say what was left behind
                say(f"cleanup: could not stop/remove {what}: {exc}".strip())

    def verdict(self) -> int:
        """PASS (exit 0) or FAIL with what failed (exit 1), printed last."""
        if self.failures:
            say("\nFAIL: " + "; ".join(self.failures))
            return EXIT_FAILURE
        say("\nPASS")
        return EXIT_OK

    # -- the pipeline ----------------------------------------------------------

    def start_pipeline(self) -> dict[str, EdgeProcess]:
        client_id = f"farmiq-bench-bridge-{os.getpid()}"
        prepare_session(self.broker.url, client_id, self.protocol,
                        self.settings.mqtt_session_expiry_seconds)
        self.bridge_client_id = client_id
        procs = {
            "bridge": self.start_child("bridge", edge_command("bridge"), EDGE_MQTT_CLIENT_ID=client_id),
            "ingest worker": self.start_child("ingest", edge_command("worker", "--queues", "ingest")),
            "aggregate worker": self.start_child("aggregate",
                                                 edge_command("worker", "--queues", "aggregate")),
            "scheduler": self.start_child("scheduler", edge_command("scheduler")),
        }
        procs["bridge"].wait_for_log("event=mqtt_connected")
        procs["ingest worker"].wait_for_log("Worker process is ready for action")
        procs["aggregate worker"].wait_for_log("Worker process is ready for action")
        procs["scheduler"].wait_for_log("event=scheduler_started")
        return procs

    def run_pipeline(self) -> tuple[Phase, RssSampler, CpuMeter]:
        a = self.args
        plan = bench_mqtt.Plan(a.messages, a.devices, a.duplicates, a.publishers, seed=1)
        say("")
        say(f"== pipeline: {a.messages:,} telemetry messages from {a.devices} devices "
            f"(+{plan.total_published() - a.messages:,} duplicates = {plan.total_published():,} "
            f"MQTT messages, QoS 1), {a.publishers} publishers, "
            + (f"offered {a.rate:,} msg/s" if a.rate else "as fast as they go"))
        procs = self.start_pipeline()
        self.warn_if_busy()
        sampler = RssSampler({name: c.pid for name, c in procs.items() if "scheduler" not in name})
        pubs = Publishers(self.broker.port, plan, a.rate)
        self.publishers.append(pubs)
        pubs.prepare()
        groups = {name: [c.pid] for name, c in procs.items()}
        groups["mosquitto" if self.protocol == "5" else "amqtt"] = [self.broker.pid]
        groups["publishers"] = pubs.pids()
        cpu = CpuMeter(groups, alone={"bench (monitor)": os.getpid()}, pg_processes=self.pg_processes)
        profile_window = self.profile_window(procs, a.messages) if a.profile else None
        sampler.start()
        cpu.start()
        pubs.go()
        phase = self.drain(pubs, a.messages, queue="ingest", show_rss=sampler, on_progress=profile_window)
        cpu.stop()
        if self.profiler is not None and self.profiler.started:
            self.profile_lines = self.profiler.finish()
        pubs.stop()
        if phase.complete:
            self.settle_aggregation(phase)
        sampler.stop()
        phase.latency = self.latency()
        self.check(phase, plan)
        # Aggregation keeps running into the naive reference (it aggregates its rows too).
        self.stop_children([procs["bridge"], procs["ingest worker"]])
        self.aggregation = [procs["aggregate worker"], procs["scheduler"]]
        clear_session(self.broker.url, self.bridge_client_id, self.protocol)
        return phase, sampler, cpu

    def profile_window(self, procs: dict[str, EdgeProcess],
                       expected: int) -> Callable[[int, float], None] | None:
        """A drain callback: py-spy on the bridge and the workers' processes, mid-drain.

        It starts once PROFILE_FROM of the events are committed (past the
        start-up transient) and lasts PROFILE_SECONDS, or what the drain
        looks to have left.
        """
        from workers.bench import profile

        py_spy = profile.find_py_spy()
        if py_spy is None:
            say(f"  --profile: {profile.INSTALL_HINT}; running without it")
            return None
        self.profiler = profile.Profiler(py_spy, self.tmp)
        self.services.append(self.profiler)

        def maybe_start(committed: int, elapsed: float) -> None:
            if self.profiler is None or self.profiler.started or committed < expected * PROFILE_FROM:
                return
            left = elapsed * (expected - committed) / max(1, committed)
            # dramatiq's parent only supervises: its forked children run the actors
            # (and, with Prometheus, one serves /metrics: it shows up idle).
            targets = {"bridge": procs["bridge"].pid}
            for name in ("ingest worker", "aggregate worker"):
                workers = [p.pid for p in psutil.Process(procs[name].pid).children()]
                targets.update({name + (f" {n + 1}" if len(workers) > 1 else ""): pid
                                for n, pid in enumerate(workers)})
            self.profiler.start(targets, min(PROFILE_SECONDS, left))
            say(f"  profiling {', '.join(f'{k} [{v}]' for k, v in targets.items())} "
                f"for {self.profiler.seconds} s (py-spy, {profile.RATE}/s)")
        return maybe_start

    def drain(self, pubs: Publishers, expected: int, *, queue: str, show_rss: RssSampler | None = None,
              max_seconds: float | None = None,
              on_progress: Callable[[int, float], None] | None = None) -> Phase:
        """Watch until `expected` events are committed (or the time is up / it stalls)."""
        assert self.db is not None
        phase = Phase(expected)
        started = time.monotonic()
        last_print = 0.0
        last_change, last_committed = started, -1
        total = pubs.plan.total_published()
        while True:
            for child in self.children:
                if not child.alive():
                    raise BenchError(f"{child.name} exited during the run; last log lines:\n"
                                     + "\n".join(child.log().splitlines()[-15:]))
            committed, depth, pending, pending_age = self.db.one(PROGRESS, {"q": queue})
            now = time.monotonic()
            phase.max_pending_age = max(phase.max_pending_age, float(pending_age))
            if committed != last_committed:
                last_change, last_committed = now, committed
            done = committed >= expected
            if now - last_print >= PRINT_EVERY_SECONDS or done:
                last_print = now
                rss = ""
                if show_rss is not None:
                    rss = "  RSS " + " ".join(f"{k.split()[0]} {v / 2**20:.0f} MB"
                                              for k, v in show_rss.last.items())
                say(f"  {now - started:6.1f}s  published {pubs.sent():>9,}/{total:,}"
                    f"  committed {committed:>9,}/{expected:,}  {queue} queue {depth:>4}"
                    f"  agg pending {pending:>6,} rows (oldest {float(pending_age):4.1f}s){rss}")
            if done:
                break
            if on_progress is not None:
                on_progress(committed, now - started)
            if pubs.finished() and now - last_change > STALL_SECONDS:
                self.failures.append(f"{queue}: stalled at {committed:,}/{expected:,} committed events")
                break
            if max_seconds is not None and pubs.done and now - started > max_seconds:
                break
            time.sleep(POLL_SECONDS)
        phase.committed = committed
        phase.complete = committed >= expected
        phase.published = pubs.result()
        phase.t_last_commit = float(self.db.one(
            "SELECT coalesce(extract(epoch FROM max(ingested_at)), 0) FROM telemetry_raw")[0])
        return phase

    def settle_aggregation(self, phase: Phase) -> None:
        assert self.db is not None
        deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            pending, age, now = self.db.one(
                "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0),"
                "       extract(epoch FROM clock_timestamp()) FROM telemetry_agg_pending")
            phase.max_pending_age = max(phase.max_pending_age, float(age))
            if pending == 0:
                phase.pending_empty_after = max(0.0, float(now) - phase.t_last_commit)
                say(f"  aggregation caught up {phase.pending_empty_after:.1f}s after the last commit")
                return
            time.sleep(0.1)
        self.failures.append(f"aggregation: telemetry_agg_pending not empty {SETTLE_TIMEOUT_SECONDS:.0f}s "
                             "after the last commit")

    def latency(self) -> dict[str, float]:
        assert self.db is not None
        n, p50, p99, worst, _ = self.db.one(LATENCY)
        return {"rows": n, "p50": float(p50 or 0), "p99": float(p99 or 0), "max": float(worst or 0)}

    def check(self, phase: Phase, plan: bench_mqtt.Plan) -> None:
        assert self.db is not None and phase.published is not None
        unique = plan.messages
        raw, dedupe, dead, rejected, queued = self.db.one("""
            SELECT (SELECT count(*) FROM telemetry_raw), (SELECT count(*) FROM ingress_dedupe),
                   (SELECT count(*) FROM ingress_dead_letters),
                   (SELECT count(*) FROM dramatiq.queue WHERE state = 'rejected'),
                   (SELECT count(*) FROM dramatiq.queue WHERE queue_name = 'ingest'
                                                         AND state IN ('queued', 'consumed'))""")
        checks = [("MQTT messages acknowledged to the publishers", phase.published.acked,
                   plan.total_published()),
                  ("telemetry_raw rows (unique × 2 readings)", raw, unique * 2),
                  ("ingress_dedupe rows (unique events)", dedupe, unique),
                  ("ingress_dead_letters rows", dead, 0),
                  ("rejected queue messages", rejected, 0),
                  ("unfinished ingest queue messages", queued, 0)]
        if phase.pending_empty_after is not None:
            for window, unit in WINDOW_UNITS.items():
                total = self.db.one("SELECT coalesce(sum(count), 0) FROM telemetry_agg WHERE \"window\" = %s",
                                    (window,))[0]
                checks.append((f"telemetry_agg {window} counts summed (= raw rows)", total, raw))
                mismatched = self.db.one(AGG_MISMATCH, {"unit": unit, "window": window})[0]
                checks.append((f"telemetry_agg {window} rows differing from GROUP BY", mismatched, 0))
        say("  correctness:")
        for what, got, want in checks:
            ok = got == want
            say(f"    {'ok  ' if ok else 'FAIL'} {what}: {got:,}" + ("" if ok else f" (expected {want:,})"))
            if not ok:
                self.failures.append(f"{what}: {got:,}, expected {want:,}")

    def pg_processes(self) -> dict[int, str]:
        """PostgreSQL processes working for this benchmark: pid -> component name."""
        assert self.db is not None
        own = self.db.conn.get_backend_pid()
        found = {}
        for pid, datname, backend_type in self.db.all(
                "SELECT pid, datname, backend_type FROM pg_stat_activity"):
            if pid == own:
                found[pid] = "bench (monitor)"
            elif datname == self.db_name:
                found[pid] = "postgresql (bench database)"
            elif datname is None and backend_type != "client backend":
                found[pid] = "postgresql (WAL, background)"
        return found

    def warn_if_busy(self) -> None:
        """Say so when something else is using the machine: the figures would show it."""
        mine = {os.getpid(), *(p.pid for c in self.children for p in tree(c.pid))}
        procs = [p for p in psutil.process_iter(["name"]) if p.pid not in mine]
        for p in procs:
            try:
                p.cpu_percent(None)
            except psutil.Error:
                pass
        load = machine_load(1.0)
        if load < 0.15:
            return
        top = []
        for p in procs:
            try:
                top.append((p.cpu_percent(None), p.info["name"], p.pid))
            except psutil.Error:
                pass
        top.sort(reverse=True)
        say(f"  warning: the machine was {load:.0%} busy before the run started (" + ", ".join(
            f"{name} [{pid}] {pct:.0f}%" for pct, name, pid in top[:3]) + "); the figures will show it")

    def reset_tables(self) -> None:
        assert self.db is not None
        with self.db.conn.cursor() as cur:
            cur.execute("TRUNCATE telemetry_raw, ingress_dedupe, telemetry_agg_pending, telemetry_agg, "
                        "sync_outbox, ingress_dead_letters, dramatiq.queue")
            cur.execute("VACUUM ANALYZE")

    # -- references --------------------------------------------------------------

    def run_naive(self) -> Phase:
        a = self.args
        n = min(a.messages, NAIVE_MAX_MESSAGES)
        plan = bench_mqtt.Plan(n, a.devices, a.duplicates, a.publishers, seed=2)
        say("")
        say(f"== reference (a), naive pipeline: one queue message and one ingest transaction per MQTT "
            f"message; {n:,} messages (+{plan.total_published() - n:,} duplicates), measured for at most "
            f"{NAIVE_MAX_SECONDS:.0f}s")
        self.reset_tables()
        client_id = f"farmiq-bench-naive-{os.getpid()}"
        prepare_session(self.broker.url, client_id, self.protocol, self.settings.mqtt_session_expiry_seconds)
        worker = self.start_child("naive-worker", [sys.executable, "-m", "dramatiq", "workers.bench.naive",
                                                   "--queues", "bench_naive", "--processes", "1",
                                                   "--threads", str(self.settings.worker_threads)])
        sub = self.start_child("naive-subscriber", [sys.executable, "-m", "workers.bench.naive", "subscribe"],
                               EDGE_MQTT_CLIENT_ID=client_id)
        worker.wait_for_log("Worker process is ready for action")
        sub.wait_for_log("event=naive_subscriber_connected")
        pubs = Publishers(self.broker.port, plan, a.rate)
        self.publishers.append(pubs)
        pubs.prepare()
        pubs.go()
        phase = self.drain(pubs, n, queue="bench_naive", max_seconds=NAIVE_MAX_SECONDS)
        if not phase.complete:
            say(f"  stopped after {NAIVE_MAX_SECONDS:.0f}s with {phase.committed:,}/{n:,} events committed; "
                "rate measured over that window")
            phase.t_last_commit = float(self.db.one(  # type: ignore[union-attr]
                "SELECT coalesce(extract(epoch FROM max(ingested_at)), 0) FROM telemetry_raw")[0])
        self.stop_children([sub, worker, *self.aggregation])
        pubs.stop()
        clear_session(self.broker.url, client_id, self.protocol)
        phase.latency = self.latency()
        self.reset_tables()
        return phase

    def run_bare(self) -> tuple[int, float, PublishResult]:
        a = self.args
        plan = bench_mqtt.Plan(a.messages, a.devices, a.duplicates, a.publishers, seed=3)
        total = plan.total_published()
        say("")
        say(f"== reference (c), bare MQTT: the same publishers → one paho subscriber (QoS 1, no database), "
            f"{total:,} messages")
        ctx = multiprocessing.get_context("spawn")
        ready, results = ctx.Event(), ctx.Queue()
        sub = ctx.Process(target=bench_mqtt.count_messages, daemon=True, name="bench-bare-subscriber",
                          args=(self.broker.url, self.protocol, total, BARE_TIMEOUT_SECONDS, ready, results))
        sub.start()
        try:
            if not ready.wait(30):
                raise BenchError("bare-MQTT subscriber did not subscribe within 30 s")
            pubs = Publishers(self.broker.port, plan, a.rate)
            self.publishers.append(pubs)
            pubs.prepare()
            pubs.go()
            published = pubs.result()
            state = results.get(timeout=BARE_TIMEOUT_SECONDS + 10)[1]
            pubs.stop()
        finally:
            if sub.is_alive():
                sub.terminate()
            sub.join(5)
        received = state["n"]
        rate = received / max(1e-9, state["last"] - published.t_first)
        say(f"  received {received:,}/{total:,} in {state['last'] - published.t_first:.2f}s")
        if received != total:
            self.failures.append(f"bare MQTT: received {received:,} of {total:,}")
        return received, rate, published

    def run_bare_c(self) -> BareC | None:
        """Bare MQTT with Mosquitto's own C clients: the ceiling of MQTT alone on this machine.

        `mosquitto_pub -l -q 1` processes, each with its share of the
        pipeline's plan (same messages, same payload sizes) on stdin, one
        payload a line, to one device topic per process (-l publishes every
        line to one topic); one `mosquitto_sub -q 1` with a persistent session
        made before the publishers start, so nothing published before it
        connects is lost, exiting after exactly the expected count (-C).
        """
        a = self.args
        pub_bin, sub_bin = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
        say("")
        if pub_bin is None or sub_bin is None or self.protocol != "5":
            why = ("mosquitto_pub / mosquitto_sub are not installed (apt-get install mosquitto-clients)"
                   if self.protocol == "5" else "the broker is not Mosquitto")
            say(f"== reference (b), bare MQTT with C clients: skipped, {why}")
            return None
        plan = bench_mqtt.Plan(a.messages, a.devices, a.duplicates, a.c_publishers, seed=1)
        total = plan.total_published()
        say(f"== reference (b), bare MQTT with C clients: {a.c_publishers} × `mosquitto_pub -l -q 1` → "
            f"`mosquitto_sub -q 1`, the pipeline's {total:,} messages, no database")
        host = ["-h", "127.0.0.1", "-p", str(self.broker.port)]
        client_id = f"farmiq-bench-c-{os.getpid()}"
        session = ["-c", "-i", client_id, "-q", "1", "-t", "farmiq/#"]
        if subprocess.run([sub_bin, *host, *session, "-E"], timeout=30).returncode:  # subscribe, exit
            raise BenchError("mosquitto_sub could not create the bare reference's session")
        stdins = []
        for p in range(a.c_publishers):
            path = self.tmp / f"c-publisher-{p}.txt"
            path.write_bytes(bench_mqtt.payload_lines(plan, p))
            stdins.append(path)
        received = self.tmp / "c-subscriber.txt"
        with open(received, "wb") as out:
            sub = subprocess.Popen([sub_bin, *host, *session, "-C", str(total),
                                    "-W", str(int(BARE_TIMEOUT_SECONDS)), "-F", "%U"],
                                   stdout=out, stderr=subprocess.STDOUT)
        pubs: list[subprocess.Popen[bytes]] = []
        try:
            t_first = time.time()
            for p, path in enumerate(stdins):
                with open(path, "rb") as stdin:
                    pubs.append(subprocess.Popen([pub_bin, *host, "-q", "1", "-l",
                                                  "-t", bench_mqtt.device_topic(p)], stdin=stdin))
            sub.wait(BARE_TIMEOUT_SECONDS + 10)
            for pub in pubs:
                pub.wait(10)
        finally:
            for proc in (sub, *pubs):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            # A clean session in place of the persistent one: the broker stops queueing for it.
            subprocess.run([sub_bin, *host, "-i", client_id, "-t", "farmiq/#", "-E"], timeout=30)
        stamps = [float(line) for line in received.read_text().split() if line.replace(".", "").isdigit()]
        result = BareC(len(stamps), t_first, stamps[-1] if stamps else t_first)
        say(f"  received {result.received:,}/{total:,} in {result.elapsed:.2f}s "
            "(first publisher started → last message received)")
        if result.received != total:
            self.failures.append(f"bare MQTT (C clients): received {result.received:,} of {total:,}")
        return result


@dataclass
class BareC:
    received: int
    t_first: float  # the first publisher started (wall clock)
    t_last: float   # the subscriber printed the last message (wall clock)

    @property
    def elapsed(self) -> float:
        return max(1e-9, self.t_last - self.t_first)

    @property
    def rate(self) -> float:
        return self.received / self.elapsed


# --- report ------------------------------------------------------------------------

def say(text: str) -> None:
    print(text, flush=True)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    return urlunsplit(parts)


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


def report(bench: Bench, phase: Phase, sampler: RssSampler, cpu: CpuMeter, naive: Phase | None,
           bare_c: BareC | None, bare: tuple[int, float, PublishResult] | None) -> None:
    pub = phase.published
    assert pub is not None
    a = bench.args
    say("")
    say("== results")
    say(f"  publisher            {pub.total:,} MQTT messages written in {pub.t_last - pub.t_first:.2f}s "
        f"= {pub.rate:,.0f} msg/s (all PUBACKed after {pub.t_acked - pub.t_first:.2f}s "
        f"= {pub.acked_rate:,.0f} msg/s)")
    say(f"  sustained            {phase.events_per_second:,.0f} events/s  "
        f"({phase.committed:,} unique events, first publish → last commit {phase.elapsed:.2f}s; "
        f"{phase.mqtt_per_second:,.0f} MQTT msg/s incl. duplicates)")
    say("  " + cpu.per_message_line(phase.mqtt_messages))
    lat = phase.latency
    say(f"  publish→commit       p50 {lat['p50'] * 1000:,.0f} ms   p99 {lat['p99'] * 1000:,.0f} ms   "
        f"max {lat['max'] * 1000:,.0f} ms" + (f"   (offered {a.rate:,} msg/s)" if a.rate else
                                               "   (unpaced: includes the time queued in the broker)"))
    say("  peak RSS             " + ", ".join(f"{name} {_mb(v)}" for name, v in sampler.peak.items())
        + "  (process trees)")
    settled = (f"{phase.pending_empty_after:.1f}s" if phase.pending_empty_after is not None else "never")
    say(f"  aggregation lag      oldest pending bucket seen {phase.max_pending_age:.1f}s; "
        f"pending empty {settled} after the last commit")
    for line in cpu.lines():
        say(line)
    if naive is not None:
        assert naive.published is not None
        note = ("" if naive.complete
                else f" (incomplete: {naive.committed:,}/{naive.expected:,} in the window)")
        say(f"  (a) naive pipeline   {naive.events_per_second:,.0f} events/s over "
            f"{naive.committed:,} events, "
            f"{naive.elapsed:.1f}s{note}; p50 {naive.latency['p50']:.1f}s p99 {naive.latency['p99']:.1f}s")
        say(f"      pipeline / naive = {phase.events_per_second / max(1e-9, naive.events_per_second):.1f}×")
    if bare_c is not None:
        say(f"  (b) bare MQTT, C     {bare_c.rate:,.0f} msg/s ({bare_c.received:,} messages, "
            f"{a.c_publishers} mosquitto_pub → mosquitto_sub, QoS 1, no database)")
        say(f"      pipeline / bare C MQTT = {phase.mqtt_per_second / bare_c.rate:.2f} "
            "(MQTT messages/s, duplicates included)")
    if bare is not None:
        received, rate, _ = bare
        say(f"  (c) bare MQTT, paho  {rate:,.0f} msg/s ({received:,} messages, our publishers → "
            "paho QoS 1 subscriber, no database)")
        say(f"      pipeline / bare paho MQTT = {phase.mqtt_per_second / max(1e-9, rate):.2f}")
    for line in bench.profile_lines:
        say(line)


def run_bench(settings: Settings, args: Any) -> int:
    if getattr(args, "what", "ingest") != "ingest":
        print(f"farmiq-edge bench: unknown benchmark {args.what!r}", file=sys.stderr)
        return EXIT_USAGE
    problems = [text for bad, text in (
        (args.messages < 1, "--messages must be ≥ 1"), (args.devices < 1, "--devices must be ≥ 1"),
        (not 0 <= args.duplicates <= 1, "--duplicates must be within 0..1"),
        (args.rate < 0, "--rate must be ≥ 0"), (args.publishers < 1, "--publishers must be ≥ 1"),
        (args.publishers > args.devices, "--publishers must not exceed --devices"),
        (not 1 <= args.c_publishers <= args.devices, "--c-publishers must be within 1..--devices")) if bad]
    if problems:
        print("farmiq-edge bench ingest: " + "; ".join(problems), file=sys.stderr)
        return EXIT_USAGE

    def on_sigterm(*_: object) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    if not getattr(args, "verbose", False):
        for noisy in ("schema.migrate", "pgserver"):  # a line per migration / server command
            logging.getLogger(noisy).setLevel(logging.WARNING)
    bench = Bench(settings, args)
    try:
        bench.setup()
        phase, sampler, cpu = bench.run_pipeline()
        naive = bare_c = bare = None
        if not args.skip_references:
            naive = bench.run_naive()
            bare_c = bench.run_bare_c()
            bare = bench.run_bare()
        report(bench, phase, sampler, cpu, naive, bare_c, bare)
    except KeyboardInterrupt:
        say("\ninterrupted: stopping everything the benchmark started")
        return EXIT_FAILURE
    except NotReady as exc:  # BenchError included
        say(f"\nFAIL: {exc}")
        return EXIT_FAILURE
    finally:
        bench.teardown()
        signal.signal(signal.SIGTERM, previous)
    return bench.verdict()
