-- Monthly range partitions for telemetry_raw and telemetry_agg.
--
-- farmiq_ensure_month_partition(parent, key, month) creates the partition for
-- the month containing `month` if it is missing. Rows that already landed in
-- the DEFAULT partition for that month are moved into the new partition first,
-- because PostgreSQL refuses to create a partition whose range the default
-- partition already holds rows for. Safe to call repeatedly and concurrently
-- (an advisory lock per parent serialises callers).
CREATE OR REPLACE FUNCTION farmiq_ensure_month_partition(parent regclass, key text, month date)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    lo      date := date_trunc('month', month)::date;
    hi      date := (date_trunc('month', month) + interval '1 month')::date;
    child   text := format('%s_%s', parent::text, to_char(lo, 'YYYYMM'));
    dflt    text := format('%s_default', parent::text);
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('farmiq_partitions:' || parent::text));
    IF to_regclass(child) IS NOT NULL THEN
        RETURN child;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', child, parent);
    EXECUTE format(
        'WITH moved AS (DELETE FROM %I WHERE %I >= %L AND %I < %L RETURNING *) INSERT INTO %I SELECT * FROM moved',
        dflt, key, lo, key, hi, child);
    EXECUTE format('ALTER TABLE %s ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', parent, child, lo, hi);
    RETURN child;
END;
$$;

-- Partitions from `months_back` months ago to `months_ahead` months ahead.
CREATE OR REPLACE FUNCTION farmiq_ensure_partitions(months_back int, months_ahead int)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    m int;
BEGIN
    FOR m IN -months_back .. months_ahead LOOP
        PERFORM farmiq_ensure_month_partition('telemetry_raw', 'occurred_at',
                                              (date_trunc('month', now()) + make_interval(months => m))::date);
        PERFORM farmiq_ensure_month_partition('telemetry_agg', 'bucket_start_at',
                                              (date_trunc('month', now()) + make_interval(months => m))::date);
    END LOOP;
END;
$$;
