"""`farmiq-edge dlq` and `farmiq-edge outbox`: an operator's view of failed work.

Two dead-letter stores (SPEC §1.5) and the cloud sync outbox (SPEC §3):

- rejected queue messages stay in dramatiq-pg's `dramatiq.queue` table with
  state 'rejected'; the DeadLetters middleware (actors/queue_dead_letters.py) records
  why in `message.options.dead_letter_reason`, Retries keeps the traceback.
  They can be listed, shown, re-driven onto their queue, or purged. RETRIES
  is dramatiq's own `options.retries`: the number of failed attempts.
- MQTT messages rejected at ingress are rows of `ingress_dead_letters`; they
  cannot be re-driven (the device must resend), `dlq list` counts them by
  reason so an operator finds both kinds in one place (not with --queue:
  ingress dead letters belong to no queue).
- `sync_outbox` events rejected by the cloud are 'failed' with `last_error`;
  `outbox redrive` sets them back to 'pending' for the forwarder.

Exit codes (SPEC §5): 0 ok; 1 failure (an id given that matched nothing to act
on: then nothing is changed at all); 2 usage error (no ids and no --all, ids
together with --all, an id that is not a UUID). Every change is one statement
in one transaction. Output is aligned text for a terminal and never contains
payload bodies, except `dlq show`, which prints one message in full.
"""

import argparse
import json
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import text

from models.settings import Settings
from schema.db import transaction
from workers.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

OUTBOX_STATUSES = ("pending", "claimed", "sent", "acked", "failed")
TOP_FAILURE_REASONS = 10
REASON_WIDTH = 100  # characters of a reason shown in list output

# ---------------------------------------------------------------------------
# Queries. Every queue lives in one table, dramatiq.queue (actors/broker.py);
# a retried message waits in its own queue's row until its due_at.
# ---------------------------------------------------------------------------

# dlq_list: rejected queue messages, newest first, with the reason recorded by
# the DeadLetters middleware, else the last line of the Retries traceback.
DLQ_LIST = text(r"""
    SELECT message_id::text                                      AS message_id,
           queue_name                                            AS queue,
           message->>'actor_name'                                AS actor,
           coalesce((message->'options'->>'retries')::int, 0)    AS retries,
           now() - mtime                                         AS age,
           coalesce(message->'options'->>'dead_letter_reason',
                    substring(message->'options'->>'traceback' FROM '([^\n]+)\n*$')) AS reason
      FROM dramatiq.queue
     WHERE state = 'rejected'
       AND (CAST(:queue AS text) IS NULL OR queue_name = :queue)
     ORDER BY mtime DESC, message_id
""")

# ingress_dead_letter_counts: MQTT messages rejected at ingress, per reason.
INGRESS_DEAD_LETTER_COUNTS = text("""
    SELECT reason, count(*) AS n, now() - max(received_at) AS last_age
      FROM ingress_dead_letters
     GROUP BY reason
     ORDER BY n DESC, reason
""")

# dlq_show: one queue message, whatever its state, with its full JSON.
DLQ_SHOW = text("""
    SELECT message_id::text AS message_id, queue_name, state::text AS state,
           mtime, now() - mtime AS age, message
      FROM dramatiq.queue
     WHERE message_id = CAST(:message_id AS uuid)
""")

# dlq_redrive: put rejected messages back on their queue, due now, with a
# fresh retry budget (retries 0; reason and traceback removed), and wake the
# queue's idle consumers (actors/broker.py WAKE).
DLQ_REDRIVE = text("""
    WITH redriven AS (
        UPDATE dramatiq.queue
           SET state = 'queued', due_at = now(), mtime = now(), consumer_id = NULL, claim_id = NULL,
               message = (message::jsonb || jsonb_build_object(
                   'options', (coalesce(message::jsonb->'options', '{}') - 'dead_letter_reason' - 'traceback' - 'eta')
                              || '{"retries": 0}'))::json
         WHERE state = 'rejected'
           AND (:all OR message_id = ANY(CAST(:ids AS uuid[])))
           AND (CAST(:queue AS text) IS NULL OR queue_name = :queue)
     RETURNING message_id, queue_name
    )
    SELECT message_id::text AS message_id, pg_notify('dramatiq.' || queue_name || '.enqueue', '') AS notified
      FROM redriven
""")

# dlq_purge: delete rejected messages for good.
DLQ_PURGE = text(r"""
    DELETE FROM dramatiq.queue
     WHERE state = 'rejected'
       AND (:all OR message_id = ANY(CAST(:ids AS uuid[])))
       AND (CAST(:queue AS text) IS NULL OR queue_name = :queue)
    RETURNING message_id::text AS message_id
""")

# outbox_counts: events per tenant and status, with the oldest of each (one scan of sync_outbox).
OUTBOX_COUNTS = text("""
    SELECT tenant_id, status, count(*) AS n, now() - min(created_at) AS oldest_age
      FROM sync_outbox
     GROUP BY tenant_id, status
""")

# outbox_oldest_pending: the pending event that has waited longest.
OUTBOX_OLDEST_PENDING = text("""
    SELECT min(created_at) AS oldest, now() - min(created_at) AS age
      FROM sync_outbox
     WHERE status = 'pending'
""")

# sync_state_all: the forwarder's state per tenant.
SYNC_STATE_ALL = text("""
    SELECT tenant_id, last_acked_at, now() - last_acked_at AS acked_age,
           consecutive_failures, paused_until, paused_until - now() AS paused_for, pause_reason,
           last_error
      FROM sync_state
     ORDER BY tenant_id
""")

# outbox_top_failures: the most frequent reasons the cloud gave for failed events.
OUTBOX_TOP_FAILURES = text("""
    SELECT coalesce(last_error, '(no reason recorded)') AS reason, count(*) AS n
      FROM sync_outbox
     WHERE status = 'failed'
     GROUP BY 1
     ORDER BY n DESC, reason
     LIMIT :top
""")

# outbox_redrive: failed events back to pending; attempt_count is kept.
OUTBOX_REDRIVE = text("""
    UPDATE sync_outbox
       SET status = 'pending', last_error = NULL
     WHERE status = 'failed'
       AND (:all OR id = ANY(CAST(:ids AS uuid[])))
    RETURNING id::text AS id
""")


# ---------------------------------------------------------------------------
# Entry points (workers/cli.py)
# ---------------------------------------------------------------------------

def dlq(settings: Settings, args: argparse.Namespace) -> int:
    action = args.action
    if action == "list":
        return dlq_list(settings.database_url, queue=args.queue)
    if action == "show":
        return dlq_show(settings.database_url, args.message_id)
    ids = _ids_or_all(f"dlq {action}", "message", args.message_ids, args.all)
    if ids is None:
        return EXIT_USAGE
    query = DLQ_REDRIVE if action == "redrive" else DLQ_PURGE
    done = "re-driven" if action == "redrive" else "purged"
    params = {"all": args.all, "ids": ids, "queue": args.queue}
    return _change(settings.database_url, f"dlq {action}", query, params, ids,
                   what="rejected queue message", done=done)


def outbox(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "status":
        return outbox_status(settings.database_url)
    ids = _ids_or_all("outbox redrive", "event", args.event_ids, args.all)
    if ids is None:
        return EXIT_USAGE
    return _change(settings.database_url, "outbox redrive", OUTBOX_REDRIVE,
                   {"all": args.all, "ids": ids}, ids,
                   what="failed outbox event", done="set back to pending")


# ---------------------------------------------------------------------------
# dlq
# ---------------------------------------------------------------------------

def dlq_list(url: str, *, queue: str | None) -> int:
    with transaction(url) as conn:
        rows = conn.execute(DLQ_LIST, {"queue": queue}).all()
        ingress = [] if queue else conn.execute(INGRESS_DEAD_LETTER_COUNTS).all()
    if rows:
        _print_table(("MESSAGE_ID", "QUEUE", "ACTOR", "RETRIES", "AGE", "REASON"),
                     [(r.message_id, r.queue, r.actor or "-", r.retries, format_age(r.age),
                       one_line(r.reason or "(no reason recorded)")) for r in rows],
                     numeric={3})
    where = f" in queue {queue}" if queue else ""
    print(f"{_plural(len(rows), 'rejected queue message')}{where}")
    if queue:
        return EXIT_OK
    print()
    print("MQTT ingress dead letters (ingress_dead_letters; the device must resend):")
    if ingress:
        _print_table(("REASON", "COUNT", "LAST_SEEN"),
                     [(r.reason, r.n, format_age(r.last_age) + " ago") for r in ingress],
                     numeric={1})
    print(_plural(sum(r.n for r in ingress), "ingress dead letter"))
    return EXIT_OK


def dlq_show(url: str, message_id: str) -> int:
    if not _is_uuid(message_id):
        print(f"farmiq-edge dlq show: not a message id: {message_id!r}", file=sys.stderr)
        return EXIT_USAGE
    with transaction(url) as conn:
        row = conn.execute(DLQ_SHOW, {"message_id": message_id}).one_or_none()
    if row is None:
        print(f"farmiq-edge dlq show: no queue message {message_id}", file=sys.stderr)
        return EXIT_FAILURE
    message: dict[str, Any] = row.message or {}
    options = message.get("options") or {}
    traceback = options.get("traceback")
    reason = options.get("dead_letter_reason") or _last_line(traceback) or "(no reason recorded)"
    fields = [
        ("message_id", row.message_id),
        ("queue", row.queue_name),
        ("actor", message.get("actor_name", "-")),
        ("state", row.state),
        ("retries", str(options.get("retries", 0))),
        ("enqueued", _format_millis(message.get("message_timestamp"))),
        ("changed", f"{format_time(row.mtime)} ({format_age(row.age)} ago)"),
        ("reason", reason),
    ]
    width = max(len(name) for name, _ in fields) + 1
    for name, value in fields:
        print(f"{name + ':':<{width}} {value}")
    print()
    print("traceback:")
    print(_indent(traceback.rstrip("\n")) if traceback else "  (none recorded)")
    print()
    print("message:")
    print(json.dumps(message, indent=2, sort_keys=True, ensure_ascii=False))
    return EXIT_OK


# ---------------------------------------------------------------------------
# outbox
# ---------------------------------------------------------------------------

def outbox_status(url: str) -> int:
    with transaction(url) as conn:
        counts = conn.execute(OUTBOX_COUNTS).all()
        oldest = conn.execute(OUTBOX_OLDEST_PENDING).one()
        states = conn.execute(SYNC_STATE_ALL).all()
        failures = conn.execute(OUTBOX_TOP_FAILURES, {"top": TOP_FAILURE_REASONS}).all()

    totals: Counter[str] = Counter()
    per_tenant: defaultdict[str, Counter[str]] = defaultdict(Counter)
    oldest_pending: dict[str, timedelta] = {}
    for r in counts:
        totals[r.status] += r.n
        per_tenant[r.tenant_id][r.status] += r.n
        if r.status == "pending":
            oldest_pending[r.tenant_id] = r.oldest_age

    print("Outbox events (sync_outbox):")
    _print_table(("STATUS", "COUNT"), [(s, totals[s]) for s in OUTBOX_STATUSES], numeric={1})
    if oldest.oldest is None:
        print("oldest pending: none")
    else:
        print(f"oldest pending: {format_age(oldest.age)} ({format_time(oldest.oldest)})")

    print()
    print("Per tenant (sync_state):")
    state_by_tenant = {s.tenant_id: s for s in states}
    tenants = sorted(set(state_by_tenant) | set(per_tenant))
    if tenants:
        rows = []
        for tenant in tenants:
            s, n = state_by_tenant.get(tenant), per_tenant[tenant]
            rows.append((tenant, n["pending"], n["claimed"] + n["sent"], n["failed"],
                         format_age(oldest_pending.get(tenant)),
                         _ago(s.last_acked_at, s.acked_age) if s else "-",
                         s.consecutive_failures if s else 0,
                         _paused(s.paused_until, s.paused_for, s.pause_reason) if s else "-",
                         one_line(s.last_error) if s and s.last_error else "-"))
        # CLAIMED counts events in flight (claimed or sent) to the cloud.
        _print_table(("TENANT", "PENDING", "CLAIMED", "FAILED", "OLDEST_PENDING", "LAST_ACKED_AT",
                      "CONSECUTIVE_FAILURES", "PAUSED_UNTIL", "LAST_ERROR"), rows, numeric={1, 2, 3, 4, 6})
    else:
        print("no tenants")

    print()
    print(f"Top failure reasons (failed events, at most {TOP_FAILURE_REASONS}):")
    if failures:
        _print_table(("COUNT", "REASON"), [(r.n, one_line(r.reason)) for r in failures], numeric={0})
    else:
        print("no failed events")
    return EXIT_OK


# ---------------------------------------------------------------------------
# Shared
# ---------------------------------------------------------------------------

class _Unmatched(Exception):
    """Some ids given matched nothing to act on: roll the whole change back."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(missing)
        self.missing = missing


def _ids_or_all(command: str, noun: str, ids: Sequence[str], all_: bool) -> list[str] | None:
    """The ids to act on ([] with --all), or None after printing a usage error."""
    problem = None
    if ids and all_:
        problem = f"give {noun} ids or --all, not both"
    elif not ids and not all_:
        problem = f"give {noun} ids, or --all for every one"
    else:
        bad = [i for i in ids if not _is_uuid(i)]
        if bad:
            problem = f"not {noun} id(s): {', '.join(repr(b) for b in bad)}"
    if problem:
        print(f"farmiq-edge {command}: {problem}", file=sys.stderr)
        return None
    return [str(uuid.UUID(i)) for i in ids]


def _change(url: str, command: str, query: Any, params: dict[str, Any], ids: list[str],
            *, what: str, done: str) -> int:
    """Run one changing statement; when ids were given, all of them or nothing."""
    try:
        with transaction(url) as conn:
            changed = {row[0] for row in conn.execute(query, params)}
            missing = [i for i in dict.fromkeys(ids) if i not in changed]
            if missing:
                raise _Unmatched(missing)
    except _Unmatched as exc:
        print(f"farmiq-edge {command}: no {what} with id {', '.join(exc.missing)}; "
              "nothing changed", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{_plural(len(changed), what)} {done}")
    return EXIT_OK


def _print_table(headers: Sequence[str], rows: Iterable[Sequence[object]], *,
                 numeric: Collection[int] = ()) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        out = [v.rjust(w) if i in numeric else v.ljust(w)
               for i, (v, w) in enumerate(zip(values, widths))]
        return "  ".join(out).rstrip()

    print(line(headers))
    for row in cells:
        print(line(row))


def format_age(age: timedelta | None) -> str:
    """A duration the way an operator reads it: 45s, 12m05s, 3h07m, 2d04h."""
    if age is None:
        return "-"
    seconds = max(0, int(age.total_seconds()))
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_time(ts: datetime | None) -> str:
    if ts is None:
        return "-"
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def one_line(reason: str, width: int = REASON_WIDTH) -> str:
    flat = " ".join(reason.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


def _ago(ts: datetime | None, age: timedelta | None) -> str:
    return "-" if ts is None else f"{format_time(ts)} ({format_age(age)} ago)"


def _paused(until: datetime | None, remaining: timedelta | None, reason: str | None = None) -> str:
    if until is None:
        return "-"
    why = f", {reason}" if reason else ""
    if remaining is not None and remaining > timedelta(0):
        return f"{format_time(until)} (for {format_age(remaining)}{why})"
    return f"{format_time(until)} (over)"


def _format_millis(millis: object) -> str:
    if not isinstance(millis, int):
        return "-"
    return format_time(datetime.fromtimestamp(millis / 1000, tz=timezone.utc))


def _last_line(traceback: str | None) -> str | None:
    lines = [line for line in (traceback or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def _indent(block: str) -> str:
    return "\n".join("  " + line for line in block.splitlines())


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
