"""Prometheus metrics of the data path (prefix farmiq_edge_, labels from small fixed sets).

Worker processes run in prometheus-client multiprocess mode (PROMETHEUS_MULTIPROC_DIR is
set by `farmiq-edge worker` before anything imports prometheus_client); the bridge is a
single process with its own exposition server.
"""

from prometheus_client import Counter, Gauge

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
AGG_FAILURES = Counter("farmiq_edge_aggregation_failures_total",
                       "Aggregates set aside in telemetry_agg_failed (the rest flowed on).",
                       ["stage", "reason"])
