-- Media and inference (issue 8).
--
-- inference_pending: frames stored by the media actor and not yet run through
-- the weight model; written in the media actor's transaction, claimed and
-- deleted in the inference actor's (the durable work list, as
-- telemetry_agg_pending is for aggregation).
CREATE TABLE inference_pending (
    media_id    uuid        PRIMARY KEY REFERENCES media_objects (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- weighvision_session_summaries: the last `weighvision.session.summary` event
-- per (session, model version), so a summary is sent once, and again (with a
-- new event id) only when a late frame changes it.
CREATE TABLE weighvision_session_summaries (
    session_id        uuid             NOT NULL,
    model_version     text             NOT NULL,
    frame_count       integer          NOT NULL,
    median_weight_kg  double precision NOT NULL,
    event_id          uuid             NOT NULL,
    updated_at        timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, model_version)
);
