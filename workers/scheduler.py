"""`farmiq-edge scheduler`: sends the periodic queue messages, one active replica.

A job is an interval and a queue message (`jobs()`). Time is cut into slots
of the job's interval (slot start = floor(now / every) * every); the message
for a slot is enqueued at most once, however many replicas run:

- Leadership: each replica holds one dedicated PostgreSQL connection and
  tries `pg_try_advisory_lock(hashtext(LEADER_LOCK_KEY))` on it. The holder is
  the leader; the others retry every STANDBY_POLL_SECONDS (shorter than the
  shortest job interval). When the leader dies (kill -9, OOM), its backend
  sees the socket close and exits, releasing the lock, so a standby leads
  within one poll. If the leader's host vanishes instead, the TCP keepalive
  settings below make PostgreSQL drop its session within ~15 s.
- One slot, one message: the leader advances `scheduled_jobs.last_slot_at`
  with a conditional UPDATE (`WHERE last_slot_at < :slot`) and enqueues the
  message with `broker.enqueue_in` in the same transaction, on the lock
  connection (commit point). Two schedulers that both believed they lead (a
  network split) would serialise on the row and only one would enqueue; if
  the lock connection is gone the transaction fails and the replica drops
  back to standby. Processed messages are deleted from the queue store, so
  the slot table (not a message id) is what makes this hold.
- Slots missed while no leader ran are not replayed: jobs are periodic and
  idempotent, the next slot does the work. Slots come from the leader's
  clock: a replica whose clock lags sends nothing until it reaches the last
  slot sent (a delay, never a duplicate); NTP keeps that within a tick.

Why not a library: APScheduler 3 (the stable line) runs every job in every
process that starts it and documents that sharing a job store between
schedulers is unsupported, and periodiq (cron strings, minute resolution, no
leader election) cannot express the 1 s aggregation tick. Neither gives
"one slot, one message" across replicas, which is the whole of this module;
the interval arithmetic they would add is one line (`slot_start`).
"""

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import psycopg2
from dramatiq import Actor
from dramatiq.message import Message

from actors.faults import crash_point
from models.settings import Settings

log = logging.getLogger("farmiq_edge.scheduler")

LEADER_LOCK_KEY = "farmiq-edge:scheduler"
STANDBY_POLL_SECONDS = 0.5        # < the shortest interval: a standby leads within one
RECONNECT_SECONDS = 2.0
# Server-side keepalive for the lock connection: a leader whose host vanished
# (no FIN ever comes) loses its session, and so the lock, within ~15 s.
LOCK_SESSION_SETTINGS = ("SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; "
                         "SET tcp_keepalives_count = 3; SET tcp_user_timeout = 10000")

# advance_slot: claim the job's slot; returns a row only if this slot is new.
ADVANCE_SLOT = """
    INSERT INTO scheduled_jobs AS j (job, every_seconds, last_slot_at, last_enqueued_at)
    VALUES (%(job)s, %(every)s, %(slot)s, now())
    ON CONFLICT (job) DO UPDATE
       SET last_slot_at = EXCLUDED.last_slot_at, every_seconds = EXCLUDED.every_seconds,
           last_enqueued_at = now()
     WHERE j.last_slot_at < EXCLUDED.last_slot_at
    RETURNING job
"""

# waiting: a message of this actor is still queued (not yet claimed).
WAITING = """
    SELECT EXISTS (SELECT 1 FROM dramatiq.queue
                    WHERE queue_name = %(queue)s AND state = 'queued' AND message->>'actor_name' = %(actor)s)
"""


@dataclass(frozen=True)
class Job:
    name: str
    every_seconds: float
    actor: Actor
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    # A tick that "does what is pending": while one of its messages still waits
    # (its workers are down or busy), a new slot enqueues nothing more.
    coalesce: bool = False

    def message(self, slot: datetime) -> Message:
        # The slot travels in the options for audit (`dlq show`, tests).
        return Message(queue_name=self.actor.queue_name, actor_name=self.actor.actor_name,
                       args=self.args, kwargs=self.kwargs,
                       options={"scheduled_slot": f"{self.name}@{slot.isoformat()}"})


def jobs() -> list[Job]:
    """The periodic jobs: one line each."""
    from actors.aggregate import aggregate_pending
    from actors.outbox import forward_outbox
    from actors.retention import retention_job
    return [
        Job("aggregate", 1.0, aggregate_pending, coalesce=True),
        Job("outbox", 1.0, forward_outbox, coalesce=True),
        Job("retention.partitions", 600.0, retention_job, ("partitions",)),
        Job("retention.media", 900.0, retention_job, ("media",)),
        Job("retention.outbox", 3600.0, retention_job, ("outbox",)),
        Job("retention.dedupe", 900.0, retention_job, ("dedupe",)),
        Job("retention.queue", 60.0, retention_job, ("queue",)),
    ]


def slot_start(now: float, every: float) -> datetime:
    return datetime.fromtimestamp((now // every) * every, tz=timezone.utc)


class Scheduler:
    """Leadership and slot bookkeeping on one dedicated connection; `tick(now)` is the work."""

    def __init__(self, database_url: str, table: list[Job], *, name: str = "scheduler") -> None:
        self.database_url, self.table, self.name = database_url, table, name
        self.conn: Any = None
        self.leading = False

    def connect(self) -> None:
        self.close()
        self.conn = psycopg2.connect(self.database_url, application_name=f"farmiq-edge {self.name}",
                                     connect_timeout=10, keepalives=1, keepalives_idle=5,
                                     keepalives_interval=2, keepalives_count=3)
        with self.conn, self.conn.cursor() as cur:
            cur.execute(LOCK_SESSION_SETTINGS)

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()  # a leader's lock goes with its session
            except psycopg2.Error:
                pass
        self.conn, self.leading = None, False

    def try_lead(self) -> bool:
        if self.conn is None:
            self.connect()
        if not self.leading:
            with self.conn, self.conn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (LEADER_LOCK_KEY,))
                self.leading = cur.fetchone()[0]
            if self.leading:
                log.info("event=scheduler_leading name=%s", self.name)
        return self.leading

    def tick(self, now: float) -> list[tuple[str, datetime]]:
        """Enqueue every job whose current slot is new; return (job, slot) enqueued.

        Commit point: slot advances and messages commit together, or neither.
        """
        from actors.broker import broker
        sent = []
        with self.conn, self.conn.cursor() as cur:
            for job in self.table:
                slot = slot_start(now, job.every_seconds)
                cur.execute(ADVANCE_SLOT, {"job": job.name, "every": job.every_seconds, "slot": slot})
                if cur.fetchone() is None:
                    continue
                if job.coalesce:
                    cur.execute(WAITING, {"queue": job.actor.queue_name, "actor": job.actor.actor_name})
                    if cur.fetchone()[0]:
                        continue
                broker.enqueue_in(cur, job.message(slot))
                sent.append((job.name, slot))
            if sent:
                crash_point("scheduler.before_commit")
        if sent:
            crash_point("scheduler.after_commit")
        for name, slot in sent:
            log.debug("event=scheduled job=%s slot=%s", name, slot.isoformat())
        return sent

    def next_due(self, now: float) -> float:
        return min((now // j.every_seconds + 1) * j.every_seconds for j in self.table)


def run_scheduler(settings: Settings, *, clock: Callable[[], float] = time.time) -> int:
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    if settings.metrics_port:
        from prometheus_client import start_http_server
        start_http_server(settings.metrics_port)
    from actors.metrics import SCHEDULER_LEADING
    table = jobs()
    scheduler = Scheduler(settings.database_url, table)
    if settings.metrics_port:  # database gauges for the dashboard and alerts (workers/db_metrics.py)
        from workers.db_metrics import register_database_metrics
        register_database_metrics(settings.database_url, settings.media_root)
    log.info("event=scheduler_started jobs=%s", ",".join(f"{j.name}/{j.every_seconds:g}s" for j in table))
    while not stopping.is_set():
        try:
            if not scheduler.try_lead():
                SCHEDULER_LEADING.set(0)
                stopping.wait(STANDBY_POLL_SECONDS)
                continue
            SCHEDULER_LEADING.set(1)
            scheduler.tick(clock())
            stopping.wait(max(0.0, scheduler.next_due(clock()) - clock()))
        except psycopg2.Error as exc:  # database down or lock session lost: back to standby
            log.warning("event=scheduler_standby name=%s reason=%s", scheduler.name, type(exc).__name__)
            SCHEDULER_LEADING.set(0)
            scheduler.close()
            stopping.wait(RECONNECT_SECONDS)
    scheduler.close()
    log.info("event=scheduler_stopped")
    return 0
