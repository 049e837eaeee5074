-- FarmIQ Edge storage model (edge-persistence.md). All ids are UUIDv7 made by
-- the application; timestamps are timestamptz. Documented deviations:
--   * telemetry_raw / telemetry_agg are range-partitioned by month, and
--     PostgreSQL requires the partition key in every unique constraint, so their
--     primary keys are (id, occurred_at) and (id, bucket_start_at).
--   * telemetry_agg carries sum_value (so merging partial aggregates is exact
--     and associative), needs_sync (an aggregate that changed and has not yet
--     been written to the outbox), and farm_id/barn_id (the outbox event of an
--     aggregate names them, like every outbox event).
--   * sync_outbox carries last_error (reason a cloud rejection gave) and
--     created_at; media_objects carries sha256 (SPEC §2).

CREATE TABLE telemetry_raw (
    id            uuid             NOT NULL,
    tenant_id     text             NOT NULL,
    farm_id       text             NOT NULL,
    barn_id       text             NOT NULL,
    device_id     text             NOT NULL,
    occurred_at   timestamptz      NOT NULL,
    metric_type   text             NOT NULL,
    metric_value  double precision NOT NULL,
    unit          text             NOT NULL,
    ingested_at   timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (id, occurred_at)
) PARTITION BY RANGE (occurred_at);
-- Rows outside every monthly partition (e.g. a device clock set to 2021) land
-- here instead of failing the batch; see farmiq_ensure_month_partition().
CREATE TABLE telemetry_raw_default PARTITION OF telemetry_raw DEFAULT;
CREATE INDEX telemetry_raw_tenant_device_time_idx ON telemetry_raw (tenant_id, device_id, occurred_at DESC);
CREATE INDEX telemetry_raw_tenant_time_idx ON telemetry_raw (tenant_id, occurred_at DESC);

CREATE TABLE telemetry_agg (
    id               uuid             NOT NULL,
    tenant_id        text             NOT NULL,
    farm_id          text             NOT NULL,
    barn_id          text             NOT NULL,
    device_id        text             NOT NULL,
    "window"         text             NOT NULL CHECK ("window" IN ('1m', '1h', '1d')),
    bucket_start_at  timestamptz      NOT NULL,
    bucket_end_at    timestamptz      NOT NULL,
    metric_type      text             NOT NULL,
    avg_value        double precision NOT NULL,
    min_value        double precision NOT NULL,
    max_value        double precision NOT NULL,
    count            bigint           NOT NULL CHECK (count > 0),
    sum_value        double precision NOT NULL,
    needs_sync       boolean          NOT NULL DEFAULT true,
    updated_at       timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (id, bucket_start_at),
    CONSTRAINT telemetry_agg_bucket_key UNIQUE (tenant_id, device_id, metric_type, "window", bucket_start_at)
) PARTITION BY RANGE (bucket_start_at);
CREATE TABLE telemetry_agg_default PARTITION OF telemetry_agg DEFAULT;
CREATE INDEX telemetry_agg_tenant_device_window_idx ON telemetry_agg (tenant_id, device_id, "window", bucket_start_at DESC);
-- Closed buckets waiting for their telemetry.aggregated outbox event.
CREATE INDEX telemetry_agg_needs_sync_idx ON telemetry_agg (bucket_end_at) WHERE needs_sync;

-- Partial aggregates of ingested readings per 1-minute bucket, written in the
-- ingest transaction and merged into telemetry_agg by the aggregate actor.
-- This table is the durable record of "which buckets need work".
CREATE TABLE telemetry_agg_pending (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        text             NOT NULL,
    farm_id          text             NOT NULL,
    barn_id          text             NOT NULL,
    device_id        text             NOT NULL,
    metric_type      text             NOT NULL,
    bucket_start_at  timestamptz      NOT NULL,
    count            bigint           NOT NULL,
    sum_value        double precision NOT NULL,
    min_value        double precision NOT NULL,
    max_value        double precision NOT NULL,
    created_at       timestamptz      NOT NULL DEFAULT now()
);

CREATE TABLE weight_sessions (
    id                 uuid             PRIMARY KEY,
    tenant_id          text             NOT NULL,
    farm_id            text             NOT NULL,
    barn_id            text             NOT NULL,
    device_id          text             NOT NULL,
    batch_id           text,
    status             text             NOT NULL CHECK (status IN ('created', 'finalized', 'cancelled')),
    start_at           timestamptz,
    end_at             timestamptz,
    initial_weight_kg  double precision,
    final_weight_kg    double precision,
    updated_at         timestamptz      NOT NULL DEFAULT now()
);
CREATE INDEX weight_sessions_tenant_device_start_idx ON weight_sessions (tenant_id, device_id, start_at DESC);
CREATE INDEX weight_sessions_tenant_status_start_idx ON weight_sessions (tenant_id, status, start_at DESC);

CREATE TABLE media_objects (
    id           uuid        PRIMARY KEY,
    tenant_id    text        NOT NULL,
    farm_id      text        NOT NULL,
    barn_id      text        NOT NULL,
    device_id    text        NOT NULL,
    session_id   uuid,
    path         text        NOT NULL UNIQUE,
    mime_type    text        NOT NULL CHECK (mime_type IN ('image/jpeg', 'image/png')),
    size_bytes   bigint      NOT NULL CHECK (size_bytes >= 0),
    sha256       text        NOT NULL,
    captured_at  timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX media_objects_tenant_session_idx ON media_objects (tenant_id, session_id);
CREATE INDEX media_objects_tenant_device_captured_idx ON media_objects (tenant_id, device_id, captured_at DESC);

CREATE TABLE inference_results (
    id                   uuid             PRIMARY KEY,
    tenant_id            text             NOT NULL,
    farm_id              text             NOT NULL,
    barn_id              text             NOT NULL,
    device_id            text             NOT NULL,
    session_id           uuid,
    media_id             uuid,
    predicted_weight_kg  double precision NOT NULL,
    predicted_size       double precision,
    confidence           double precision NOT NULL,
    model_version        text             NOT NULL,
    occurred_at          timestamptz      NOT NULL,
    -- Re-running inference for a frame with the same model is a no-op.
    CONSTRAINT inference_results_media_model_key UNIQUE (media_id, model_version)
);
CREATE INDEX inference_results_tenant_session_idx ON inference_results (tenant_id, session_id);
CREATE INDEX inference_results_tenant_device_time_idx ON inference_results (tenant_id, device_id, occurred_at DESC);

CREATE TABLE sync_outbox (
    id               uuid        PRIMARY KEY,
    tenant_id        text        NOT NULL,
    farm_id          text        NOT NULL,
    barn_id          text        NOT NULL,
    device_id        text        NOT NULL,
    session_id       uuid,
    event_type       text        NOT NULL,
    occurred_at      timestamptz NOT NULL,
    trace_id         text,
    payload_json     jsonb       NOT NULL,
    status           text        NOT NULL DEFAULT 'pending'
                                 CHECK (status IN ('pending', 'claimed', 'sent', 'acked', 'failed')),
    attempt_count    integer     NOT NULL DEFAULT 0,
    last_attempt_at  timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sync_outbox_tenant_id_key UNIQUE (tenant_id, id)
);
CREATE INDEX sync_outbox_status_attempt_idx ON sync_outbox (status, last_attempt_at ASC);
CREATE INDEX sync_outbox_tenant_time_idx ON sync_outbox (tenant_id, occurred_at DESC);

CREATE TABLE sync_state (
    tenant_id             text        PRIMARY KEY,
    last_acked_event_id   uuid,
    last_acked_at         timestamptz,
    last_sent_batch_id    uuid,
    consecutive_failures  integer     NOT NULL DEFAULT 0,
    paused_until          timestamptz
);

CREATE TABLE ingress_dedupe (
    tenant_id      text        NOT NULL,
    event_id       uuid        NOT NULL,
    first_seen_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ingress_dedupe_tenant_event_key UNIQUE (tenant_id, event_id)
);
CREATE INDEX ingress_dedupe_first_seen_idx ON ingress_dedupe (first_seen_at ASC);

-- SPEC §1.5: every rejected MQTT message, raw payload truncated to 64 KiB.
CREATE TABLE ingress_dead_letters (
    id           uuid        PRIMARY KEY,
    topic        text        NOT NULL,
    payload      bytea       NOT NULL,
    reason       text        NOT NULL,
    detail       text        NOT NULL DEFAULT '',
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ingress_dead_letters_received_idx ON ingress_dead_letters (received_at DESC);
CREATE INDEX ingress_dead_letters_reason_idx ON ingress_dead_letters (reason, received_at DESC);
