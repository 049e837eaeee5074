-- Periodic jobs of `farmiq-edge scheduler` (workers/scheduler.py) and their
-- last runs (actors/retention.py).
--
-- last_slot_at is the start of the last time slot enqueued for the job. The
-- scheduler advances it with a conditional UPDATE in the same transaction as
-- the enqueue, so a slot is enqueued at most once, whatever the number of
-- scheduler replicas (processed queue messages are deleted from
-- dramatiq.queue, so the queue table cannot answer "was this slot sent?").
-- A slot is its start time, not an index, so changing a job's interval never
-- moves it backwards.
CREATE TABLE scheduled_jobs (
    job               text             PRIMARY KEY,
    every_seconds     double precision NOT NULL CHECK (every_seconds > 0),
    last_slot_at      timestamptz      NOT NULL,
    last_enqueued_at  timestamptz      NOT NULL DEFAULT now(),
    -- Written by the job itself when a run succeeds (maintenance jobs do):
    -- `farmiq-edge retention status` and the staleness metric read them.
    last_success_at   timestamptz,
    last_report       jsonb
);

-- Media retention walks expired frames oldest first (actors/retention.py);
-- the design's indexes all lead with tenant_id.
CREATE INDEX media_objects_captured_idx ON media_objects (captured_at, id);
