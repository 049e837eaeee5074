"""`farmiq-edge dlq ingress list|show|redrive|purge`: MQTT messages rejected at ingress.

Rows of `ingress_dead_letters` (SPEC §1.5: topic, payload truncated to 64 KiB,
reason, detail, received_at). Filters for every verb but `show`: `--reason`,
`--topic` (SQL LIKE, or a glob when it holds `*` or `?`), `--older-than` /
`--newer-than` (15m, 2h, 7d).

`redrive` re-validates each dead letter's stored topic and payload with today's
rules and settings (`parse_message`, as the bridge does; a `session_conflict`
row written by the ingest actor holds the normalized event and is re-checked
as one). Per page of dead letters, ONE transaction (commit point) enqueues the
ones that now pass as one `ingest` batch message and deletes them, and writes
the new reason and detail of the ones that still fail. So a crash re-drives a
page completely or not at all, and a second run finds only what still fails
(and the ingest's dedupe drops anything the device has meanwhile resent).

A payload of exactly 64 KiB may have been cut at ingress: if it does not pass
it cannot be re-driven, and its detail says so; the device must resend.
Every verb prints counts; `purge` and `redrive` with no filter need `--all`.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import text

from models.ingress_dead_letters import MAX_DEAD_LETTER_PAYLOAD
from models.settings import Settings
from schema.db import raw_cursor, transaction
from workers.capacity import parse_duration

# Imported where used, so that building the CLI's parser stays light:
# models.messages (validation, Pillow), workers.status (rich), actors.* (the broker).

from workers.exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
PAGE = 500
LIST_LIMIT = 50
SHOW_PAYLOAD_BYTES = 4096
TRUNCATED_NOTE = "payload may be cut at 64 KiB at ingress: cannot be re-driven, the device must resend"

# The filter every verb shares; NULL parameters match everything.
_WHERE = """
       (CAST(:reason AS text) IS NULL OR reason = :reason)
   AND (CAST(:topic AS text) IS NULL OR topic LIKE :topic ESCAPE '\\')
   AND (CAST(:older AS double precision) IS NULL OR received_at < now() - make_interval(secs => :older))
   AND (CAST(:newer AS double precision) IS NULL OR received_at >= now() - make_interval(secs => :newer))
"""

# counts_by_reason: matching dead letters per reason, with the newest one's age.
COUNTS_BY_REASON = text(f"""
    SELECT reason, count(*) AS n, extract(epoch FROM now() - max(received_at)) AS newest_seconds
      FROM ingress_dead_letters
     WHERE {_WHERE}
     GROUP BY reason
     ORDER BY n DESC, reason
""")

# newest: the most recent matching dead letters, without their payloads.
NEWEST = text(f"""
    SELECT id::text AS id, reason, topic, detail, length(payload) AS size,
           extract(epoch FROM now() - received_at) AS age_seconds
      FROM ingress_dead_letters
     WHERE {_WHERE}
     ORDER BY received_at DESC, id
     LIMIT :limit
""")

# show_one: one dead letter with its payload.
SHOW_ONE = text("""
    SELECT id::text AS id, reason, topic, detail, payload, received_at,
           extract(epoch FROM now() - received_at) AS age_seconds
      FROM ingress_dead_letters
     WHERE id = CAST(:id AS uuid)
""")

# claim_page: the next page of matching dead letters (oldest first), locked so
# two re-drives never take the same rows; `after` walks past rows kept this run.
CLAIM_PAGE = text(f"""
    SELECT id, topic, payload, reason
      FROM ingress_dead_letters
     WHERE {_WHERE}
       AND (CAST(:after_at AS timestamptz) IS NULL OR (received_at, id) > (:after_at, CAST(:after_id AS uuid)))
     ORDER BY received_at, id
     LIMIT :page
       FOR UPDATE SKIP LOCKED
""")
# received_at of a claimed row (the page cursor).
RECEIVED_AT = text("SELECT received_at FROM ingress_dead_letters WHERE id = CAST(:id AS uuid)")

# delete_redriven: dead letters whose messages were enqueued in this transaction.
DELETE_REDRIVEN = text("DELETE FROM ingress_dead_letters WHERE id = ANY(CAST(:ids AS uuid[]))")

# update_reason: what today's rules say about a dead letter that still fails.
UPDATE_REASON = text("""
    UPDATE ingress_dead_letters SET reason = :reason, detail = :detail WHERE id = CAST(:id AS uuid)
""")

# purge: delete matching dead letters for good.
PURGE = text(f"DELETE FROM ingress_dead_letters WHERE {_WHERE}")


# ---------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, help_text in (("list", "counts by reason and the newest dead letters"),
                            ("show", "one dead letter with its payload"),
                            ("redrive", "re-validate with today's rules; ingest what passes"),
                            ("purge", "delete dead letters")):
        a = verbs.add_parser(verb, help=help_text, description=help_text)
        if verb == "show":
            a.add_argument("id", help="dead letter id")
            continue
        a.add_argument("--reason", help="only this reason (e.g. schema, clock_skew)")
        a.add_argument("--topic", help="topic pattern: SQL LIKE (%%, _) or a glob (*, ?)")
        a.add_argument("--older-than", type=parse_duration, metavar="AGE", help="received before AGE ago (e.g. 2h)")
        a.add_argument("--newer-than", type=parse_duration, metavar="AGE", help="received within AGE (e.g. 15m)")
        if verb == "list":
            a.add_argument("--limit", type=int, default=LIST_LIMIT, help=f"rows shown (default {LIST_LIMIT})")
        else:
            a.add_argument("--all", action="store_true", help="allow acting with no filter (every dead letter)")


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.verb == "show":
        return show(settings.database_url, args.id)
    filters = {"reason": args.reason, "topic": topic_like(args.topic),
               "older": args.older_than, "newer": args.newer_than}
    if args.verb == "list":
        return list_(settings.database_url, filters, limit=args.limit)
    if not args.all and all(v is None for v in filters.values()):
        print(f"farmiq-edge dlq ingress {args.verb}: give a filter (--reason, --topic, --older-than, "
              "--newer-than) or --all", file=sys.stderr)
        return EXIT_USAGE
    if args.verb == "purge":
        with transaction(settings.database_url) as conn:
            n = conn.execute(PURGE, filters).rowcount
        print(f"{_plural(n, 'ingress dead letter')} purged")
        return EXIT_OK
    result = redrive(settings, filters)
    print(f"{_plural(result.examined, 'ingress dead letter')} examined: {result.redriven} re-driven "
          f"(enqueued for ingest), {sum(result.still_failing.values())} still failing")
    for reason, n in sorted(result.still_failing.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {reason}: {n}")
    if result.truncated:
        print(f"{_plural(result.truncated, 'dead letter')} with a payload of 64 KiB may be truncated: "
              "cannot be re-driven (the device must resend)")
    return EXIT_OK


def topic_like(pattern: str | None) -> str | None:
    """A LIKE pattern: globs (`*`, `?`) are translated, LIKE patterns kept."""
    if pattern is None or not any(c in pattern for c in "*?"):
        return pattern
    out = []
    for c in pattern:
        out.append({"*": "%", "?": "_", "%": "\\%", "_": "\\_", "\\": "\\\\"}.get(c, c))
    return "".join(out)


def list_(url: str, filters: dict[str, Any], *, limit: int) -> int:
    from workers.status import age
    with transaction(url) as conn:
        counts = conn.execute(COUNTS_BY_REASON, filters).all()
        rows = conn.execute(NEWEST, {**filters, "limit": limit}).all()
    print("By reason:")
    _print(("REASON", "COUNT", "NEWEST"), [(r.reason, f"{r.n:,}", age(r.newest_seconds) + " ago") for r in counts])
    total = sum(r.n for r in counts)
    print(f"{_plural(total, 'ingress dead letter')}")
    if rows:
        print()
        print(f"Newest {len(rows)}:")
        _print(("ID", "AGE", "REASON", "BYTES", "TOPIC", "DETAIL"),
               [(r.id, age(r.age_seconds), r.reason,
                 f"{r.size:,}" + ("*" if r.size >= MAX_DEAD_LETTER_PAYLOAD else ""), r.topic, _one_line(r.detail))
                for r in rows])
        if any(r.size >= MAX_DEAD_LETTER_PAYLOAD for r in rows):
            print("* 64 KiB: payload may be truncated (cannot be re-driven)")
    return EXIT_OK


def show(url: str, dead_letter_id: str) -> int:
    from workers.status import age
    try:
        uuid.UUID(dead_letter_id)
    except ValueError:
        print(f"farmiq-edge dlq ingress show: not a dead letter id: {dead_letter_id!r}", file=sys.stderr)
        return EXIT_USAGE
    with transaction(url) as conn:
        r = conn.execute(SHOW_ONE, {"id": dead_letter_id}).one_or_none()
    if r is None:
        print(f"farmiq-edge dlq ingress show: no ingress dead letter {dead_letter_id}", file=sys.stderr)
        return EXIT_FAILURE
    payload = bytes(r.payload)
    fields = [("id", r.id), ("received", f"{r.received_at.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%SZ} "
                                         f"({age(r.age_seconds)} ago)"),
              ("reason", r.reason), ("detail", r.detail or "-"), ("topic", r.topic),
              ("payload bytes", f"{len(payload):,}" + (" (may be truncated at 64 KiB)"
                                                        if len(payload) >= MAX_DEAD_LETTER_PAYLOAD else ""))]
    for name, value in fields:
        print(f"{name + ':':<15} {value}")
    print()
    print(f"payload (first {SHOW_PAYLOAD_BYTES:,} bytes):" if len(payload) > SHOW_PAYLOAD_BYTES else "payload:")
    head = payload[:SHOW_PAYLOAD_BYTES]
    try:
        print(head.decode("utf-8"))
    except UnicodeDecodeError:
        print(head.hex(" ", 2))
    return EXIT_OK


class RedriveResult:
    def __init__(self) -> None:
        self.examined = 0
        self.redriven = 0
        self.truncated = 0
        self.still_failing: Counter[str] = Counter()


def redrive(settings: Settings, filters: dict[str, Any], *, page: int = PAGE) -> RedriveResult:
    from actors.broker import broker
    from actors.ingest import ingest_batch
    from models.messages import Rejected
    from models.queue_events import queue_form

    result = RedriveResult()
    after: tuple[Any, str] | None = None
    while True:
        with transaction(settings.database_url) as conn:  # commit point: one page
            rows = conn.execute(CLAIM_PAGE, {**filters, "page": page, "after_at": after and after[0],
                                             "after_id": after and after[1]}).all()
            if not rows:
                return result
            now = datetime.now(timezone.utc)
            passed, ids = [], []
            for r in rows:
                result.examined += 1
                verdict = revalidate(settings, r.topic, bytes(r.payload), r.reason, now)
                if isinstance(verdict, Rejected):
                    detail = verdict.detail
                    if len(r.payload) >= MAX_DEAD_LETTER_PAYLOAD:
                        result.truncated += 1
                        detail = f"{TRUNCATED_NOTE} ({detail})"
                    conn.execute(UPDATE_REASON, {"id": str(r.id), "reason": verdict.reason,
                                                 "detail": detail[:1000]})
                    result.still_failing[verdict.reason] += 1
                else:
                    passed.append(queue_form(verdict, bytes(r.payload)))  # as the bridge enqueues it
                    ids.append(str(r.id))
            last = rows[-1]
            after = (conn.execute(RECEIVED_AT, {"id": str(last.id)}).scalar_one(), str(last.id))
            if passed:
                with raw_cursor(conn) as cursor:
                    broker.enqueue_in(cursor, ingest_batch.message(passed))
                conn.execute(DELETE_REDRIVEN, {"ids": ids})
                result.redriven += len(passed)
        if len(rows) < page:
            return result


def revalidate(settings: Settings, topic: str, payload: bytes, old_reason: str, now: datetime) -> Any:
    """The event today's rules make of a dead letter, or the `Rejected` they raise."""
    from pydantic import ValidationError

    from models.messages import INGRESS_EVENTS, Rejected, parse_message
    try:
        return parse_message(topic, payload, now=now, max_clock_skew=settings.max_clock_skew,
                             media_max_bytes=settings.media_max_bytes,
                             max_payload_bytes=settings.max_payload_bytes)
    except Rejected as rejected:
        if old_reason != "session_conflict":
            return rejected
        # Written by the ingest actor: the payload is the normalized event.
        try:
            return INGRESS_EVENTS.validate_json(b"[" + payload + b"]")[0]
        except ValidationError:
            return rejected


def _one_line(text_: str, width: int = 80) -> str:
    flat = " ".join((text_ or "-").split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


def _print(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max([len(h)] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]
    for r in [headers, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")
