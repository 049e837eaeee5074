-- 0006: the outbox forwarder (SPEC §3, issue 9).
--
-- The forwarder's work list: pending events of a tenant, device by device, each
-- device's events in occurred_at order (the order SPEC §3 requires). Partial,
-- so acked events (kept 7–30 days) never enter it.
CREATE INDEX sync_outbox_pending_idx
    ON sync_outbox (tenant_id, device_id, occurred_at, id)
 WHERE status = 'pending';

-- Why a tenant is paused, so every forwarder replica knows whether to probe
-- the link (SPEC §3: after network errors and 5xx without Retry-After) or to
-- wait out the backoff (any other status, e.g. 401 for a bad token); and the
-- last error as an operator reads it (a status code or an exception class,
-- never a body).
ALTER TABLE sync_state
    ADD COLUMN pause_reason text CHECK (pause_reason IN ('network', 'server_error', 'client_error')),
    ADD COLUMN last_error   text;
