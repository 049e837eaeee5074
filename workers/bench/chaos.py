"""`farmiq-edge bench chaos`: the fault suite (issue 12 item 6).

Steady QoS 1 load (telemetry and weighing-session lifecycles) into a PRIVATE
Mosquitto running the project's config (deploy/mosquitto/mosquitto.conf) and
a PRIVATE PostgreSQL (pgserver, data directory under /tmp), through the real
processes an operator runs: `farmiq-edge bridge`, one `farmiq-edge worker
--queues Q` per queue in workers/cli.py QUEUES, and `farmiq-edge scheduler`.
The system PostgreSQL and Mosquitto are never touched.

Faults, on a schedule drawn from `--seed` and printed before the run, one at a
time, each followed by a restart as Kubernetes would do it:
- kill -9 of the bridge, of each worker type and of the scheduler (the whole
  process group: dramatiq's forked children die too);
- PostgreSQL stopped and started again on the same data directory;
- Mosquitto restarted CLEANLY (SIGTERM, it writes its persistence file). A
  kill -9 of Mosquitto loses what it acknowledged since its last autosave by
  design (README "broker durability"); that window is item 5's measurement,
  not a defect this suite should report.

Recovery time of a fault = from the fault until the data path made progress
again: for the ingest path (bridge, ingest worker, PostgreSQL, broker), the
first reading published after the fault committed; for the aggregate worker
and the scheduler, every partial aggregate pending at the fault merged; for
the maintenance worker, the worker ready again.

At the end the publisher re-sends what the broker never acknowledged (as a
device would), the pipeline drains, and everything is counted by event id:
every telemetry reading exactly once in telemetry_raw (each message carries a
`seq` reading whose value is its number), every session once in
weight_sessions and finalized, at most one outbox event per session event,
no telemetry.aggregated event written twice, aggregates equal to GROUP BY over
telemetry_raw, nothing dead-lettered or rejected. Any violation: exit 1.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import urllib.request

from workers.bench.ingest import AGG_MISMATCH, WINDOW_UNITS, Db, say
from workers.cli import QUEUES
from workers.dev.processes import EdgeProcess, NotReady, edge_command

log = logging.getLogger("farmiq_edge.chaos")
TENANT, FARM, BARN = "chaos-tenant", "chaos-farm", "chaos-barn"
DEVICES = 20
SCALES = 4
SESSION_EVERY_SECONDS = 1.0     # a session starts this often ...
SESSION_LENGTH_SECONDS = 2.0    # ... and is finalized this much later
PG_DOWN_SECONDS = 2.0           # PostgreSQL stays down this long
RESTART_DELAY_SECONDS = 1.0     # a killed process is started again after this (kubelet)
RECOVERY_TIMEOUT_SECONDS = 90.0
SETTLE_TIMEOUT_SECONDS = 180.0
FRAMES_PER_SECOND = 2.0         # camera frames, each in the session open at the time
SINK_FAULT_SECONDS = 8.0        # a cloud sink fault lasts this long
SINK_FAIL_RATE = 0.3            # share of batches answered 503 during the 5xx fault
READY = {"bridge": "event=mqtt_subscribed", "worker": "Worker process is ready for action",
         "scheduler": "event=scheduler_started", "cloud-sink": "event=sink_started"}
# What main has: frames once the media queue exists, the cloud sink once the outbox queue does.
MEDIA = "media" in QUEUES
CLOUD = "outbox" in QUEUES
SINK_TOKEN = "chaos-token"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def fault_kinds() -> list[str]:
    """One of each fault: a kill -9 per process type, then the two services."""
    return (["kill -9 bridge"] + [f"kill -9 worker {q}" for q in QUEUES]
            + ["kill -9 scheduler", "restart postgresql", "restart mosquitto (SIGTERM)"]
            + (["cloud sink down", f"cloud sink {SINK_FAIL_RATE:.0%} 5xx"] if CLOUD else []))


@dataclass
class Fault:
    kind: str
    planned: float                  # seconds after the load started
    at: float = 0.0                 # when it was injected (seconds after start)
    recovery: float | None = None   # seconds from the fault until progress again
    note: str = ""


def schedule(duration: float, seed: int) -> list[Fault]:
    """Faults spread over `duration` (first after a warm-up, last leaving time to drain).

    Every kind once per round, rounds until the duration is used, each round
    in an order drawn from `seed`; the same seed gives the same schedule.
    """
    rng = random.Random(seed)
    kinds = fault_kinds()
    warmup, tail = min(10.0, duration * 0.15), min(20.0, duration * 0.15)
    slots = max(len(kinds), int((duration - warmup - tail) // 12))  # ≥ 12 s apart on a full run
    order: list[str] = []
    while len(order) < slots:
        order += rng.sample(kinds, len(kinds))
    order = order[:slots]
    gap = (duration - warmup - tail) / len(order)
    return [Fault(kind, round(warmup + i * gap + rng.uniform(0, gap * 0.3), 1))
            for i, kind in enumerate(order)]


# --- payloads ----------------------------------------------------------------------

def _topic(device: str, kind: str) -> str:
    return f"farmiq/v1/{TENANT}/{FARM}/{BARN}/{device}/{kind}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def telemetry_message(seq: int) -> tuple[str, bytes]:
    readings = [{"metric_type": "seq", "metric_value": float(seq), "unit": "n"},
                {"metric_type": "temperature", "metric_value": round(20 + (seq * 37 % 1000) / 100, 2),
                 "unit": "C"}]
    return _topic(f"dev-{seq % DEVICES:02d}", "telemetry"), json.dumps(
        {"event_id": str(uuid.uuid4()), "occurred_at": _now(), "readings": readings}).encode()


def session_message(n: int, session_id: str, action: str) -> tuple[str, bytes]:
    weight = 1.8 if action == "start" else round(2.0 + (n % 50) / 100, 3)
    return _topic(f"scale-{n % SCALES}", "session"), json.dumps(
        {"event_id": str(uuid.uuid4()), "occurred_at": _now(), "session_id": session_id,
         "action": action, "batch_id": "chaos-batch", "weight_kg": weight}).encode()


def frame_message(session: int, image: bytes, session_id: str | None) -> tuple[tuple[str, bytes], str]:
    """A camera frame of session number `session`, from that session's device (media_id
    returned: the id its file and row are counted by)."""
    media_id = str(uuid.uuid4())
    body = {"event_id": str(uuid.uuid4()), "occurred_at": _now(), "captured_at": _now(),
            "mime_type": "image/jpeg", "media_id": media_id,
            "image_b64": base64.b64encode(image).decode()}
    if session_id is not None:
        body["session_id"] = session_id
    return (_topic(f"scale-{session % SCALES}", "media"), json.dumps(body).encode()), media_id


def frame_image() -> bytes:
    """A small synthetic bird frame the weight model can read (workers/dev/frames.py)."""
    from workers.dev.frames import bird_frame
    return bird_frame(160, 120, seed=1).data


# --- the load --------------------------------------------------------------------

class Load(threading.Thread):
    """Paced QoS 1 publisher; survives broker restarts (paho reconnects and
    re-sends what is in flight). Records every message and which were PUBACKed."""

    def __init__(self, mqtt_url: str, rate: float) -> None:
        super().__init__(daemon=True, name="chaos-load")
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.rate = rate
        self.messages: list[tuple[str, bytes]] = []
        self.telemetry = 0
        self.sessions: list[str] = []           # session ids, started and finalized
        self.session_events = 0
        self.media_ids: list[str] = []
        self._image = frame_image() if MEDIA else b""
        self._mids: dict[int, list[int]] = defaultdict(list)   # mid -> message indexes, in order
        self._acks: dict[int, int] = defaultdict(int)          # mid -> PUBACKs seen (network thread)
        self._halt = threading.Event()
        url = urlsplit(mqtt_url)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"chaos-load-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.2, 2)
        self.client.on_publish = self._on_publish
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600   # in-flight messages survive a broker restart
        self.client.connect(url.hostname or "127.0.0.1", url.port or 1883, clean_start=False,
                            properties=props)
        self.client.loop_start()

    def _on_publish(self, client: Any, userdata: Any, mid: int, *_: Any) -> None:
        self._acks[mid] += 1

    def _send(self, message: tuple[str, bytes]) -> None:
        index = len(self.messages)
        self.messages.append(message)
        info = self.client.publish(message[0], message[1], qos=1)
        self._mids[info.mid].append(index)

    def run(self) -> None:
        started = time.monotonic()
        finalize: list[tuple[float, int, str]] = []
        sessions_started = 0
        open_session: tuple[int, str | None] = (0, None)
        while not self._halt.wait(0.02):
            elapsed = time.monotonic() - started
            while self.telemetry < int(elapsed * self.rate):
                self._send(telemetry_message(self.telemetry))
                self.telemetry += 1
            if sessions_started < int(elapsed / SESSION_EVERY_SECONDS):
                session_id = str(uuid.uuid4())
                self._send(session_message(sessions_started, session_id, "start"))
                finalize.append((elapsed + SESSION_LENGTH_SECONDS, sessions_started, session_id))
                sessions_started += 1
                self.session_events += 1
                open_session = (sessions_started - 1, session_id)
            while MEDIA and len(self.media_ids) < int(elapsed * FRAMES_PER_SECOND):
                message, media_id = frame_message(open_session[0], self._image, open_session[1])
                self._send(message)
                self.media_ids.append(media_id)
            while finalize and finalize[0][0] <= elapsed:
                _, n, session_id = finalize.pop(0)
                self._send(session_message(n, session_id, "finalize"))
                self.sessions.append(session_id)
                self.session_events += 1
        for _, n, session_id in finalize:   # no session is left open
            self._send(session_message(n, session_id, "finalize"))
            self.sessions.append(session_id)
            self.session_events += 1

    def stop(self, timeout: float = 60) -> None:
        """Stop publishing; wait (up to `timeout`) for the broker to ack what is in flight."""
        self._halt.set()
        self.join()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.unacked()) > 0:
            time.sleep(0.2)
        self.client.disconnect()
        self.client.loop_stop()

    def unacked(self) -> list[int]:
        acked: set[int] = set()
        for mid, indexes in list(self._mids.items()):
            acked.update(indexes[:self._acks.get(mid, 0)])
        return [i for i in range(len(self.messages)) if i not in acked]

    def acked_count(self) -> int:
        return len(self.messages) - len(self.unacked())


def publish_all(mqtt_url: str, messages: list[tuple[str, bytes]], timeout: float = 60) -> None:
    """Publish `messages` (QoS 1) on a fresh connection and wait for every PUBACK."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    if not messages:
        return
    url = urlsplit(mqtt_url)
    acked = threading.Semaphore(0)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"chaos-retry-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.on_publish = lambda *a: acked.release()
    client.connect(url.hostname or "127.0.0.1", url.port or 1883)
    client.loop_start()
    try:
        for t, payload in messages:
            client.publish(t, payload, qos=1)
        for _ in messages:
            if not acked.acquire(timeout=timeout):
                raise NotReady("the broker did not ack the re-sent messages")
    finally:
        client.disconnect()
        client.loop_stop()


# --- the monitor's database connection ------------------------------------------------

class Monitor:
    """workers.bench.ingest.Db that reconnects: PostgreSQL is restarted under it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._db: Db | None = None

    def one(self, sql: str, params: tuple | dict = (), timeout: float = 60) -> tuple:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._db is None:
                    self._db = Db(self.url)
                return self._db.one(sql, params)
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                self.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def close(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except psycopg2.Error:
                pass
            self._db = None


# --- the run -------------------------------------------------------------------------

@dataclass
class Result:
    faults: list[Fault]
    counts: list[tuple[str, int, int]] = field(default_factory=list)   # (what, got, expected)
    violations: list[str] = field(default_factory=list)
    published: int = 0
    resent: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations


class Chaos:
    """Private services, the operator's processes, the load, the faults, the counts."""

    def __init__(self, duration: float, rate: float, seed: int, work_dir: Path | None = None,
                 out: Callable[[str], None] = say) -> None:
        self.duration, self.rate, self.seed, self.say = duration, rate, seed, out
        # Under /tmp itself: as root, pgserver runs PostgreSQL as another user.
        self.tmp = work_dir or Path(tempfile.mkdtemp(prefix="farmiq-chaos-"))
        self.pg_dir = self.tmp / "pgdata"
        self.pg: Any = None
        self.broker: Any = None
        self.db_url = ""
        self.env: dict[str, str] = {}
        self.procs: dict[str, EdgeProcess] = {}
        self.monitor: Monitor | None = None
        self.t0 = 0.0
        self.sink_port = self.sink_admin = 0
        self.sink_db = self.tmp / "cloud-sink.sqlite3"

    # -- services and processes ------------------------------------------------------

    def setup(self) -> None:
        from schema.migrate import migrate
        from workers.bench.ingest import MOSQUITTO_CONFIG
        from workers.dev.embedded import start_mosquitto, start_postgres

        self.tmp.mkdir(parents=True, exist_ok=True)
        self.pg = start_postgres(self.pg_dir)
        self.db_url = self.pg.url
        migrate(self.db_url)
        self.broker = start_mosquitto(MOSQUITTO_CONFIG, self.tmp / "mosquitto")
        self.monitor = Monitor(self.db_url)
        self.env = {"EDGE_DATABASE_URL": self.db_url, "EDGE_MQTT_URL": self.broker.url,
                    "EDGE_METRICS_PORT": "0", "EDGE_MEDIA_ROOT": str(self.tmp / "media"),
                    "EDGE_BRIDGE_HEARTBEAT_PATH": str(self.tmp / "bridge.heartbeat"),
                    "EDGE_MQTT_CLIENT_ID": f"chaos-bridge-{uuid.uuid4().hex[:8]}",
                    "EDGE_WORKER_THREADS": "4", "dramatiq_prom_db": str(self.tmp / "prom")}
        (self.tmp / "prom").mkdir(exist_ok=True)
        if MEDIA:  # the private volume under /tmp: no free-space floor for the suite
            self.env["EDGE_MEDIA_MIN_FREE_BYTES"] = "0"
        if CLOUD:
            from workers.dev.embedded import free_port
            self.sink_port, self.sink_admin = free_port(), free_port()
            self.env.update({
                "EDGE_CLOUD_URL": f"http://127.0.0.1:{self.sink_port}", "EDGE_CLOUD_TOKEN": SINK_TOKEN,
                # One outbox event per telemetry message too: the forwarder carries the load.
                "EDGE_SYNC_TELEMETRY": "both",
                # Short enough for a run of minutes: a killed forwarder's claims return after
                # 20 s (the least the settings allow with a 5 s POST timeout), backoff ≤ 5 s.
                "EDGE_OUTBOX_HTTP_TIMEOUT_SECONDS": "5", "EDGE_OUTBOX_VISIBILITY_SECONDS": "20",
                "EDGE_OUTBOX_BACKOFF_MAX_SECONDS": "5"})
            self.start("cloud-sink", ["cloud-sink", "--port", str(self.sink_port), "--admin-port",
                                      str(self.sink_admin), "--db", str(self.sink_db), "--token", SINK_TOKEN])
        self.say(f"services   private PostgreSQL {self.db_url.split('?')[0]} (data {self.pg_dir}), "
                 f"private Mosquitto {self.broker.url} (project config); logs in {self.tmp}")
        self.start("bridge", ["bridge"])   # first: its persistent session queues from here on
        for q in QUEUES:
            self.start(f"worker {q}", ["worker", "--queues", q])
        self.start("scheduler", ["scheduler"])
        for name in self.procs:
            self.wait_ready(name, 0)

    def start(self, name: str, args: list[str]) -> EdgeProcess:
        log_path = self.tmp / f"{name.replace(' ', '-')}.log"
        proc = EdgeProcess(name, edge_command(*args), self.env, log_path).start()
        self.procs[name] = proc
        return proc

    def ready_count(self, name: str) -> int:
        return self.procs[name].log().count(READY[name.split()[0]])

    def wait_ready(self, name: str, before: int, timeout: float = 90) -> None:
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while self.ready_count(name) <= before:
            if not proc.alive():
                raise NotReady(f"{name} exited; last log lines:\n" + "\n".join(proc.log().splitlines()[-15:]))
            if time.monotonic() > deadline:
                raise NotReady(f"{name} not ready after {timeout:.0f}s")
            time.sleep(0.1)

    def teardown(self) -> None:
        for proc in self.procs.values():
            try:
                proc.stop()
            except Exception as exc:  # keep cleaning up
                self.say(f"cleanup: {proc.name}: {exc}")
        if self.monitor is not None:
            self.monitor.close()
        for service in (self.broker, self.pg):
            if service is not None:
                try:
                    service.stop()
                except Exception as exc:
                    self.say(f"cleanup: {service!r}: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- faults ----------------------------------------------------------------------------

    def inject(self, fault: Fault) -> None:
        from workers.dev.embedded import start_postgres

        fault_at = datetime.now(timezone.utc)
        fault.at = time.monotonic() - self.t0
        pending_before = self.pending_ids()
        if fault.kind.startswith("kill -9 "):
            name = fault.kind.removeprefix("kill -9 ")
            before = self.ready_count(name)
            self.procs[name].kill9()
            time.sleep(RESTART_DELAY_SECONDS)
            self.procs[name].start()
            self.wait_ready(name, before)
        elif fault.kind == "restart postgresql":
            self.pg.stop()
            time.sleep(PG_DOWN_SECONDS)
            self.pg = start_postgres(self.pg_dir)
            if self.pg.url != self.db_url:
                raise NotReady(f"PostgreSQL came back at another address: {self.pg.url}")
        elif fault.kind.startswith("restart mosquitto"):
            self.broker.restart()
        elif fault.kind == "cloud sink down":
            self.sink_call("/admin/down", {})
            time.sleep(SINK_FAULT_SECONDS)
            self.sink_call("/admin/up", {})
            fault.at = time.monotonic() - self.t0   # recovery counts from the link's return
            fault.note = f"(down {SINK_FAULT_SECONDS:g}s; from its return) "
        elif fault.kind.startswith("cloud sink"):
            self.sink_call("/admin/faults", {"fail_rate": SINK_FAIL_RATE, "status": 503})
            started = time.monotonic()
            fault.recovery = self.wait_progress(fault, fault_at, pending_before)
            time.sleep(max(0.0, SINK_FAULT_SECONDS - (time.monotonic() - started)))
            self.sink_call("/admin/faults", {"fail_rate": 0.0})
            fault.note = f"(for {SINK_FAULT_SECONDS:g}s) " + fault.note
            return
        else:
            raise ValueError(fault.kind)
        # A service restart takes a moment to stop: readings published in it may still
        # commit before the outage. Progress then counts only those published after it.
        since = datetime.now(timezone.utc) if fault.kind.startswith("restart") else fault_at
        fault.recovery = self.wait_progress(fault, fault_at, pending_before, since)

    def sink_call(self, path: str, doc: dict | None = None) -> dict:
        """The cloud sink's admin port: POST `doc`, or GET without one."""
        data = json.dumps(doc).encode() if doc is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.sink_admin}{path}", data=data,
                                         method="POST" if doc is not None else "GET",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read() or b"{}")

    def sink_stored(self) -> int:
        return int(self.sink_call("/admin/counters")["stored"])

    def pending_ids(self) -> int:
        assert self.monitor is not None
        return int(self.monitor.one("SELECT coalesce(max(id), 0) FROM telemetry_agg_pending")[0])

    def wait_progress(self, fault: Fault, fault_at: datetime, pending_before: int,
                      since: datetime | None = None) -> float | None:
        """Seconds from the fault until the data path it hit made progress again
        (for the ingest path: a reading published after `since` committed)."""
        assert self.monitor is not None
        one = self.monitor.one
        kind = fault.kind
        if kind == "kill -9 worker maintenance":
            fault.note += "worker ready again"
            return time.monotonic() - self.t0 - fault.at
        sink_before = self.sink_stored() if CLOUD and ("cloud" in kind or kind.endswith("outbox")) else 0
        # (what progress is, a probe: seconds from the fault to it (SQL, one clock), True, or None)
        probe: tuple[str, Callable[[], float | bool | None]]
        if kind in ("kill -9 worker aggregate", "kill -9 scheduler"):
            probe = ("pending aggregates at the fault merged", lambda: one(
                "SELECT count(*) = 0 FROM telemetry_agg_pending WHERE id <= %s", (pending_before,))[0])
        elif kind == "kill -9 worker media":
            probe = ("a frame published after the fault stored", lambda: one(
                "SELECT extract(epoch FROM min(created_at) - %s) FROM media_objects WHERE captured_at > %s",
                (fault_at, fault_at))[0])
        elif kind == "kill -9 worker inference":
            probe = ("a frame published after the fault inferred", lambda: one(
                "SELECT count(*) > 0 FROM inference_results r JOIN media_objects m ON m.id = r.media_id "
                "WHERE m.captured_at > %s", (fault_at,))[0])
        elif kind.startswith("cloud sink") or kind == "kill -9 worker outbox":
            probe = ("the sink stored more events", lambda: self.sink_stored() > sink_before)
        else:
            after = since or fault_at
            probe = (f"a reading published after the {'restart' if since != fault_at else 'fault'} committed",
                     lambda: one("SELECT extract(epoch FROM min(ingested_at) - %s) FROM telemetry_raw "
                                 "WHERE tenant_id = %s AND occurred_at > %s", (fault_at, TENANT, after))[0])
        what, check = probe
        deadline = time.monotonic() + RECOVERY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            got = check()
            if got is True:
                fault.note += what
                return time.monotonic() - self.t0 - fault.at
            if got is not None and got is not False:
                fault.note += what
                return float(got)
            time.sleep(0.2)
        fault.note += f"{what}: not within {RECOVERY_TIMEOUT_SECONDS:.0f}s"
        return None

    # -- the run -------------------------------------------------------------------------

    def run(self) -> Result:
        faults = schedule(self.duration, self.seed)
        self.say(f"schedule   seed {self.seed}, {self.duration:.0f}s of load at {self.rate:g} telemetry msg/s "
                 f"+ a session every {SESSION_EVERY_SECONDS:g}s:")
        for f in faults:
            self.say(f"             t+{f.planned:6.1f}s  {f.kind}")
        self.setup()
        load = Load(self.broker.url, self.rate)
        self.t0 = time.monotonic()
        load.start()
        try:
            for fault in faults:
                wait = fault.planned - (time.monotonic() - self.t0)
                if wait > 0:
                    time.sleep(wait)
                self.inject(fault)
                rec = "never" if fault.recovery is None else f"{fault.recovery:.1f}s"
                self.say(f"  t+{fault.at:6.1f}s  {fault.kind:<32} recovered in {rec}")
            rest = self.duration - (time.monotonic() - self.t0)
            if rest > 0:
                time.sleep(rest)
        finally:
            load.stop()
        result = Result(faults, published=len(load.messages))
        unacked = load.unacked()
        result.resent = len(unacked)
        if unacked:  # a device re-sends what the broker never acknowledged
            publish_all(self.broker.url, [load.messages[i] for i in unacked])
        self.settle(load, result)
        self.check(load, result)
        return result

    def settle(self, load: Load, result: Result) -> None:
        assert self.monitor is not None
        self.say(f"  load stopped: {load.telemetry:,} telemetry messages, {len(load.sessions):,} sessions "
                 f"({load.session_events:,} session events); {result.resent:,} never acked, re-sent; draining")
        deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            seqs, finalized, pending, busy = self.monitor.one("""
                SELECT (SELECT count(DISTINCT metric_value) FROM telemetry_raw WHERE metric_type = 'seq'),
                       (SELECT count(*) FROM weight_sessions WHERE status = 'finalized'),
                       (SELECT count(*) FROM telemetry_agg_pending),
                       (SELECT count(*) FROM dramatiq.queue WHERE state IN ('queued', 'consumed')
                           AND queue_name NOT LIKE 'maintenance%%')""")
            frames_left = unsynced = 0
            if MEDIA:
                frames_left = len(load.media_ids) - min(self.monitor.one(
                    "SELECT (SELECT count(*) FROM media_objects), (SELECT count(*) FROM inference_results)"))
            if CLOUD:
                unsynced = self.monitor.one("SELECT count(*) FROM sync_outbox WHERE status <> 'acked'")[0]
            if (seqs >= load.telemetry and finalized >= len(load.sessions) and pending == 0 and busy == 0
                    and frames_left <= 0 and unsynced == 0):
                return
            time.sleep(0.5)
        result.violations.append(f"not drained {SETTLE_TIMEOUT_SECONDS:.0f}s after the load stopped")

    def check(self, load: Load, result: Result) -> None:
        assert self.monitor is not None
        one = self.monitor.one
        n = load.telemetry
        seq_rows, seq_distinct, seq_in_range, temp_rows = one("""
            SELECT count(*), count(DISTINCT metric_value),
                   count(DISTINCT metric_value) FILTER (WHERE metric_value >= 0 AND metric_value < %s),
                   (SELECT count(*) FROM telemetry_raw WHERE metric_type = 'temperature')
              FROM telemetry_raw WHERE metric_type = 'seq'""", (n,))
        sessions, finalized = one("SELECT count(*), count(*) FILTER (WHERE status = 'finalized') "
                                  "FROM weight_sessions")
        s_events, s_distinct = one("""
            SELECT count(*), count(DISTINCT payload_json->>'source_event_id') FROM sync_outbox
             WHERE event_type IN ('weighvision.session.created', 'weighvision.session.finalized',
                                  'weighvision.session.cancelled')""")
        agg_events, agg_distinct = one("""
            SELECT count(*), count(DISTINCT (device_id, payload_json->>'metric_type', payload_json->>'window',
                                             payload_json->>'bucket_start_at', payload_json->>'count'))
              FROM sync_outbox WHERE event_type = 'telemetry.aggregated'""")
        dead, rejected, failed_aggs = one("""
            SELECT (SELECT count(*) FROM ingress_dead_letters),
                   (SELECT count(*) FROM dramatiq.queue WHERE state = 'rejected'),
                   (SELECT count(*) FROM telemetry_agg_failed)""")
        counts = [("telemetry events (seq readings, distinct)", seq_in_range, n),
                  ("telemetry_raw seq rows (duplicates if more)", seq_rows, n),
                  ("telemetry_raw temperature rows", temp_rows, n),
                  ("weight_sessions rows", sessions, len(load.sessions)),
                  ("weight_sessions finalized", finalized, len(load.sessions)),
                  ("session outbox events (one per session event)", s_distinct, load.session_events),
                  ("session outbox events written twice", s_events - s_distinct, 0),
                  ("telemetry.aggregated events written twice", agg_events - agg_distinct, 0),
                  ("ingress_dead_letters rows", dead, 0),
                  ("rejected queue messages", rejected, 0),
                  ("aggregate buckets set aside (telemetry_agg_failed)", failed_aggs, 0)]
        for window, unit in WINDOW_UNITS.items():
            counts.append((f"telemetry_agg {window} rows differing from GROUP BY",
                           one(AGG_MISMATCH, {"unit": unit, "window": window})[0], 0))
        if MEDIA:
            counts += self.check_media(load)
        if CLOUD:
            counts += self.check_cloud(load)
        if seq_distinct != seq_in_range:
            counts.append(("seq readings outside the published range", seq_distinct - seq_in_range, 0))
        result.counts = counts
        result.violations += [f"{what}: {got:,}, expected {want:,}" for what, got, want in counts if got != want]
        result.violations += [f"{f.kind} at t+{f.at:.1f}s: no progress within {RECOVERY_TIMEOUT_SECONDS:.0f}s"
                              for f in result.faults if f.recovery is None]


    def check_media(self, load: Load) -> list[tuple[str, int, int]]:
        """One row and one file per frame, nothing left in staging, one result per frame."""
        assert self.monitor is not None
        from models.media_path import STAGING_DIR
        frames = len(load.media_ids)
        published = set(load.media_ids)
        db = Db(self.db_url)
        try:
            rows = db.all("SELECT id::text, path FROM media_objects")
            results, stored_events, stored_distinct = db.one("""
                SELECT (SELECT count(*) FROM inference_results),
                       count(*), count(DISTINCT payload_json->>'source_event_id')
                  FROM sync_outbox WHERE event_type = 'media.stored'""")
            # A late frame sends a new summary that supersedes the last: a duplicate is
            # the same summary twice; the latest must count every frame of its session.
            summaries, summaries_distinct = db.one("""
                SELECT count(*), count(DISTINCT (session_id, payload_json->>'frame_count',
                                                 payload_json->>'median_predicted_weight_kg'))
                  FROM sync_outbox WHERE event_type = 'weighvision.session.summary'""")
            stale_summaries = db.one("""
                SELECT count(*) FROM (SELECT session_id, count(*) AS n FROM media_objects
                                       WHERE session_id IS NOT NULL GROUP BY 1) m
                  LEFT JOIN (SELECT session_id, max((payload_json->>'frame_count')::int) AS n
                               FROM sync_outbox WHERE event_type = 'weighvision.session.summary'
                              GROUP BY 1) s USING (session_id)
                 WHERE s.n IS DISTINCT FROM m.n""")[0]
        finally:
            db.close()
        root = Path(self.env["EDGE_MEDIA_ROOT"])
        # Final names end in `_{media_id}.jpg` (models/media_path.py); anything else is a leftover.
        files = [f for f in root.rglob("*") if f.is_file() and STAGING_DIR not in f.relative_to(root).parts]
        file_ids = {f.stem.rsplit("_", 1)[-1] for f in files}
        staged = [f for f in (root / STAGING_DIR).rglob("*") if f.is_file()] if (root / STAGING_DIR).exists() else []
        row_ids = {i for i, _ in rows}
        return [("media_objects rows (one per frame)", len(rows), frames),
                ("media_objects rows of published frames (distinct)", len(row_ids & published), frames),
                ("frame files under EDGE_MEDIA_ROOT", len(files), frames),
                ("frame files without their row, or rows without their file", len(file_ids ^ row_ids), 0),
                ("files left in staging", len(staged), 0),
                ("inference_results rows (one per frame)", results, frames),
                ("media.stored outbox events (one per frame)", stored_distinct, frames),
                ("media.stored outbox events written twice", stored_events - stored_distinct, 0),
                ("weighvision.session.summary events written twice", summaries - summaries_distinct, 0),
                ("sessions whose latest summary misses frames", stale_summaries, 0)]

    def check_cloud(self, load: Load) -> list[tuple[str, int, int]]:
        """Every outbox event acked, and at the sink once by id; telemetry.ingested once per message."""
        import sqlite3
        db = Db(self.db_url)
        try:
            outbox = {r[0] for r in db.all("SELECT id::text FROM sync_outbox")}
            not_acked = db.one("SELECT count(*) FROM sync_outbox WHERE status <> 'acked'")[0]
            ingested, ingested_distinct = db.one("""
                SELECT count(*), count(DISTINCT payload_json->>'source_event_id') FROM sync_outbox
                 WHERE event_type = 'telemetry.ingested'""")
        finally:
            db.close()
        sink = sqlite3.connect(f"file:{self.sink_db}?mode=ro", uri=True)
        try:
            at_sink = {r[0] for r in sink.execute("SELECT event_id FROM events")}
            deliveries = sink.execute("SELECT count(*) FROM deliveries").fetchone()[0]
            failed, batches = sink.execute("SELECT count(*) FILTER (WHERE status >= 500), count(*) "
                                           "FROM batches").fetchone()
        finally:
            sink.close()
        self.say(f"  cloud sink: {batches:,} batches, {failed:,} answered 5xx (injected); {len(at_sink):,} "
                 f"events stored, {deliveries:,} delivered ({deliveries - len(at_sink):,} again, stored once)")
        return [("telemetry.ingested outbox events (one per message)", ingested_distinct, load.telemetry),
                ("telemetry.ingested outbox events written twice", ingested - ingested_distinct, 0),
                ("outbox events not acked", not_acked, 0),
                ("outbox events missing at the cloud sink", len(outbox - at_sink), 0),
                ("events at the cloud sink not in the outbox", len(at_sink - outbox), 0)]


def report(result: Result, out: Callable[[str], None] = say) -> None:
    out("")
    out("== faults")
    out(f"  {'#':>2}  {'at':>8}  {'fault':<32} {'recovery':>9}  progress measured as")
    for i, f in enumerate(result.faults, 1):
        rec = "never" if f.recovery is None else f"{f.recovery:7.1f}s"
        out(f"  {i:>2}  t+{f.at:6.1f}s  {f.kind:<32} {rec:>9}  {f.note}")
    recovered = [f.recovery for f in result.faults if f.recovery is not None]
    if recovered:
        out(f"  recovery: max {max(recovered):.1f}s, mean {sum(recovered) / len(recovered):.1f}s")
    out("")
    out(f"== counts ({result.published:,} MQTT messages published, {result.resent:,} re-sent after no PUBACK)")
    for what, got, want in result.counts:
        out(f"  {'ok  ' if got == want else 'FAIL'} {what}: {got:,}" + ("" if got == want else f" (expected {want:,})"))
    out("")
    out("PASS" if result.ok else "FAIL: " + "; ".join(result.violations))


def run_chaos(duration: float, rate: float, seed: int, work_dir: Path | None = None,
              out: Callable[[str], None] = say) -> Result:
    """The engine: used by `farmiq-edge bench chaos` and tests/e2e/test_chaos.py."""
    chaos = Chaos(duration, rate, seed, work_dir, out)
    try:
        return chaos.run()
    finally:
        chaos.teardown()


def run_chaos_bench(settings: Any, args: Any) -> int:
    problems = [text for bad, text in ((args.duration < 60, "--duration must be ≥ 60"),
                                       (args.rate <= 0, "--rate must be > 0")) if bad]
    if problems:
        say("farmiq-edge bench chaos: " + "; ".join(problems))
        return EXIT_USAGE
    if args.seed is None:
        args.seed = random.randrange(1_000_000)

    def on_sigterm(*_: object) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    for noisy in ("schema.migrate", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        result = run_chaos(args.duration, args.rate, args.seed)
    except KeyboardInterrupt:
        say("\ninterrupted: stopped everything the run started")
        return EXIT_FAILURE
    except NotReady as exc:
        say(f"\nFAIL: {exc}")
        return EXIT_FAILURE
    finally:
        signal.signal(signal.SIGTERM, previous)
    report(result)
    say(f"(reproduce: farmiq-edge bench chaos --duration {args.duration:g} --rate {args.rate:g} "
        f"--seed {args.seed})")
    return EXIT_OK if result.ok else EXIT_FAILURE
