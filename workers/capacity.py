"""`farmiq-edge capacity`: how big the database and the media PVC must be.

The design document requires it: "Edge storage sizing must account for offline
windows ... and be reflected in Kubernetes PVC capacity planning".

Model (pure arithmetic in `plan()`; I/O only in `measure()` and `run_capacity()`):

- Every table holds its rows for its retention window PLUS the offline window:
  while the link is down nothing is acked, the sync gate keeps unsynced raw
  rows past their retention, and once the backlog is acked it is kept for the
  outbox retention. That is the worst case at the end of an outage.
- telemetry_raw: one row per reading. telemetry_agg: per series (device ×
  metric) 1440 + 24 + 1 buckets a day (1m, 1h, 1d windows). ingress_dedupe:
  one row per accepted event for the dedupe TTL. sync_outbox: per EDGE_SYNC_TELEMETRY,
  one `telemetry.aggregated` event per bucket (agg) and/or one
  `telemetry.ingested` per message (raw), plus session, media, inference and
  summary events. Queue store: processed messages are deleted, so only a
  backlog counts (`--queue-backlog-minutes` of ingest, e.g. workers stopped).
- Media: frames × frame size for the media retention plus the offline window.
- Bytes per row, indexes included, are BUILTIN (measured on PostgreSQL 15
  with realistic ids by tests/integration/test_capacity.py, which fails when
  they drift more than 20%), or `--measure`d from the live database:
  pg_table_size + pg_indexes_size over each table's partition tree, divided
  by its rows, for tables with at least MEASURE_MIN_ROWS rows.
- Headroom (default 30%) covers page bloat from updates, vacuum lag and WAL.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, replace
from typing import Any

from models.settings import Settings

DAY = 86_400
GIB = 1024 ** 3
AGG_BUCKETS_PER_SERIES_PER_DAY = 1440 + 24 + 1
MEASURE_MIN_ROWS = 1000


@dataclass(frozen=True)
class RowSize:
    heap: float      # bytes per row in the table (TOAST included)
    index: float     # bytes per row in all its indexes
    source: str = "built-in"

    @property
    def total(self) -> float:
        return self.heap + self.index


# Bytes per row on PostgreSQL 15 with ids like tenant-01 / farm-01 / barn-01 /
# sensor-0001 and metric types like temperature (see the module docstring), as
# tests/integration/test_capacity.py measures them. telemetry_agg includes the
# dead version its close-out update leaves (each row updated once, not yet
# vacuumed), the realistic state of a busy table. "queue" is per telemetry
# event waiting in an ingest batch message (the JSON body compresses in TOAST).
BUILTIN: dict[str, RowSize] = {
    "telemetry_raw": RowSize(heap=131, index=96),
    "telemetry_agg": RowSize(heap=345, index=235),
    "ingress_dedupe": RowSize(heap=70, index=76),
    "sync_outbox": RowSize(heap=411, index=100),
    "queue": RowSize(heap=43, index=2),
    # Not measured by the test (no media/inference pipeline on this branch):
    # estimated from column widths plus tuple and index-entry overheads.
    "weight_sessions": RowSize(heap=160, index=90, source="built-in (estimate)"),
    "media_objects": RowSize(heap=300, index=150, source="built-in (estimate)"),
    "inference_results": RowSize(heap=170, index=110, source="built-in (estimate)"),
}
# What the outbox row of each non-telemetry event costs relative to a telemetry one is
# ignored: one figure per outbox row.


@dataclass(frozen=True)
class Assumptions:
    devices: int
    interval_seconds: float
    readings: int
    cameras: int
    frames_per_session: int
    sessions_per_day: float
    offline_days: float
    frame_bytes: float
    retention_raw_days: int
    retention_agg_days: int
    retention_media_days: int
    retention_outbox_days: int
    dedupe_ttl_hours: int
    sync_telemetry: str
    headroom: float = 0.3
    queue_backlog_minutes: float = 10.0


@dataclass(frozen=True)
class Line:
    what: str
    rows: float
    bytes: float
    note: str


@dataclass(frozen=True)
class Plan:
    database: list[Line]
    media: Line
    database_bytes: float
    media_bytes: float
    database_volume_bytes: float     # with headroom
    media_pvc_bytes: float           # with headroom
    rates: dict[str, float]


def plan(a: Assumptions, sizes: dict[str, RowSize]) -> Plan:
    """Rows and bytes per table and on the media volume at the end of an outage."""
    messages_per_day = a.devices * DAY / a.interval_seconds
    readings_per_day = messages_per_day * a.readings
    sessions_per_day = a.cameras * a.sessions_per_day
    frames_per_day = sessions_per_day * a.frames_per_session
    series = a.devices * a.readings
    events_per_day = messages_per_day + 2 * sessions_per_day + frames_per_day  # telemetry, start+finalize, frames

    def window(retention_days: float) -> float:
        return retention_days + a.offline_days

    outbox_per_day = 2 * sessions_per_day + 2 * frames_per_day + sessions_per_day  # sessions, media+inference, summary
    if a.sync_telemetry in ("agg", "both"):
        outbox_per_day += series * AGG_BUCKETS_PER_SERIES_PER_DAY
    if a.sync_telemetry in ("raw", "both"):
        outbox_per_day += messages_per_day

    def line(table: str, rows: float, note: str) -> Line:
        return Line(table, rows, rows * sizes[table].total, note)

    raw_days, agg_days = window(a.retention_raw_days), window(a.retention_agg_days)
    media_days, outbox_days = window(a.retention_media_days), window(a.retention_outbox_days)
    backlog_events = messages_per_day / DAY * 60 * a.queue_backlog_minutes
    database = [
        line("telemetry_raw", readings_per_day * raw_days,
             f"{readings_per_day:,.0f} readings/day × {raw_days:g} days"),
        line("telemetry_agg", series * AGG_BUCKETS_PER_SERIES_PER_DAY * agg_days,
             f"{series:,} series × {AGG_BUCKETS_PER_SERIES_PER_DAY} buckets/day × {agg_days:g} days"),
        line("ingress_dedupe", events_per_day * a.dedupe_ttl_hours / 24,
             f"{events_per_day:,.0f} events/day × {a.dedupe_ttl_hours} h TTL"),
        line("sync_outbox", outbox_per_day * outbox_days,
             f"{outbox_per_day:,.0f} events/day ({a.sync_telemetry}) × {outbox_days:g} days"),
        line("queue", backlog_events, f"{a.queue_backlog_minutes:g} min of ingest backlog"),
        line("weight_sessions", sessions_per_day * media_days,
             f"{sessions_per_day:,.0f} sessions/day × {media_days:g} days"),
        line("media_objects", frames_per_day * media_days,
             f"{frames_per_day:,.0f} frames/day × {media_days:g} days"),
        line("inference_results", frames_per_day * media_days,
             f"{frames_per_day:,.0f} frames/day × {media_days:g} days"),
    ]
    media = Line("media files", frames_per_day * media_days, frames_per_day * media_days * a.frame_bytes,
                 f"{frames_per_day:,.0f} frames/day × {a.frame_bytes / 1024:g} KiB × {media_days:g} days")
    database_bytes = sum(l.bytes for l in database)
    return Plan(database, media, database_bytes, media.bytes,
                database_bytes * (1 + a.headroom), media.bytes * (1 + a.headroom),
                {"messages_per_second": messages_per_day / DAY, "readings_per_day": readings_per_day,
                 "frames_per_day": frames_per_day, "outbox_events_per_day": outbox_per_day})


def pvc_size(n_bytes: float) -> str:
    """A Kubernetes quantity rounded up to a whole Gi (at least 1Gi)."""
    return f"{max(1, math.ceil(n_bytes / GIB))}Gi"


def parse_duration(text: str) -> float:
    """'15s', '2m', '1h', '7d' or plain seconds → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 15s, 2m, 1h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": DAY}[m.group(2)]


# ---------------------------------------------------------------------------
# I/O: measuring a live database, the command
# ---------------------------------------------------------------------------

# table_bytes: heap (with TOAST) and index bytes over a table's partition tree, and its rows
# (planner estimate when analyzed, else counted by the caller).
TABLE_BYTES = """
    WITH tree AS (SELECT relid, isleaf FROM pg_partition_tree(CAST(:table AS regclass))),
         rels AS (SELECT relid, isleaf FROM tree
                  UNION ALL  -- a plain table has no partition tree
                  SELECT CAST(:table AS regclass), true WHERE NOT EXISTS (SELECT FROM tree))
    SELECT coalesce(sum(pg_table_size(relid)), 0)                                AS heap,
           coalesce(sum(pg_indexes_size(relid)), 0)                              AS index,
           coalesce(sum(greatest(c.reltuples, 0)) FILTER (WHERE rels.isleaf), 0) AS estimated_rows
      FROM rels
      JOIN pg_class c ON c.oid = rels.relid
"""
# queue_events: telemetry events waiting in ingest batch messages (args[0] is the event list).
QUEUE_EVENTS = """
    SELECT coalesce(sum(json_array_length(message->'args'->0)), 0)
      FROM dramatiq.queue
     WHERE queue_name = 'ingest' AND json_typeof(message->'args'->0) = 'array'
"""
# media_frame_bytes: average stored frame size.
MEDIA_FRAME_BYTES = "SELECT count(*), avg(size_bytes) FROM media_objects"

MEASURED_TABLES = {name: name for name in BUILTIN if name != "queue"} | {"queue": "dramatiq.queue"}


def measure(conn: Any, min_rows: int = MEASURE_MIN_ROWS) -> tuple[dict[str, RowSize], float | None]:
    """Bytes per row of each table that holds at least `min_rows` rows, and the
    average frame size; `conn` is a SQLAlchemy connection."""
    from sqlalchemy import text

    sizes: dict[str, RowSize] = {}
    for name, table in MEASURED_TABLES.items():
        r = conn.execute(text(TABLE_BYTES), {"table": table}).one()
        if name == "queue":
            rows = conn.execute(text(QUEUE_EVENTS)).scalar_one()
        else:
            rows = float(r.estimated_rows)
            if rows < min_rows * 10:  # small or never analyzed: count exactly (cheap at that size)
                rows = float(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
        if rows >= min_rows:
            sizes[name] = RowSize(heap=float(r.heap) / rows, index=float(r.index) / rows, source=f"measured ({rows:,.0f} rows)")
    n_frames, avg_frame = conn.execute(text(MEDIA_FRAME_BYTES)).one()
    return sizes, (float(avg_frame) if n_frames and n_frames >= 10 else None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=200, help="telemetry devices (default 200)")
    p.add_argument("--interval", type=parse_duration, default=15.0,
                   help="seconds between a device's messages, e.g. 15s (default 15s)")
    p.add_argument("--readings", type=int, default=4, help="readings (metrics) per message (default 4)")
    p.add_argument("--cameras", type=int, default=10, help="cameras (default 10)")
    p.add_argument("--frames-per-session", type=int, default=20, help="frames per weighing session (default 20)")
    p.add_argument("--sessions-per-day", type=float, default=24, help="sessions per camera per day (default 24)")
    p.add_argument("--offline-days", type=float, default=7, help="longest outage to ride out (default 7)")
    p.add_argument("--frame-kb", type=float, default=60, help="KiB per frame (default 60: a 640x480 JPEG)")
    p.add_argument("--headroom", type=float, default=0.3, help="extra share on top (default 0.3)")
    p.add_argument("--queue-backlog-minutes", type=float, default=10,
                   help="ingest backlog the queue store must hold (default 10 min)")
    p.add_argument("--measure", action="store_true",
                   help="bytes per row (and frame size) from the live database where it has data")


def run_capacity(settings: Settings, args: argparse.Namespace) -> int:
    a = Assumptions(
        devices=args.devices, interval_seconds=args.interval, readings=args.readings, cameras=args.cameras,
        frames_per_session=args.frames_per_session, sessions_per_day=args.sessions_per_day,
        offline_days=args.offline_days, frame_bytes=args.frame_kb * 1024,
        retention_raw_days=settings.retention_raw_days, retention_agg_days=settings.retention_agg_days,
        retention_media_days=settings.retention_media_days,
        retention_outbox_days=settings.retention_outbox_days, dedupe_ttl_hours=settings.dedupe_ttl_hours,
        sync_telemetry=settings.sync_telemetry, headroom=args.headroom,
        queue_backlog_minutes=args.queue_backlog_minutes)
    sizes = dict(BUILTIN)
    frame_source = "--frame-kb"
    if args.measure:
        from schema.db import transaction
        with transaction(settings.database_url) as conn:
            measured, frame = measure(conn)
        sizes.update(measured)
        if frame is not None:
            a = replace(a, frame_bytes=frame)
            frame_source = "measured (media_objects)"
    print(report(a, sizes, plan(a, sizes), frame_source=frame_source))
    return 0


def report(a: Assumptions, sizes: dict[str, RowSize], p: Plan, *, frame_source: str = "--frame-kb") -> str:
    from workers.status import human_bytes

    out = ["Assumptions"]
    rows = [
        ("devices × readings / interval", f"{a.devices} × {a.readings} / {a.interval_seconds:g}s "
                                          f"({p.rates['messages_per_second']:,.1f} msg/s)"),
        ("cameras × sessions/day × frames", f"{a.cameras} × {a.sessions_per_day:g} × {a.frames_per_session} "
                                            f"({p.rates['frames_per_day']:,.0f} frames/day)"),
        ("frame size", f"{a.frame_bytes / 1024:,.1f} KiB ({frame_source})"),
        ("offline window", f"{a.offline_days:g} days"),
        ("retention raw / agg / media / outbox", f"{a.retention_raw_days} / {a.retention_agg_days} / "
                                                 f"{a.retention_media_days} / {a.retention_outbox_days} days"),
        ("dedupe TTL", f"{a.dedupe_ttl_hours} h"),
        ("cloud sync of telemetry", a.sync_telemetry),
        ("headroom", f"{a.headroom:.0%}"),
    ]
    out += _table(("assumption", "value"), rows)
    out += ["", "Bytes per row (indexes included)"]
    out += _table(("table", "heap", "indexes", "total", "source"),
                  [(t, f"{s.heap:,.0f}", f"{s.index:,.0f}", f"{s.total:,.0f}", s.source) for t, s in sizes.items()])
    out += ["", "Needed at the end of the offline window"]
    lines = [(l.what, f"{l.rows:,.0f}", human_bytes(l.bytes), l.note) for l in p.database]
    lines.append(("database total", "", human_bytes(p.database_bytes), ""))
    lines.append((p.media.what, f"{p.media.rows:,.0f}", human_bytes(p.media.bytes), p.media.note))
    out += _table(("what", "rows", "bytes", "from"), lines)
    biggest = max(p.database, key=lambda l: l.bytes)
    out += [
        "",
        f"Suggested sizes (with {a.headroom:.0%} headroom):",
        f"  PostgreSQL data volume: {pvc_size(p.database_volume_bytes)}"
        f"  ({human_bytes(p.database_volume_bytes)}; largest: {biggest.what}, {human_bytes(biggest.bytes)})",
        f"  media PVC (farmiq-media, /data/media): {pvc_size(p.media_pvc_bytes)}"
        f"  ({human_bytes(p.media_pvc_bytes)})",
        "",
        *_smallest(a, sizes),
        "Settings these figures assume (config.env):",
        f"  EDGE_RETENTION_RAW_DAYS={a.retention_raw_days}",
        f"  EDGE_RETENTION_AGG_DAYS={a.retention_agg_days}",
        f"  EDGE_RETENTION_MEDIA_DAYS={a.retention_media_days}",
        f"  EDGE_RETENTION_OUTBOX_DAYS={a.retention_outbox_days}",
        f"  EDGE_DEDUPE_TTL_HOURS={a.dedupe_ttl_hours}",
        f"  EDGE_SYNC_TELEMETRY={a.sync_telemetry}",
    ]
    return "\n".join(out)


# The shortest retention windows the settings allow (SPEC §4).
MINIMUM_RETENTION = {"retention_raw_days": 30, "retention_agg_days": 180, "retention_media_days": 30,
                     "retention_outbox_days": 7, "dedupe_ttl_hours": 24}


def _smallest(a: Assumptions, sizes: dict[str, RowSize]) -> list[str]:
    """What the shortest allowed retention windows would need, when that is smaller."""
    low = replace(a, **MINIMUM_RETENTION)
    if low == a:
        return []
    p = plan(low, sizes)
    settings = " ".join(f"EDGE_{k.upper()}={v}" for k, v in MINIMUM_RETENTION.items())
    return [f"With the shortest windows allowed ({settings}):",
            f"  PostgreSQL data volume {pvc_size(p.database_volume_bytes)}, "
            f"media PVC {pvc_size(p.media_pvc_bytes)}", ""]


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    cells = [tuple(str(c) for c in r) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(headers), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in cells]
