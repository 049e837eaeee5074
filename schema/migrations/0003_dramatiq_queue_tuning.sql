-- Index for the hardened broker's per-queue lookups (actors/broker.py):
-- "unfinished messages of queue Q, oldest first, LIMIT n". The stock schema
-- only indexes (state, mtime), so every lookup scanned all queues' rows.
CREATE INDEX IF NOT EXISTS queue_unfinished_idx
    ON dramatiq.queue (queue_name, mtime)
    WHERE state IN ('queued', 'consumed');
