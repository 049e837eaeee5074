"""Prometheus gauges read from the database at scrape time (the `status` snapshot).

What the dashboard and alert rules (deploy/) read about state that lives in
PostgreSQL — queue depth by state, outbox backlog, sync failures — plus the
media volume's free and total bytes. Registered by the scheduler (one active
replica); several pods may export them, so the rules aggregate them with
`max/min without (instance, pod, job)`.

A name another module already registered in this process (for instance a
worker's own gauge) is left to that module, so two sources never collide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import REGISTRY, CollectorRegistry, GaugeMetricFamily, Metric

from workers.status import read_snapshot

log = logging.getLogger("farmiq_edge.db_metrics")

NAMES = ("farmiq_edge_queue_messages", "farmiq_edge_outbox_pending_events",
         "farmiq_edge_outbox_oldest_pending_seconds", "farmiq_edge_sync_consecutive_failures",
         "farmiq_edge_outbox_backlog_events", "farmiq_edge_outbox_paused_tenants",
         "farmiq_edge_media_volume_free_bytes", "farmiq_edge_media_volume_size_bytes")


class DatabaseCollector:
    def __init__(self, database_url: str, media_root: str, skip: frozenset[str] = frozenset()) -> None:
        self.database_url, self.media_root, self.skip = database_url, media_root, skip

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only (the database may be down at registration)

    def collect(self) -> Iterator[Metric]:
        try:
            s = read_snapshot(self.database_url, self.media_root)
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the database does
            log.warning("event=db_metrics_unavailable error=%s", type(exc).__name__)
            return
        families = []
        queues = GaugeMetricFamily("farmiq_edge_queue_messages",
                                   "Messages in the queue store by queue and state (due, delayed, claimed, "
                                   "rejected); processed ones are deleted.", labels=["queue", "state"])
        for q in s.queues:
            for state, n in (("due", q.due), ("delayed", q.delayed), ("claimed", q.claimed),
                             ("rejected", q.rejected)):
                queues.add_metric([q.queue, state], n)
        families.append(queues)
        families.append(GaugeMetricFamily("farmiq_edge_outbox_pending_events",
                                          "Outbox events waiting to be sent.", value=s.outbox.get("pending", 0)))
        families.append(GaugeMetricFamily("farmiq_edge_outbox_oldest_pending_seconds",
                                          "Age of the oldest pending outbox event (0 when none).",
                                          value=s.outbox_oldest_pending_seconds or 0.0))
        families.append(GaugeMetricFamily("farmiq_edge_sync_consecutive_failures",
                                          "Consecutive cloud sync failures of the worst tenant.",
                                          value=s.max_consecutive_failures))
        backlog = GaugeMetricFamily("farmiq_edge_outbox_backlog_events",
                                    "Outbox events not acked, by status.", labels=["status"])
        for status in ("pending", "claimed", "sent", "failed"):
            backlog.add_metric([status], s.outbox.get(status, 0))
        families.append(backlog)
        families.append(GaugeMetricFamily("farmiq_edge_outbox_paused_tenants",
                                          "Tenants whose cloud sync is paused (a count, no tenant label).",
                                          value=len(s.paused_tenants)))
        if s.volume.exact:  # only where the media volume is mounted
            families.append(GaugeMetricFamily("farmiq_edge_media_volume_free_bytes",
                                              "Free bytes on the media volume.", value=s.volume.free_bytes))
            families.append(GaugeMetricFamily("farmiq_edge_media_volume_size_bytes",
                                              "Size of the media volume in bytes.", value=s.volume.total_bytes))
        for family in families:
            if family.name not in self.skip:
                yield family


def register_database_metrics(database_url: str, media_root: str,
                              registry: CollectorRegistry = REGISTRY) -> DatabaseCollector:
    taken = frozenset(getattr(registry, "_names_to_collectors", {}))  # names other modules registered
    collector = DatabaseCollector(database_url, media_root, skip=taken & set(NAMES))
    registry.register(collector)
    log.info("event=db_metrics_registered media_root=%s skipped=%s", Path(media_root),
             ",".join(sorted(collector.skip)) or "-")
    return collector
