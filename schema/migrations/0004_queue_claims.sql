-- Queue store, second design (actors/broker.py, actors/queue_consumer.py): no
-- session advisory lock per message. A consumer claims due messages with
-- UPDATE … FOR UPDATE SKIP LOCKED, stamping its consumer id and a claim id; it
-- proves it is alive with a heartbeat row; a message claimed by a consumer
-- whose heartbeat is older than the lease goes back to 'queued'. Delayed and
-- retried messages wait in the same row with their due time.

ALTER TABLE dramatiq.queue
    -- When the message may be claimed (enqueue time, or later for a delay or a retry).
    ADD COLUMN due_at      timestamptz NOT NULL DEFAULT now(),
    -- Who holds a 'consumed' message, and which claim of it (an ack or nack only
    -- applies to the claim it was given for: a retried message is a new claim).
    ADD COLUMN consumer_id uuid,
    ADD COLUMN claim_id    bigint;

CREATE SEQUENCE dramatiq.queue_claim_seq;

-- One row per live consumer (a queue in a worker process), refreshed every few
-- seconds. Consumers whose beat_at is older than the lease are dead.
CREATE TABLE dramatiq.consumers (
    consumer_id  uuid        PRIMARY KEY,
    queue_name   text        NOT NULL,
    hostname     text        NOT NULL,
    pid          integer     NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    beat_at      timestamptz NOT NULL DEFAULT now()
);

-- Messages left by the first design: delayed copies waited in "<queue>.DQ"
-- with an eta (ms) in their options; claimed ones held an advisory lock.
-- Both become plain queued messages of their queue, due when their eta says.
UPDATE dramatiq.queue
   SET queue_name = regexp_replace(queue_name, '\.DQ$', ''),
       due_at = coalesce(to_timestamp((message->'options'->>'eta')::double precision / 1000), now()),
       message = jsonb_set(message #- '{options,eta}', '{queue_name}',
                           to_jsonb(regexp_replace(queue_name, '\.DQ$', ''))),
       state = 'queued'
 WHERE state IN ('queued', 'consumed');
UPDATE dramatiq.queue
   SET queue_name = regexp_replace(queue_name, '\.DQ$', '')
 WHERE queue_name LIKE '%.DQ';

-- The claim: due messages of one queue, oldest due first.
DROP INDEX IF EXISTS dramatiq.queue_unfinished_idx;
CREATE INDEX queue_due_idx ON dramatiq.queue (queue_name, due_at) WHERE state = 'queued';
-- The lease sweep: claimed messages of one queue and who holds them.
CREATE INDEX queue_consumed_idx ON dramatiq.queue (queue_name, consumer_id) WHERE state = 'consumed';

-- Every message is inserted, claimed and deleted: vacuum the table early and
-- often so it stays a few pages, not a growing heap of dead rows.
ALTER TABLE dramatiq.queue SET (autovacuum_vacuum_scale_factor = 0.0,
                                autovacuum_vacuum_threshold = 5000,
                                autovacuum_vacuum_insert_threshold = 5000,
                                autovacuum_vacuum_cost_delay = 0);
