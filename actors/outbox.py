"""Queue `outbox`: forward sync_outbox events to the cloud (SPEC §3).

The scheduler sends a `forward_outbox` message every second (unless one is
already waiting, so ticks never pile up while no forwarder runs:
workers/scheduler.py `Job.coalesce`); a run drains for up to
DRAIN_SECONDS (at most `EDGE_OUTBOX_CONCURRENCY` runs at once per process, a
tick finding no free slot returns at once). A run loops over tenants with
pending events: claim a batch, POST it, record the answer.

Event states. `pending` → `claimed` (claim transaction: attempt_count + 1,
last_attempt_at) → `acked`, or `failed` with the cloud's reason in last_error
(outcome transaction). A failed POST puts its events back to `pending`. `sent`
is not written on the way: a third write of every event costs ~20 ms of
PostgreSQL per 1,000 events (measured), a third of the database's budget at
20,000 events/s on 2 cores, and recovery treats a claimed event whose POST
went out exactly like one whose POST did not: both are sent again, and the
cloud dedupes by event id. Rows found `sent` are recovered like `claimed` ones.

Commit points: (1) the claim commits before the POST, so no two forwarders
ever send one event concurrently; (2) the outcome commits after the answer.
Both commit with synchronous_commit off (no wait for the WAL flush): a commit
lost in a database crash only means a claim that never was (the events are
still pending) or an answer forgotten (the events come back after the
visibility timeout and are sent again; the cloud dedupes).
A crash between them leaves events `claimed`; after
`EDGE_OUTBOX_VISIBILITY_SECONDS` (default 120 s, validated to outlast a live
claim → POST → record) any run puts them back to `pending` and they are sent
again. Crash points: outbox.after_claim, outbox.after_post.

Ordering: a device's events go in occurred_at order. Claims of one tenant are
serialised by a transaction advisory lock taken in a statement of its own (so
the claim's snapshot sees every earlier claim), and a claim skips devices that
have events in flight; a batch takes devices whole, in device order starting
after the device the previous claim of this process ended on (round robin),
each device's events oldest first. Concurrent batches therefore never share a
device, and a device's later events are never acked while earlier ones wait.
A batch holds one tenant's events, so a tenant whose batches fail pauses alone.

Failures (SPEC §3): 429/503 change nothing but attempt_count/last_attempt_at;
this process waits `Retry-After` as given, else a short exponential backoff
with jitter (kept in memory, per tenant). Other statuses and network errors
add one to sync_state.consecutive_failures and set paused_until = now +
min(cap, 1 s × 2^failures) × jitter(0.5–1). While a tenant is paused after a
network error or a 5xx, GET /v1/edge/ping at most every PROBE_SECONDS; a 200
ends the pause of every such tenant. The first successful batch resets the
counter and the pause.
"""

from actors.broker import broker  # noqa: F401,I001 - the broker is set before any actor

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass

import dramatiq
import psycopg2
import sqlalchemy.exc
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, text

from actors.cloud_client import Verdict, client_for
from actors.faults import crash_point
from actors.metrics import OUTBOX_BATCH_SECONDS, OUTBOX_BATCHES, OUTBOX_EVENTS
from models.ids import new_id
from models.settings import Settings, get_settings
from schema.db import transaction

log = logging.getLogger("farmiq_edge.outbox")

DRAIN_SECONDS = 10.0
PROBE_SECONDS = 2.0             # SPEC §3: the link probe at most every 2 s
BACKOFF_BASE_SECONDS = 1.0      # paused for 1, 2, 4, … s (× jitter), capped by the setting
THROTTLE_BASE_SECONDS = 0.5     # 429/503 without Retry-After: 0.5, 1, 2, … s (× jitter)
PROBE_REASONS = ("network", "server_error")
# Two-key advisory lock namespace for claims; the second key is hashtext(tenant).
CLAIM_LOCK_KEY = 0x0B0C

# outbox_reclaim: events a dead forwarder left claimed (or sent), back to pending
# (index sync_outbox_status_attempt_idx).
RECLAIM = text("""
    UPDATE sync_outbox SET status = 'pending'
     WHERE status IN ('claimed', 'sent')
       AND last_attempt_at < now() - make_interval(secs => :visibility)
    RETURNING tenant_id
""")

# outbox_tenants: tenants with pending events (a skip scan of sync_outbox_pending_idx)
# and how long each is still paused.
TENANTS = text("""
    WITH RECURSIVE t(tenant_id) AS (
        (SELECT tenant_id FROM sync_outbox WHERE status = 'pending' ORDER BY tenant_id LIMIT 1)
        UNION ALL
        SELECT (SELECT o.tenant_id FROM sync_outbox AS o
                 WHERE o.status = 'pending' AND o.tenant_id > t.tenant_id
                 ORDER BY o.tenant_id LIMIT 1)
          FROM t WHERE t.tenant_id IS NOT NULL)
    SELECT t.tenant_id, s.pause_reason,
           greatest(coalesce(extract(epoch FROM s.paused_until - now()), 0), 0)::float AS paused_for
      FROM t LEFT JOIN sync_state AS s USING (tenant_id)
     WHERE t.tenant_id IS NOT NULL
""")

# outbox_claim_lock: one claim per tenant at a time, until this transaction ends.
CLAIM_LOCK = text("SELECT pg_advisory_xact_lock(:key, hashtext(:tenant))")

# outbox_claim_candidates: a tenant's pending events, device by device in
# (device_id, occurred_at) order from just after :after_device (up to and
# including :until_device when given), skipping devices with events in flight;
# each as the JSON object SPEC §3 sends, built by PostgreSQL.
CLAIM_CANDIDATES = text("""
    SELECT id::text AS id, device_id,
           json_build_object('event_id', id, 'tenant_id', tenant_id, 'farm_id', farm_id,
                             'barn_id', barn_id, 'device_id', device_id, 'session_id', session_id,
                             'event_type', event_type, 'occurred_at', occurred_at,
                             'trace_id', trace_id, 'payload', payload_json)::text AS event
      FROM sync_outbox
     WHERE status = 'pending' AND tenant_id = :tenant
       AND device_id > :after_device
       AND (CAST(:until_device AS text) IS NULL OR device_id <= :until_device)
       AND device_id NOT IN (SELECT device_id FROM sync_outbox
                              WHERE status IN ('claimed', 'sent') AND tenant_id = :tenant)
     ORDER BY tenant_id, device_id, occurred_at, id
     LIMIT :limit
       FOR UPDATE SKIP LOCKED
""")

# outbox_claim: the chosen events become this forwarder's (commit point 1).
CLAIM = text("""
    UPDATE sync_outbox
       SET status = 'claimed', attempt_count = attempt_count + 1, last_attempt_at = now()
     WHERE id = ANY(CAST(:ids AS uuid[]))
""")

# outbox_acked / outbox_release: the cloud's verdict on events still in flight.
ACKED = text("""
    UPDATE sync_outbox SET status = 'acked', last_error = NULL
     WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN ('claimed', 'sent')
""")
RELEASE = text("""
    UPDATE sync_outbox SET status = 'pending'
     WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN ('claimed', 'sent')
""")
# outbox_failed: events the cloud rejected, with its reason.
FAILED = text("""
    UPDATE sync_outbox AS o SET status = 'failed', last_error = r.reason
      FROM unnest(CAST(:ids AS uuid[]), CAST(:reasons AS text[])) AS r(id, reason)
     WHERE o.id = r.id AND o.status IN ('claimed', 'sent')
""")

# sync_state_success: a batch was answered 200; the counter and the pause end.
STATE_SUCCESS = text("""
    INSERT INTO sync_state (tenant_id, last_acked_event_id, last_acked_at, last_sent_batch_id,
                            consecutive_failures)
    VALUES (:tenant, CAST(:last_acked AS uuid),
            CASE WHEN CAST(:last_acked AS uuid) IS NULL THEN NULL ELSE now() END,
            CAST(:batch_id AS uuid), 0)
    ON CONFLICT (tenant_id) DO UPDATE
       SET last_acked_event_id = coalesce(EXCLUDED.last_acked_event_id, sync_state.last_acked_event_id),
           last_acked_at = coalesce(EXCLUDED.last_acked_at, sync_state.last_acked_at),
           last_sent_batch_id = EXCLUDED.last_sent_batch_id,
           consecutive_failures = 0, paused_until = NULL, pause_reason = NULL, last_error = NULL
""")
# sync_state_failure: one more consecutive failure, paused for the capped,
# jittered exponential backoff it earns.
STATE_FAILURE = text("""
    INSERT INTO sync_state AS s (tenant_id, last_sent_batch_id, consecutive_failures, paused_until,
                                 pause_reason, last_error)
    VALUES (:tenant, CAST(:batch_id AS uuid), 1,
            now() + make_interval(secs => least(:cap, :base) * (0.5 + random() / 2)),
            :reason, :error)
    ON CONFLICT (tenant_id) DO UPDATE
       SET consecutive_failures = s.consecutive_failures + 1,
           paused_until = now() + make_interval(secs =>
               least(:cap, :base * power(2, least(s.consecutive_failures, 30))) * (0.5 + random() / 2)),
           pause_reason = EXCLUDED.pause_reason, last_error = EXCLUDED.last_error,
           last_sent_batch_id = EXCLUDED.last_sent_batch_id
    RETURNING consecutive_failures, extract(epoch FROM paused_until - now())::float AS paused_for
""")
# sync_state_link_up: the probe answered 200; pauses a probe may end, end.
LINK_UP = text("""
    UPDATE sync_state SET paused_until = NULL, pause_reason = NULL
     WHERE pause_reason IN ('network', 'server_error') AND paused_until IS NOT NULL
    RETURNING tenant_id
""")

NO_FLUSH_WAIT = text("SET LOCAL synchronous_commit = off")


@dramatiq.actor(queue_name="outbox", max_retries=0, time_limit=600_000)
def forward_outbox() -> None:
    # A failed run is not retried: the scheduler's next tick comes within a second.
    try:
        forwarder().drain(DRAIN_SECONDS)
    except (psycopg2.OperationalError, sqlalchemy.exc.OperationalError) as exc:
        log.warning("event=outbox_database_unavailable error=%s", type(exc).__name__)


@dataclass
class Batch:
    tenant_id: str
    batch_id: str
    ids: list[str]
    body: bytes


class Forwarder:
    """The per-process forwarder: HTTP client, run slots, in-memory throttles and cursors."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.database_url
        self.client = client_for(settings.cloud_url, settings.cloud_token,
                                 settings.outbox_http_timeout_seconds, settings.outbox_concurrency)
        self.slots = threading.BoundedSemaphore(settings.outbox_concurrency)
        self.lock = threading.Lock()
        self.cursor: dict[str, str] = {}          # tenant -> device the last claim ended on
        self.throttled: dict[str, tuple[float, int]] = {}  # tenant -> (not before, 429/503 count)
        # tenant -> (paused until, pause_reason) as sync_state says, shared by this process's runs.
        self.pauses: dict[str, tuple[float, str | None]] = {}
        self.last_probe = 0.0
        self.edge_id_json = json.dumps(settings.edge_id)

    # --- the run --------------------------------------------------------------

    def drain(self, budget: float) -> int:
        """Send batches until nothing is left to do or `budget` seconds passed; return events acked."""
        if not self.slots.acquire(blocking=False):
            return 0
        try:
            return self._drain(time.monotonic() + budget)
        finally:
            self.slots.release()

    def _drain(self, deadline: float) -> int:
        self.reclaim()
        acked = 0
        tenants: list[str] = []
        while time.monotonic() < deadline:
            if not tenants:
                tenants = self.tenants()
                if not tenants:
                    return acked
            progressed, waits = False, []
            for tenant in list(tenants):
                wait = self.wait_for(tenant)
                if wait:
                    waits.append(wait)
                    continue
                batch = self.claim(tenant)
                if batch is None:
                    tenants.remove(tenant)  # nothing claimable now (empty, or its devices in flight)
                    continue
                progressed = True
                acked += self.send(batch)
            if progressed:
                continue
            if not waits:
                return acked  # devices in flight elsewhere: the next tick looks again
            # Every tenant left waits: for the link probe, a pause, or a Retry-After.
            now = time.monotonic()
            if any(self.pauses.get(t, (0.0, None))[1] in PROBE_REASONS
                   and self.pauses[t][0] > now for t in tenants) and self.probe():
                tenants = []
                continue
            pause = min(waits + [deadline - time.monotonic()])
            if pause > 0:
                time.sleep(pause)
            tenants = []  # read pauses again: another process may have ended them
        return acked

    def wait_for(self, tenant: str) -> float:
        """Seconds before this process may send for `tenant` again (0: now)."""
        now = time.monotonic()
        paused_until, reason = self.pauses.get(tenant, (0.0, None))
        not_before = max(paused_until, self.throttled.get(tenant, (0.0, 0))[0])
        if reason in PROBE_REASONS and paused_until > now:
            not_before = min(not_before, max(self.last_probe + PROBE_SECONDS, now + 0.01))
        return max(0.0, not_before - now)

    # --- claim, send, record ----------------------------------------------------

    @contextmanager
    def unit(self) -> Iterator[Connection]:
        """A transaction of claim or outcome: see "Commit points" above for why no flush wait."""
        with transaction(self.url) as conn:
            conn.execute(NO_FLUSH_WAIT)
            yield conn

    def tenants(self) -> list[str]:
        with transaction(self.url) as conn:
            rows = conn.execute(TENANTS).all()
        now = time.monotonic()
        for r in rows:
            if r.paused_for > 0:
                self.pauses[r.tenant_id] = (now + r.paused_for, r.pause_reason)
            else:
                self.pauses.pop(r.tenant_id, None)
        return [r.tenant_id for r in rows]

    def claim(self, tenant_id: str) -> Batch | None:
        s = self.settings
        after = self.cursor.get(tenant_id, "")
        with self.unit() as conn:
            conn.execute(CLAIM_LOCK, {"key": CLAIM_LOCK_KEY, "tenant": tenant_id})
            rows = self._candidates(conn, tenant_id, after, None, s.outbox_batch_max_events)
            if len(rows) < s.outbox_batch_max_events and after:
                rows += self._candidates(conn, tenant_id, "", after, s.outbox_batch_max_events - len(rows))
            if not rows:
                return None
            batch_id = str(new_id())
            head = f'{{"edge_id":{self.edge_id_json},"batch_id":"{batch_id}","events":['.encode()
            size, events, ids = len(head) + 2, [], []
            for row in rows:
                event = row.event.encode()
                if events and size + len(event) + 1 > s.outbox_batch_max_bytes:
                    break
                size += len(event) + 1
                events.append(event)
                ids.append(row.id)
            conn.execute(CLAIM, {"ids": ids})
            self.cursor[tenant_id] = rows[len(ids) - 1].device_id
        # Commit point 1: the events are this forwarder's until recorded or reclaimed.
        crash_point("outbox.after_claim")
        return Batch(tenant_id, batch_id, ids, head + b",".join(events) + b"]}")

    @staticmethod
    def _candidates(conn: Connection, tenant_id: str, after: str, until: str | None, limit: int) -> list:
        return conn.execute(CLAIM_CANDIDATES, {"tenant": tenant_id, "after_device": after,
                                               "until_device": until, "limit": limit}).all()

    def send(self, batch: Batch) -> int:
        OUTBOX_EVENTS.labels("sent").inc(len(batch.ids))
        started = time.monotonic()
        verdict = self.client.post_batch(batch.batch_id, batch.body)
        OUTBOX_BATCH_SECONDS.observe(time.monotonic() - started)
        OUTBOX_BATCHES.labels(verdict.kind).inc()
        crash_point("outbox.after_post")
        return self.record(batch, verdict)

    def record(self, batch: Batch, verdict: Verdict) -> int:
        """Commit point 2: the cloud's answer, in one transaction. Returns events acked."""
        s, tenant_id = self.settings, batch.tenant_id
        if verdict.kind == "ok":
            in_batch = set(batch.ids)
            rejected = {i: r for i, r in verdict.rejected.items() if i in in_batch}
            acked_set = {i for i in verdict.acked if i in in_batch and i not in rejected}
            acked = [i for i in batch.ids if i in acked_set]
            rest = [i for i in batch.ids if i not in acked_set and i not in rejected]
            with self.unit() as conn:
                n_acked = conn.execute(ACKED, {"ids": acked}).rowcount if acked else 0
                n_failed = conn.execute(FAILED, {"ids": list(rejected), "reasons": list(rejected.values())}
                                        ).rowcount if rejected else 0
                if rest:  # the cloud answered neither way for these: send them again
                    conn.execute(RELEASE, {"ids": rest})
                conn.execute(STATE_SUCCESS, {"tenant": tenant_id, "batch_id": batch.batch_id,
                                             "last_acked": acked[-1] if acked else None})
            self.throttled.pop(tenant_id, None)
            self.pauses.pop(tenant_id, None)
            OUTBOX_EVENTS.labels("acked").inc(n_acked)
            OUTBOX_EVENTS.labels("failed").inc(n_failed)
            OUTBOX_EVENTS.labels("released").inc(len(rest))
            log.info("event=outbox_batch_ok tenant=%s batch=%s events=%d acked=%d failed=%d released=%d",
                     tenant_id, batch.batch_id, len(batch.ids), n_acked, n_failed, len(rest))
            return n_acked
        with self.unit() as conn:
            conn.execute(RELEASE, {"ids": batch.ids})
            if verdict.kind != "throttled":
                row = conn.execute(STATE_FAILURE, {
                    "tenant": tenant_id, "batch_id": batch.batch_id, "cap": s.outbox_backoff_max_seconds,
                    "base": BACKOFF_BASE_SECONDS, "error": verdict.error,
                    "reason": verdict.kind}).one()
        OUTBOX_EVENTS.labels("released").inc(len(batch.ids))
        if verdict.kind == "throttled":
            count = self.throttled.get(tenant_id, (0.0, 0))[1] + 1
            delay = verdict.retry_after if verdict.retry_after is not None else min(
                s.outbox_backoff_max_seconds, THROTTLE_BASE_SECONDS * 2 ** min(count - 1, 20)) * (
                0.5 + random.random() / 2)
            self.throttled[tenant_id] = (time.monotonic() + delay, count)
            log.info("event=outbox_batch_throttled tenant=%s batch=%s events=%d status=%s wait_s=%.2f "
                     "retry_after=%s", tenant_id, batch.batch_id, len(batch.ids), verdict.status, delay,
                     verdict.retry_after)
            return 0
        self.pauses[tenant_id] = (time.monotonic() + row.paused_for, verdict.kind)
        log.warning("event=outbox_batch_failed tenant=%s batch=%s events=%d error=%r "
                    "consecutive_failures=%d paused_s=%.1f", tenant_id, batch.batch_id, len(batch.ids),
                    verdict.error, row.consecutive_failures, row.paused_for)
        return 0

    # --- link probe, recovery ---------------------------------------------------

    def probe(self) -> bool:
        """GET ping if one is due (at most every PROBE_SECONDS); True if the link is up again."""
        with self.lock:
            if time.monotonic() - self.last_probe < PROBE_SECONDS:
                return False
            self.last_probe = time.monotonic()
        if not self.client.ping():
            return False
        with transaction(self.url) as conn:
            ended = [r.tenant_id for r in conn.execute(LINK_UP)]
        for tenant, (_, reason) in list(self.pauses.items()):
            if reason in PROBE_REASONS:
                self.pauses.pop(tenant, None)
        log.info("event=outbox_link_up tenants_unpaused=%d", len(ended))
        return True

    def reclaim(self) -> None:
        with transaction(self.url) as conn:
            tenant_of_each = [r.tenant_id for r in conn.execute(
                RECLAIM, {"visibility": self.settings.outbox_visibility_seconds})]
        if tenant_of_each:
            OUTBOX_EVENTS.labels("reclaimed").inc(len(tenant_of_each))
            log.warning("event=outbox_reclaimed events=%d tenants=%d", len(tenant_of_each),
                        len(set(tenant_of_each)))


_forwarders: dict[int, Forwarder] = {}
_forwarders_lock = threading.Lock()


def forwarder() -> Forwarder:
    with _forwarders_lock:
        pid = os.getpid()
        if pid not in _forwarders:
            _forwarders[pid] = Forwarder(get_settings())
        return _forwarders[pid]
