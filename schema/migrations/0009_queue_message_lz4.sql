-- An ingest queue message is a whole micro-batch (~500 events, ~250 KB of
-- JSON), so PostgreSQL TOAST-compresses it. With the default method (pglz)
-- that compression was ~7% of the server's CPU in `farmiq-edge bench ingest`;
-- lz4 is several times faster. A server built without lz4 keeps such
-- messages out of line, uncompressed (they live seconds: deleted on ack).
DO $$
BEGIN
    ALTER TABLE dramatiq.queue ALTER COLUMN message SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    ALTER TABLE dramatiq.queue ALTER COLUMN message SET STORAGE EXTERNAL;
END $$;
