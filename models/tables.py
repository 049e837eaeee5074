"""SQLAlchemy Core tables mirroring schema/migrations (the migrations are the truth).

tests/integration/test_schema.py checks this mirror against a migrated database,
so the two cannot drift apart silently.
"""

from sqlalchemy import (BigInteger, Boolean, Column, DateTime, Float, Integer, LargeBinary, MetaData,
                        Table, Text)
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData()


def _tz() -> DateTime:
    return DateTime(timezone=True)


def _ids() -> list[Column]:
    return [Column(name, Text, nullable=False) for name in ("tenant_id", "farm_id", "barn_id", "device_id")]


telemetry_raw = Table(
    "telemetry_raw", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    *_ids(),
    Column("occurred_at", _tz(), primary_key=True),
    Column("metric_type", Text, nullable=False),
    Column("metric_value", Float, nullable=False),
    Column("unit", Text, nullable=False),
    Column("ingested_at", _tz(), nullable=False),
)

telemetry_agg = Table(
    "telemetry_agg", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    *_ids(),
    Column("window", Text, nullable=False),
    Column("bucket_start_at", _tz(), primary_key=True),
    Column("bucket_end_at", _tz(), nullable=False),
    Column("metric_type", Text, nullable=False),
    Column("avg_value", Float, nullable=False),
    Column("min_value", Float, nullable=False),
    Column("max_value", Float, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("sum_value", Float, nullable=False),
    Column("needs_sync", Boolean, nullable=False),
    Column("updated_at", _tz(), nullable=False),
)

telemetry_agg_pending = Table(
    "telemetry_agg_pending", metadata,
    Column("id", BigInteger, primary_key=True),
    *_ids(),
    Column("metric_type", Text, nullable=False),
    Column("bucket_start_at", _tz(), nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("sum_value", Float, nullable=False),
    Column("min_value", Float, nullable=False),
    Column("max_value", Float, nullable=False),
    Column("created_at", _tz(), nullable=False),
)

telemetry_agg_failed = Table(
    "telemetry_agg_failed", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("stage", Text, nullable=False),
    *_ids(),
    Column("metric_type", Text, nullable=False),
    Column("window", Text),
    Column("bucket_start_at", _tz(), nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("sum_value", Float, nullable=False),
    Column("min_value", Float, nullable=False),
    Column("max_value", Float, nullable=False),
    Column("reason", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("failed_at", _tz(), nullable=False),
)

weight_sessions = Table(
    "weight_sessions", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    *_ids(),
    Column("batch_id", Text),
    Column("status", Text, nullable=False),
    Column("start_at", _tz()),
    Column("end_at", _tz()),
    Column("initial_weight_kg", Float),
    Column("final_weight_kg", Float),
    Column("updated_at", _tz(), nullable=False),
)

media_objects = Table(
    "media_objects", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    *_ids(),
    Column("session_id", UUID(as_uuid=True)),
    Column("path", Text, nullable=False),
    Column("mime_type", Text, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("sha256", Text, nullable=False),
    Column("captured_at", _tz(), nullable=False),
    Column("created_at", _tz(), nullable=False),
)

inference_results = Table(
    "inference_results", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    *_ids(),
    Column("session_id", UUID(as_uuid=True)),
    Column("media_id", UUID(as_uuid=True)),
    Column("predicted_weight_kg", Float, nullable=False),
    Column("predicted_size", Float),
    Column("confidence", Float, nullable=False),
    Column("model_version", Text, nullable=False),
    Column("occurred_at", _tz(), nullable=False),
)

sync_outbox = Table(
    "sync_outbox", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    *_ids(),
    Column("session_id", UUID(as_uuid=True)),
    Column("event_type", Text, nullable=False),
    Column("occurred_at", _tz(), nullable=False),
    Column("trace_id", Text),
    Column("payload_json", JSONB, nullable=False),
    Column("status", Text, nullable=False),
    Column("attempt_count", Integer, nullable=False),
    Column("last_attempt_at", _tz()),
    Column("last_error", Text),
    Column("created_at", _tz(), nullable=False),
)

sync_state = Table(
    "sync_state", metadata,
    Column("tenant_id", Text, primary_key=True),
    Column("last_acked_event_id", UUID(as_uuid=True)),
    Column("last_acked_at", _tz()),
    Column("last_sent_batch_id", UUID(as_uuid=True)),
    Column("consecutive_failures", Integer, nullable=False),
    Column("paused_until", _tz()),
    Column("pause_reason", Text),  # migration 0006: network | server_error | client_error
    Column("last_error", Text),
)

ingress_dedupe = Table(
    "ingress_dedupe", metadata,
    Column("tenant_id", Text, nullable=False),
    Column("event_id", UUID(as_uuid=True), nullable=False),
    Column("first_seen_at", _tz(), nullable=False),
)

ingress_dead_letters = Table(
    "ingress_dead_letters", metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("topic", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("payload_size_bytes", BigInteger),
    Column("reason", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("received_at", _tz(), nullable=False),
)

scheduled_jobs = Table(
    "scheduled_jobs", metadata,
    Column("job", Text, primary_key=True),
    Column("every_seconds", Float, nullable=False),
    Column("last_slot_at", _tz(), nullable=False),
    Column("last_enqueued_at", _tz(), nullable=False),
    Column("last_success_at", _tz()),
    Column("last_report", JSONB),
)

# Media and inference (issue 8, migration 0005).
inference_pending = Table(
    "inference_pending", metadata,
    Column("media_id", UUID(as_uuid=True), primary_key=True),
    Column("created_at", _tz(), nullable=False),
)

weighvision_session_summaries = Table(
    "weighvision_session_summaries", metadata,
    Column("session_id", UUID(as_uuid=True), primary_key=True),
    Column("model_version", Text, primary_key=True),
    Column("frame_count", Integer, nullable=False),
    Column("median_weight_kg", Float, nullable=False),
    Column("event_id", UUID(as_uuid=True), nullable=False),
    Column("updated_at", _tz(), nullable=False),
)
