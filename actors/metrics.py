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
AGG_FAILURES = Counter("farmiq_edge_aggregation_failures_total",
                       "Aggregates set aside in telemetry_agg_failed (the rest flowed on).",
                       ["stage", "reason"])

# Scheduler and maintenance (workers/scheduler.py, actors/retention.py). `job`
# is one of actors.retention.JOBS, `table` one of the tables retention deletes from.
SCHEDULER_LEADING = Gauge("farmiq_edge_scheduler_leading",
                          "1 while this scheduler replica holds the leader lock.")
RETENTION_LAST_SUCCESS = Gauge("farmiq_edge_retention_last_success_timestamp_seconds",
                               "When the maintenance job last succeeded (Unix time).", ["job"],
                               multiprocess_mode="max")
RETENTION_INTERVAL = Gauge("farmiq_edge_retention_interval_seconds",
                           "The maintenance job's schedule interval (alerts compare with it).", ["job"],
                           multiprocess_mode="max")
RETENTION_DURATION = Gauge("farmiq_edge_retention_last_duration_seconds",
                           "Duration of the maintenance job's last run.", ["job"],
                           multiprocess_mode="mostrecent")
RETENTION_ROWS = Counter("farmiq_edge_retention_deleted_rows_total",
                         "Rows deleted by maintenance jobs.", ["job", "table"])
RETENTION_FILES = Counter("farmiq_edge_retention_deleted_files_total",
                          "Media and stale temporary files deleted by maintenance jobs.", ["job"])
RETENTION_BYTES = Counter("farmiq_edge_retention_deleted_bytes_total",
                          "Bytes of files deleted by maintenance jobs.", ["job"])
RETENTION_MISSING_FILES = Counter("farmiq_edge_retention_missing_files_total",
                                  "Expired media rows whose file was already gone.", ["job"])
RETENTION_HELD_ROWS = Gauge("farmiq_edge_retention_held_back_rows",
                            "Expired rows kept by the sync gate (or open sessions, for media).",
                            ["table"], multiprocess_mode="mostrecent")
RETENTION_HELD_SINCE = Gauge("farmiq_edge_retention_held_back_since_timestamp_seconds",
                             "Oldest time the sync gate holds back from deletion (0: nothing held).",
                             ["table"], multiprocess_mode="mostrecent")

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

# Media and inference (issue 8).
MEDIA_BYTES_WRITTEN = Counter("farmiq_edge_media_bytes_written_total",
                              "Frame bytes written to the media volume (spooled once by the bridge).")
# Free and total bytes of the media volume: workers/db_metrics.py (scheduler, at scrape time).
MEDIA_VOLUME_PRESSURE = Gauge("farmiq_edge_media_volume_full",
                              "1 while frames are held because the media volume is full.",
                              multiprocess_mode="max")
MEDIA_STORED = Counter("farmiq_edge_media_stored_total",
                       "Frames placed at their final path with their media_objects row.", ["result"])
INFERENCE_FRAMES = Counter("farmiq_edge_inference_results_total",
                           "inference_results rows written, by model version.", ["model_version"])
INFERENCE_SECONDS = Histogram("farmiq_edge_inference_seconds",
                              "Model run time per frame (a batch's run divided by its frames).",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0))
INFERENCE_SKIPPED = Counter("farmiq_edge_inference_skipped_total",
                            "Frames that could not be run (file missing or unreadable).", ["reason"])
