"""Send a fuzz corpus through a running system and account for every message.

Used by `farmiq-edge bench fuzz` (`run_fuzz_bench`: its own scratch database,
private Mosquitto with the project config, real `bridge` and `worker --queues
ingest` processes) and by tests/e2e/test_fuzz.py (the e2e Pipeline).

Accounting, by marker and by event id:
- every bad message the broker delivers maps to exactly one row of
  ingress_dead_letters, with a reason from REJECT_REASONS, and (where main and
  SPEC agree, `Case.pending` empty) a reason from its `Case.expected`; its
  topic and payload (first 64 KiB) are the bytes sent;
- a topic Mosquitto refuses (`Case.refused`) gets no PUBACK, its connection is
  closed, and no dead letter or row names it;
- no dead letter without a marker (valid traffic is never dead-lettered);
- valid traffic is exact: every event id in ingress_dedupe, raw rows per
  (device, occurred_at) equal to its readings, one sync_outbox event per
  telemetry message and per session event (by source_event_id), one media
  hand-off per frame;
- no "Traceback" in any process log.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

from models.ingress_dead_letters import MAX_DEAD_LETTER_PAYLOAD
from models.messages import REJECT_REASONS
from workers.dev import mqtt_raw
from workers.dev.fuzz_corpus import TENANT, Case, Valid, markers_in

DUPLICATE_SHARE = 0.1  # valid messages published twice (a redelivery)


def interleave(cases: list[Case], valid: list[Valid], seed: int) -> list[Case | Valid]:
    rng = random.Random(f"stream:{seed}")
    stream: list[Case | Valid] = [*cases, *valid, *rng.sample(valid, int(len(valid) * DUPLICATE_SHARE))]
    rng.shuffle(stream)
    return stream


def send(mqtt_url: str, stream: list[Case | Valid], progress: Callable[[int], None] | None = None,
         qos0_every: int = 0) -> dict[int, bool]:
    """Publish everything in order (every `qos0_every`-th at QoS 0, else QoS 1); refused
    topics go on connections of their own. Returns {case seq: refused by the broker}
    for the refused-topic cases."""
    refused: dict[int, bool] = {}

    def deliverable():
        for n, item in enumerate(stream):
            if isinstance(item, Case) and item.refused:
                refused[item.seq] = mqtt_raw.publish_refused(mqtt_url, item.topic, item.payload)
                continue
            if progress and n % 1000 == 0:
                progress(n)
            yield item.topic, item.payload, 0 if qos0_every and n % qos0_every == 0 else 1

    mqtt_raw.publish_all(mqtt_url, deliverable())
    return refused


# --- checks ------------------------------------------------------------------------


@dataclass
class CategoryRow:
    sent: int = 0
    refused: int = 0                  # refused topics the broker closed without a PUBACK
    dead_lettered: int = 0            # exactly one dead letter
    accepted: int = 0                 # taken as a valid event (in ingress_dedupe)
    reasons: Counter = field(default_factory=Counter)

    def add(self, other: "CategoryRow") -> None:
        self.sent += other.sent
        self.refused += other.refused
        self.dead_lettered += other.dead_lettered
        self.accepted += other.accepted
        self.reasons.update(other.reasons)


@dataclass
class Outcome:
    rows: dict[str, CategoryRow]
    # (category, what went wrong) -> markers: every loss, duplicate, wrong reason;
    # `pending` holds those of the sub-cases main gets wrong (Case.pending).
    problems: dict[tuple[str, str], list[str]]
    pending: dict[tuple[str, str], list[str]]
    valid_problems: list[str]
    valid_summary: str
    tracebacks: dict[str, int]

    @property
    def ok(self) -> bool:
        return not (self.problems or self.pending or self.valid_problems or any(self.tracebacks.values()))

    def lines(self) -> list[str]:
        head = f"{'category':<20} {'sent':>6} {'refused':>8} {'dead-lettered':>14} {'accepted':>9}  reasons"
        out = [head]
        total = CategoryRow()
        for name, row in [*sorted(self.rows.items()), ("total", total)]:
            reasons = ", ".join(f"{r} {n}" for r, n in row.reasons.most_common())
            out.append(f"{name:<20} {row.sent:>6} {row.refused:>8} {row.dead_lettered:>14} {row.accepted:>9}  {reasons}")
            if row is not total:
                total.add(row)
        out.append(f"valid traffic: {self.valid_summary}")
        out.append("tracebacks in process logs: " + ", ".join(f"{k} {v}" for k, v in self.tracebacks.items()))
        for title, groups in (("PROBLEMS", self.problems), ("PENDING the issue 12 limits (SPEC vs main)", self.pending)):
            if groups:
                out.append(f"{title}: {len(set().union(*groups.values()))} messages")
                for (category, issue), markers in sorted(groups.items()):
                    out.append(f"  {category}: {issue}: {len(markers)} (e.g. {', '.join(markers[:3])})")
        out += [f"PROBLEM {p}" for p in self.valid_problems]
        out.append("RESULT: " + ("PASS" if self.ok else "FAIL"))
        return out


def _query(db_url: str, sql: str, params: tuple | dict = ()) -> list[tuple]:
    conn = psycopg2.connect(db_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def settled(db_url: str, cases: list[Case], valid: list[Valid]) -> bool:
    """Every deliverable bad message dead-lettered or accepted, every valid one accepted."""
    bad_ids = [c.event_id for c in cases if c.event_id and not c.refused]
    (dead, accepted_bad, accepted_valid, busy), = _query(db_url, """
        SELECT (SELECT count(*) FROM ingress_dead_letters),
               (SELECT count(*) FROM ingress_dedupe WHERE event_id::text = ANY(%(bad)s)),
               (SELECT count(*) FROM ingress_dedupe WHERE event_id::text = ANY(%(valid)s)),
               (SELECT count(*) FROM dramatiq.queue
                 WHERE queue_name = 'ingest' AND state IN ('queued', 'consumed'))""",
        {"bad": bad_ids, "valid": list({v.event_id for v in valid})})
    deliverable = sum(not c.refused for c in cases)
    return dead + accepted_bad >= deliverable and accepted_valid >= len({v.event_id for v in valid}) and busy == 0


def wait_settled(db_url: str, cases: list[Case], valid: list[Valid], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if settled(db_url, cases, valid):
            time.sleep(1.0)  # anything late (a duplicate dead letter) shows up in the checks
            return True
        time.sleep(0.5)
    return False


def verify(db_url: str, cases: list[Case], valid: list[Valid], refused: dict[int, bool],
           logs: dict[str, Path]) -> Outcome:
    rows: dict[str, CategoryRow] = defaultdict(CategoryRow)
    problems: dict[tuple[str, str], list[str]] = defaultdict(list)
    pending: dict[tuple[str, str], list[str]] = defaultdict(list)
    valid_problems: list[str] = []
    by_seq = {c.seq: c for c in cases}

    letters: dict[int, list[str]] = defaultdict(list)
    altered: set[int] = set()  # dead letters whose topic or payload differ from what was sent
    unmatched = 0
    conn = psycopg2.connect(db_url)
    try:
        with conn, conn.cursor(name="fuzz_dead_letters") as cur:
            cur.itersize = 500
            cur.execute("SELECT topic, payload, reason FROM ingress_dead_letters")
            for topic, payload, reason in cur:
                seqs = markers_in(topic.encode("utf-8", "surrogateescape"), bytes(payload))
                if len(seqs) != 1 or next(iter(seqs)) not in by_seq:
                    unmatched += 1
                    continue
                seq = next(iter(seqs))
                letters[seq].append(reason)
                sent = by_seq[seq]
                if bytes(payload) != sent.payload[:MAX_DEAD_LETTER_PAYLOAD] or topic != sent.topic.decode()[:1024]:
                    altered.add(seq)
    finally:
        conn.close()
    if unmatched:
        valid_problems.append(f"{unmatched} dead letters match no bad message (valid traffic dead-lettered?)")

    accepted_bad = {e for (e,) in _query(db_url, "SELECT event_id::text FROM ingress_dedupe "
                                                 "WHERE event_id::text = ANY(%s)",
                                         ([c.event_id for c in cases if c.event_id],))}
    for c in cases:
        row = rows[c.category]
        row.sent += 1
        got = letters.get(c.seq, [])
        issues = []
        if c.refused:
            if refused.get(c.seq):
                row.refused += 1
            else:
                issues.append("broker acknowledged a topic it should refuse")
            if got:
                issues.append(f"{len(got)} dead letters for a refused topic")
        else:
            if len(got) == 1:
                row.dead_lettered += 1
                row.reasons[got[0]] += 1
                if got[0] not in REJECT_REASONS:
                    issues.append(f"reason {got[0]!r} is not a REJECT_REASON")
                elif got[0] not in c.expected:
                    issues.append(f"reason {got[0]} (SPEC: {'/'.join(sorted(c.expected))})")
            else:
                issues.append(f"{len(got)} dead letters, want 1")
            if c.seq in altered:
                issues.append("dead letter's topic or payload differ from the bytes received")
            if c.event_id in accepted_bad:
                row.accepted += 1
                issues.append("accepted as a valid event")
        for issue in issues:
            if c.pending:
                pending[(c.category, f"{issue} [{c.pending}]")].append(c.marker)
            else:
                problems[(c.category, issue)].append(c.marker)

    summary = _check_valid(db_url, valid, valid_problems)
    tracebacks = {name: path.read_text(errors="replace").count("Traceback") if path.exists() else 0
                  for name, path in logs.items()}
    return Outcome(dict(rows), dict(problems), dict(pending), valid_problems, summary, tracebacks)


def _check_valid(db_url: str, valid: list[Valid], problems: list[str]) -> str:
    ids = {v.event_id for v in valid}
    found = {e for (e,) in _query(db_url, "SELECT event_id::text FROM ingress_dedupe WHERE event_id::text = ANY(%s)",
                                  (list(ids),))}
    if found != ids:
        problems.append(f"valid: {len(ids - found)} of {len(ids)} event ids not accepted")

    expected_rows = {(v.device_id, v.occurred_at): v.readings for v in valid if v.kind == "telemetry"}
    raw = {(d, t): n for d, t, n in _query(db_url, """
        SELECT device_id, occurred_at, count(*) FROM telemetry_raw
         WHERE tenant_id = %s AND device_id LIKE 'ok-%%' GROUP BY 1, 2""", (TENANT,))}
    if raw != expected_rows:
        wrong = {k for k in expected_rows.keys() | raw.keys() if raw.get(k) != expected_rows.get(k)}
        problems.append(f"valid: telemetry_raw differs for {len(wrong)} of {len(expected_rows)} messages")
    (bad_raw,), = _query(db_url, "SELECT count(*) FROM telemetry_raw WHERE device_id NOT LIKE 'ok-%%'")

    want_outbox = Counter((v.outbox_type, v.event_id) for v in {v.event_id: v for v in valid}.values()
                          if v.outbox_type)
    outbox = Counter({(t, e): n for t, e, n in _query(db_url, """
        SELECT event_type, payload_json->>'source_event_id', count(*) FROM sync_outbox GROUP BY 1, 2""")})
    valid_outbox = Counter({k: n for k, n in outbox.items() if k[1] in ids})
    if valid_outbox != want_outbox:
        problems.append(f"valid: sync_outbox differs for {len(set(valid_outbox) ^ set(want_outbox))} "
                        f"of {len(want_outbox)} events")

    frames = {v.event_id for v in valid if v.kind == "media"}
    handed = Counter(e for (e,) in _query(db_url, """
        SELECT message->'kwargs'->'event'->>'event_id' FROM dramatiq.queue WHERE queue_name = 'media'"""))
    # At least once: a frame delivered again in a later batch is handed off again
    # (the media actor removes the bridge's re-spooled copy; actors/ingest.py).
    if set(handed) != frames:
        problems.append(f"valid: media hand-offs {sum(handed[e] for e in frames)} for {len(frames)} frames")
    kinds = Counter(v.kind for v in {v.event_id: v for v in valid}.values())
    return (f"{len(found)}/{len(ids)} event ids accepted ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}), "
            f"telemetry_raw {sum(raw.values())}/{sum(expected_rows.values())} rows, "
            f"sync_outbox {sum(valid_outbox.values())}/{sum(want_outbox.values())} events, "
            f"media hand-offs {sum(handed[e] for e in frames)}/{len(frames)}; "
            f"rows from bad messages: telemetry_raw {bad_raw}, outbox {sum(outbox.values()) - sum(valid_outbox.values())}")
