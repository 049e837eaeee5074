-- How an ingest message is stored. A full one is a micro-batch of ~500 events
-- that PostgreSQL only stores and hands back once; measured in
-- `farmiq-edge bench ingest` (README "The ingest hot path"):
--
-- * the body as json, not jsonb: jsonb parsed ~400 KB into a tree on every
--   enqueue and printed it again on every claim; json only checks the syntax
--   and keeps the text. Operators' `->` / `->>` reads work the same.
-- * `received`: the MQTT payloads of the message's events as the devices sent
--   them (the first 64 KiB of each, one after another; an event names its
--   offset). Only a dead letter written by the ingest actor reads them, so
--   they are stored once and never parsed, sent to a worker or decoded; in the
--   body (base64 in JSON) they were two thirds of it.
--
-- The type change rewrites the table once (seconds for a normal queue,
-- minutes for a large offline backlog).
ALTER TABLE dramatiq.queue ALTER COLUMN message TYPE json USING message::json,
                           ADD COLUMN received bytea;

-- Compression as in 0009 (a type change does not keep a column's method).
DO $$
BEGIN
    ALTER TABLE dramatiq.queue ALTER COLUMN message SET COMPRESSION lz4,
                               ALTER COLUMN received SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    ALTER TABLE dramatiq.queue ALTER COLUMN message SET STORAGE EXTERNAL,
                               ALTER COLUMN received SET STORAGE EXTERNAL;
END $$;
