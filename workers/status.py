"""`farmiq-edge status`: one screen of what the edge is doing, from the database alone.

Works with no Prometheus: every figure is read from PostgreSQL (queue table,
ingress tables, outbox, sync state) and the media volume (free bytes). Parts
that belong to work not merged yet (retention's `scheduled_jobs`, media's
`inference_pending`) are checked with `to_regclass()` and shown as "n/a" when
absent. `collect()` reads a `Snapshot`; `render()` turns it into rich tables;
`--watch` redraws it in place (rich.live), and `farmiq-edge up` shows the same
view (`LiveView`).

Ingress duplicates are not stored in the database (a redelivery leaves no
row), so the view shows "n/a" for them: the counter
farmiq_edge_ingress_duplicates_total has them.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text
from sqlalchemy import Connection, text

from actors.queue_consumer import LEASE_SECONDS
from schema.db import transaction
from workers.operator import format_age

# Queues that exist in every deployment, shown even while empty.
BASE_QUEUES = ("ingest", "aggregate")
MAX_PAUSED_TENANTS_SHOWN = 5

# ---------------------------------------------------------------------------
# Queries (read-only; each is one statement)
# ---------------------------------------------------------------------------

# queue_depths: per queue, due / delayed / claimed / rejected messages and how
# late the oldest due message is (acked messages are deleted, so every row counts).
QUEUE_DEPTHS = text("""
    SELECT queue_name,
           count(*) FILTER (WHERE state = 'queued' AND due_at <= now())  AS due,
           count(*) FILTER (WHERE state = 'queued' AND due_at > now())   AS delayed,
           count(*) FILTER (WHERE state = 'consumed')                    AS claimed,
           count(*) FILTER (WHERE state = 'rejected')                    AS rejected,
           extract(epoch FROM now() - min(due_at) FILTER (WHERE state = 'queued' AND due_at <= now()))
                                                                         AS oldest_due_seconds
      FROM dramatiq.queue
     GROUP BY queue_name
""")

# live_consumers: consumers (a queue in a worker process) whose heartbeat is within the lease.
LIVE_CONSUMERS = text("""
    SELECT queue_name, count(*) AS n
      FROM dramatiq.consumers
     WHERE beat_at > now() - make_interval(secs => :lease)
     GROUP BY queue_name
""")

# ingress_accepted: events that took effect (one ingress_dedupe row each), last
# minute and all still inside the dedupe TTL.
INGRESS_ACCEPTED = text("""
    SELECT count(*) FILTER (WHERE first_seen_at > now() - interval '1 minute') AS last_minute,
           count(*)                                                            AS total
      FROM ingress_dedupe
""")

# ingress_dead_letters: MQTT messages rejected at ingress, last minute and total.
INGRESS_DEAD = text("""
    SELECT count(*) FILTER (WHERE received_at > now() - interval '1 minute') AS last_minute,
           count(*)                                                          AS total
      FROM ingress_dead_letters
""")

# aggregation_lag: partial aggregates waiting for the aggregate actor, and the oldest one's age.
AGGREGATION_LAG = text("""
    SELECT count(*) AS pending, extract(epoch FROM now() - min(created_at)) AS lag_seconds
      FROM telemetry_agg_pending
""")

# outbox_by_status: cloud sync events per status.
OUTBOX_BY_STATUS = text("""
    SELECT status, count(*) AS n FROM sync_outbox GROUP BY status
""")

# outbox_oldest_pending: how long the oldest pending event has waited.
OUTBOX_OLDEST_PENDING = text("""
    SELECT extract(epoch FROM now() - min(created_at)) AS age_seconds
      FROM sync_outbox
     WHERE status = 'pending'
""")

# sync_summary: last cloud ack over all tenants, worst failure streak, paused tenants.
SYNC_SUMMARY = text("""
    SELECT extract(epoch FROM now() - max(last_acked_at))                    AS last_ack_seconds,
           coalesce(max(consecutive_failures), 0)                             AS max_failures,
           coalesce(array_agg(tenant_id ORDER BY tenant_id)
                    FILTER (WHERE paused_until > now()), '{}')                AS paused
      FROM sync_state
""")

# media_recent: frames stored in the last minute.
MEDIA_RECENT = text("""
    SELECT count(*) AS n FROM media_objects WHERE created_at > now() - interval '1 minute'
""")

# inference_recent: inference results of the last minute (by occurred_at) and in all.
INFERENCE_RECENT = text("""
    SELECT count(*) FILTER (WHERE occurred_at > now() - interval '1 minute') AS last_minute,
           count(*)                                                          AS total
      FROM inference_results
""")

# table_exists: tables other work adds (NULL when the table is not there yet).
TABLE_EXISTS = text("SELECT to_regclass(:name) IS NOT NULL")

# inference_backlog: frames waiting for the model (media branch's work list).
INFERENCE_BACKLOG = text("SELECT count(*) FROM inference_pending")

# retention_runs: the maintenance jobs (scheduler slots `retention.<job>`) and the last successful run of each.
RETENTION_RUNS = text("""
    SELECT substr(job, length('retention.') + 1)        AS job,
           extract(epoch FROM now() - last_success_at)  AS success_seconds,
           extract(epoch FROM now() - last_enqueued_at) AS enqueued_seconds
      FROM scheduled_jobs
     WHERE job LIKE 'retention.%'
     ORDER BY job
""")


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class QueueDepth:
    queue: str
    due: int = 0
    delayed: int = 0
    claimed: int = 0
    rejected: int = 0
    oldest_due_seconds: float | None = None
    consumers: int = 0


@dataclass(frozen=True)
class Volume:
    path: str            # the directory measured (EDGE_MEDIA_ROOT or its nearest existing parent)
    exact: bool          # False when EDGE_MEDIA_ROOT does not exist yet
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class RetentionRun:
    job: str
    success_seconds: float | None
    enqueued_seconds: float | None


@dataclass(frozen=True)
class Snapshot:
    taken_at: datetime
    queues: list[QueueDepth]
    accepted_1m: int
    accepted_total: int
    dead_1m: int
    dead_total: int
    agg_pending: int
    agg_lag_seconds: float | None
    outbox: dict[str, int]
    outbox_oldest_pending_seconds: float | None
    last_ack_seconds: float | None
    max_consecutive_failures: int
    paused_tenants: list[str]
    media_1m: int
    inference_1m: int
    inference_total: int
    inference_backlog: int | None                  # None: table not there
    retention: list[RetentionRun] | None           # None: table not there
    volume: Volume


def collect(conn: Connection, *, media_root: str) -> Snapshot:
    """Read every figure of the view in the caller's (read-only) transaction."""
    depths = {r.queue_name: r for r in conn.execute(QUEUE_DEPTHS)}
    consumers = {r.queue_name: r.n for r in conn.execute(LIVE_CONSUMERS, {"lease": LEASE_SECONDS})}
    queues = []
    for name in sorted(set(BASE_QUEUES) | set(depths) | set(consumers)):
        d = depths.get(name)
        queues.append(QueueDepth(name, consumers=consumers.get(name, 0)) if d is None else QueueDepth(
            name, d.due, d.delayed, d.claimed, d.rejected, _float(d.oldest_due_seconds),
            consumers.get(name, 0)))
    accepted = conn.execute(INGRESS_ACCEPTED).one()
    dead = conn.execute(INGRESS_DEAD).one()
    agg = conn.execute(AGGREGATION_LAG).one()
    outbox = {r.status: r.n for r in conn.execute(OUTBOX_BY_STATUS)}
    sync = conn.execute(SYNC_SUMMARY).one()
    inference = conn.execute(INFERENCE_RECENT).one()
    return Snapshot(
        taken_at=datetime.now(timezone.utc),
        queues=queues,
        accepted_1m=accepted.last_minute, accepted_total=accepted.total,
        dead_1m=dead.last_minute, dead_total=dead.total,
        agg_pending=agg.pending, agg_lag_seconds=_float(agg.lag_seconds),
        outbox=outbox,
        outbox_oldest_pending_seconds=_float(conn.execute(OUTBOX_OLDEST_PENDING).scalar()),
        last_ack_seconds=_float(sync.last_ack_seconds),
        max_consecutive_failures=sync.max_failures,
        paused_tenants=list(sync.paused),
        media_1m=conn.execute(MEDIA_RECENT).scalar_one(),
        inference_1m=inference.last_minute, inference_total=inference.total,
        inference_backlog=(conn.execute(INFERENCE_BACKLOG).scalar_one()
                           if _exists(conn, "inference_pending") else None),
        retention=([RetentionRun(r.job, _float(r.success_seconds), _float(r.enqueued_seconds))
                    for r in conn.execute(RETENTION_RUNS)]
                   if _exists(conn, "scheduled_jobs") else None),
        volume=media_volume(media_root),
    )


class NotMigrated(Exception):
    """The database answers but has no FarmIQ Edge schema yet."""


def read_snapshot(database_url: str, media_root: str) -> Snapshot:
    with transaction(database_url) as conn:
        conn.execute(text("SET TRANSACTION READ ONLY"))
        if not (_exists(conn, "dramatiq.consumers") and _exists(conn, "ingress_dedupe")):
            raise NotMigrated("the database has no FarmIQ Edge schema yet (run `farmiq-edge migrate`)")
        return collect(conn, media_root=media_root)


def media_volume(media_root: str) -> Volume:
    """Free and total bytes of the media volume (or of the nearest existing parent)."""
    path = Path(media_root).resolve()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return Volume(str(probe), probe == path, usage.free, usage.total)


def _exists(conn: Connection, table: str) -> bool:
    return bool(conn.execute(TABLE_EXISTS, {"name": table}).scalar())


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

def render(s: Snapshot, *, title: str = "FarmIQ Edge status") -> RenderableType:
    header = Text.assemble((title, "bold"), f"   {s.taken_at:%Y-%m-%d %H:%M:%S}Z")

    queues = _table("Queues (dramatiq.queue)")
    for col in ("queue", "due", "delayed", "claimed", "rejected", "oldest due", "consumers"):
        queues.add_column(col, justify="left" if col == "queue" else "right")
    for q in s.queues:
        queues.add_row(q.queue, _n(q.due), _n(q.delayed), _n(q.claimed),
                       Text(_n(q.rejected), style="red" if q.rejected else ""),
                       age(q.oldest_due_seconds), _n(q.consumers))

    flow = _table("Ingress and processing")
    flow.add_column("what")
    flow.add_column("last min", justify="right")
    flow.add_column("total", justify="right")
    flow.add_row("accepted events", _n(s.accepted_1m), _n(s.accepted_total) + "*")
    flow.add_row("duplicates", "n/a", "n/a**")
    flow.add_row("dead letters", Text(_n(s.dead_1m), style="red" if s.dead_1m else ""), _n(s.dead_total))
    flow.add_row("frames stored", _n(s.media_1m), "")
    flow.add_row("inference results", _n(s.inference_1m), _n(s.inference_total))
    flow.add_row("inference backlog", "", "n/a" if s.inference_backlog is None else _n(s.inference_backlog))
    flow.add_row("aggregation lag", age(s.agg_lag_seconds), f"{_n(s.agg_pending)} partials")

    sync = _table("Cloud sync (outbox)")
    sync.add_column("what")
    sync.add_column("value", justify="right")
    for status in ("pending", "claimed", "sent", "failed"):
        sync.add_row(status, Text(_n(s.outbox.get(status, 0)),
                                  style="red" if status == "failed" and s.outbox.get(status) else ""))
    sync.add_row("acked (kept)", _n(s.outbox.get("acked", 0)))
    sync.add_row("oldest pending", age(s.outbox_oldest_pending_seconds))
    sync.add_row("last ack", "never" if s.last_ack_seconds is None else age(s.last_ack_seconds) + " ago")
    sync.add_row("failures in a row", _n(s.max_consecutive_failures))
    paused = s.paused_tenants
    shown = ", ".join(paused[:MAX_PAUSED_TENANTS_SHOWN]) + (" …" if len(paused) > MAX_PAUSED_TENANTS_SHOWN else "")
    sync.add_row("paused tenants", f"{len(paused)}" + (f" ({shown})" if paused else ""))

    storage = _table("Storage and maintenance")
    storage.add_column("what")
    storage.add_column("value", justify="right")
    v = s.volume
    where = v.path if v.exact else f"{v.path} (media root not created yet)"
    pct = 100.0 * v.free_bytes / v.total_bytes if v.total_bytes else 0.0
    storage.add_row("media volume free", Text(f"{human_bytes(v.free_bytes)} of {human_bytes(v.total_bytes)} "
                                              f"({pct:.0f}%) at {where}",
                                              style="red" if pct < 10 else ""))
    if s.retention is None:
        storage.add_row("retention last runs", "n/a")
    elif not s.retention:
        storage.add_row("retention last runs", "no job has run yet")
    for run in s.retention or []:
        storage.add_row(f"retention {run.job}",
                        ("never succeeded" if run.success_seconds is None else f"ok {age(run.success_seconds)} ago")
                        + f", enqueued {age(run.enqueued_seconds)} ago")

    notes = Text("* within the dedupe TTL   ** not stored: farmiq_edge_ingress_duplicates_total", style="dim")
    middle = Table.grid(padding=(0, 2))
    middle.add_row(flow, sync)
    return Group(header, queues, middle, storage, notes)


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                 show_edge=False, padding=(0, 1), pad_edge=False)


def age(seconds: float | None) -> str:
    """A duration as an operator reads it: 45s, 12m05s, 3h07m, 2d04h; '-' for none."""
    return format_age(None if seconds is None else timedelta(seconds=float(seconds)))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _n(value: int) -> str:
    return f"{value:,}"


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------

def view(database_url: str, media_root: str, title: str) -> RenderableType:
    """The rendered snapshot, or the reason there is none (database not reachable yet)."""
    try:
        return render(read_snapshot(database_url, media_root), title=title)
    except NotMigrated as exc:
        return Text(f"{title}: {exc}", style="yellow")
    except Exception as exc:  # noqa: BLE001 - the view stays up while the database comes and goes
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[:1]
        return Text(f"{title}: database not answering ({type(exc).__name__}: {''.join(first)})",
                    style="yellow")


def run_status(database_url: str, media_root: str, *, watch: bool, interval: float,
               console: Console | None = None) -> int:
    console = console or Console()
    if not watch:
        try:
            snapshot = read_snapshot(database_url, media_root)  # cannot connect: exit 3 via the CLI
        except NotMigrated as exc:
            print(f"farmiq-edge status: {exc}", file=sys.stderr)
            return 1
        console.print(render(snapshot))
        return 0
    with Live(view(database_url, media_root, "FarmIQ Edge status"), console=console,
              auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(view(database_url, media_root, "FarmIQ Edge status"), refresh=True)
        except KeyboardInterrupt:
            pass
    return 0


class LiveView:
    """The status view redrawn every `interval` seconds in a background thread (for `up`)."""

    def __init__(self, database_url: str, media_root: str, *, title: str, interval: float,
                 console: Console) -> None:
        self.database_url, self.media_root, self.title = database_url, media_root, title
        self.interval, self.console = interval, console
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-view", daemon=True)
        self.live = Live(Text(f"{title}: starting…"), console=console, auto_refresh=False)

    def start(self) -> "LiveView":
        self.live.start(refresh=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.live.stop()

    def _run(self) -> None:
        while True:
            self.live.update(view(self.database_url, self.media_root, self.title), refresh=True)
            if self._stop.wait(self.interval):
                return
