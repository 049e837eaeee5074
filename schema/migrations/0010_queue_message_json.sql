-- Queue bodies as json, not jsonb. A full ingest message is ~400 KB of JSON
-- that PostgreSQL only stores and hands back: jsonb parsed it into a tree on
-- every enqueue and printed it again on every claim (~15 ms of server time per
-- 500-event message, measured in `farmiq-edge bench ingest`); json only checks
-- the syntax and keeps the text. Operators' `->`/`->>` reads work the same.
-- Rewrites the table once (seconds for a normal queue, minutes for a large
-- offline backlog).
ALTER TABLE dramatiq.queue ALTER COLUMN message TYPE json USING message::json;

-- Same compression as 0009 (a type change does not keep a column's method).
DO $$
BEGIN
    ALTER TABLE dramatiq.queue ALTER COLUMN message SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    ALTER TABLE dramatiq.queue ALTER COLUMN message SET STORAGE EXTERNAL;
END $$;
