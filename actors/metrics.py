"""Prometheus metrics of the data path (prefix farmiq_edge_, labels from small fixed sets).

Worker processes run in prometheus-client multiprocess mode (PROMETHEUS_MULTIPROC_DIR is
set by `farmiq-edge worker` before anything imports prometheus_client); the bridge is a
single process with its own exposition server.
"""

from prometheus_client import Counter, Gauge, Histogram

INGRESS_ACCEPTED = Counter("farmiq_edge_ingress_accepted_total",
                           "MQTT events that took effect (first delivery).", ["kind"])
INGRESS_DUPLICATES = Counter("farmiq_edge_ingress_duplicates_total",
                             "MQTT events dropped as redeliveries by ingress_dedupe.", ["kind"])
INGRESS_REJECTED = Counter("farmiq_edge_ingress_rejected_total",
                           "MQTT messages written to ingress_dead_letters.", ["reason"])
BRIDGE_BATCHES = Counter("farmiq_edge_bridge_batches_total",
                         "Micro-batches committed by the bridge.")
BRIDGE_BATCH_SECONDS = Gauge("farmiq_edge_bridge_last_commit_seconds",
                             "Duration of the bridge's last enqueue commit.")
AGG_BUCKETS_WRITTEN = Counter("farmiq_edge_aggregation_buckets_written_total",
                              "telemetry_agg rows inserted or updated.", ["window"])
AGG_LAG = Gauge("farmiq_edge_aggregation_lag_seconds",
                "Age of the oldest telemetry_agg_pending row after the last aggregation run.",
                multiprocess_mode="max")

# Outbox forwarder (actors/outbox.py): what it did. What the outbox holds (backlog by
# status, oldest pending, paused tenants, failure streak) is read from the database at
# scrape time by the scheduler (workers/db_metrics.py).
OUTBOX_EVENTS = Counter("farmiq_edge_outbox_events_total",
                        "Outbox events by what became of them: sent (in a POST), acked, failed "
                        "(rejected by the cloud), released (back to pending after a failed POST), "
                        "reclaimed (left claimed by a dead forwarder).", ["result"])
OUTBOX_BATCHES = Counter("farmiq_edge_outbox_batches_total",
                         "Batch POSTs by outcome (ok, throttled, server_error, client_error, network).",
                         ["outcome"])
OUTBOX_BATCH_SECONDS = Histogram("farmiq_edge_outbox_batch_seconds",
                                 "Round trip of one batch POST (request sent → answer read).",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
