-- SPEC §1.5: a dead letter keeps the payload as received, truncated to 64 KiB;
-- payload_size_bytes records the full length (NULL on rows written before it).
ALTER TABLE ingress_dead_letters ADD COLUMN IF NOT EXISTS payload_size_bytes bigint;
