"""`farmiq-edge scheduler`: sends the periodic queue messages.

Dramatiq has no scheduler of its own; this is a loop over a fixed table of
(interval, message). Every scheduled job is idempotent and keeps its work list
in PostgreSQL, so a tick lost in a crash, or a duplicate one from a second
scheduler replica, changes nothing but timing. Run one replica.
"""

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from models.settings import Settings

log = logging.getLogger("farmiq_edge.scheduler")


@dataclass
class Job:
    name: str
    every_seconds: float
    send: Callable[[], object]
    next_at: float = 0.0


def jobs() -> list[Job]:
    from actors.aggregate import aggregate_pending
    return [Job("aggregate", 1.0, aggregate_pending.send)]


def run_scheduler(settings: Settings) -> int:
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    table = jobs()
    if settings.metrics_port:  # database gauges for the dashboard and alerts (workers/db_metrics.py)
        from prometheus_client import start_http_server

        from workers.db_metrics import register_database_metrics
        register_database_metrics(settings.database_url, settings.media_root)
        start_http_server(settings.metrics_port)
    log.info("event=scheduler_started jobs=%s", ",".join(f"{j.name}/{j.every_seconds}s" for j in table))
    while not stopping.is_set():
        now = time.monotonic()
        for job in table:
            if now >= job.next_at:
                try:
                    job.send()
                except Exception:  # the database may be down: try again next tick
                    log.exception("event=schedule_failed job=%s", job.name)
                job.next_at = now + job.every_seconds
        stopping.wait(max(0.05, min(j.next_at for j in table) - time.monotonic()))
    log.info("event=scheduler_stopped")
    return 0
