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
