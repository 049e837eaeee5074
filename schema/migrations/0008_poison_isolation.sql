-- Issue 12: poison isolation and raw dead letters.

-- SPEC §1.5: a dead letter keeps the payload as received, truncated to 64 KiB;
-- payload_size_bytes records the full length (NULL on rows written before it).
ALTER TABLE ingress_dead_letters ADD COLUMN IF NOT EXISTS payload_size_bytes bigint;

-- Aggregates that could not be merged or synced, set aside so that every other
-- bucket flows on. stage 'merge': a pending partial (window NULL) or a merged
-- bucket that failed to write; its values are kept for a re-drive.
-- stage 'close_out': a bucket whose telemetry.aggregated event failed; the
-- bucket stays in telemetry_agg with needs_sync = false. `reason` is a short
-- code, `detail` the error class; never a value.
CREATE TABLE IF NOT EXISTS telemetry_agg_failed (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stage            text             NOT NULL CHECK (stage IN ('merge', 'close_out')),
    tenant_id        text             NOT NULL,
    farm_id          text             NOT NULL,
    barn_id          text             NOT NULL,
    device_id        text             NOT NULL,
    metric_type      text             NOT NULL,
    "window"         text,
    bucket_start_at  timestamptz      NOT NULL,
    count            bigint           NOT NULL,
    sum_value        double precision NOT NULL,
    min_value        double precision NOT NULL,
    max_value        double precision NOT NULL,
    reason           text             NOT NULL,
    detail           text             NOT NULL DEFAULT '',
    failed_at        timestamptz      NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS telemetry_agg_failed_at_idx ON telemetry_agg_failed (failed_at DESC);
