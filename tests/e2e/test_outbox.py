"""The outbox forwarder end to end (SPEC §3): real PostgreSQL, the real reference
cloud sink as a process, `farmiq-edge worker --queues outbox` and `scheduler`
processes, crashed with SIGKILL where a power cut would."""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_observability_and_scaling import sample, scrape
from actors.outbox import forward_outbox
from tests.support.processes import enqueue, scalar, wait_until
from tests.support.sink import SinkProcess, add_pending, outbox_env
from workers.dev.embedded import free_port
from workers.dev.processes import ROOT, EdgeProcess, edge_command


class Edge:
    """Forwarder and scheduler processes for one test, all stopped at its end."""

    def __init__(self, db_url: str, sink: SinkProcess, tmp: Path) -> None:
        self.db_url, self.sink, self.tmp = db_url, sink, tmp
        self.processes: list[EdgeProcess] = []

    def start(self, name: str, args: list[str], **env: str) -> EdgeProcess:
        proc = EdgeProcess(name, edge_command(*args), outbox_env(self.db_url, self.sink, **env),
                           self.tmp / f"{name}.log").start()
        self.processes.append(proc)
        return proc

    def forwarder(self, name: str = "outbox", **env: str) -> EdgeProcess:
        return self.start(name, ["worker", "--queues", "outbox"], **env)

    def scheduler(self, **env: str) -> EdgeProcess:
        return self.start("scheduler", ["scheduler"], **env)

    def stop_all(self) -> None:
        for proc in self.processes:
            proc.stop()


@pytest.fixture
def sink(tmp_path) -> Iterator[SinkProcess]:
    made = SinkProcess(tmp_path)
    yield made
    made.stop()


@pytest.fixture
def edge(db_url, sink, tmp_path) -> Iterator[Edge]:
    made = Edge(db_url, sink, tmp_path)
    yield made
    made.stop_all()


def statuses(db_url: str) -> dict[str, int]:
    import psycopg2
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status, count(*) FROM sync_outbox GROUP BY status")
            return dict(cur.fetchall())
    finally:
        conn.close()


def edge_ids(db_url: str, where: str = "true") -> set[str]:
    import psycopg2
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT id::text FROM sync_outbox WHERE {where}")
            return {r[0] for r in cur.fetchall()}
    finally:
        conn.close()


def all_acked(db_url: str, n: int) -> bool:
    return statuses(db_url).get("acked", 0) == n


def test_outage_then_503s_every_event_acked_once(db_url, sink, edge):
    n = 50_000
    add_pending(db_url, n, tenants=5, devices=100)
    sink.down()  # the link is gone: nothing listens
    # One batch in flight at a time, so "nothing sent during a Retry-After" is exact.
    edge.forwarder(EDGE_OUTBOX_CONCURRENCY="1")
    edge.scheduler()

    # Connection refused: every tenant's consecutive_failures rises, pauses grow.
    wait_until(lambda: scalar(db_url, "SELECT coalesce(min(consecutive_failures), 0) FROM sync_state") >= 3
               and scalar(db_url, "SELECT count(*) FROM sync_state") == 5, 120, "failures during the outage")
    assert scalar(db_url, "SELECT count(*) FROM sync_state WHERE pause_reason = 'network'") == 5
    failures_in_outage = scalar(db_url, "SELECT max(consecutive_failures) FROM sync_state")
    assert statuses(db_url).get("acked", 0) == 0

    # The link returns, answering 30% of batches 503 with Retry-After: 1.
    sink.faults(fail_rate=0.3, status=503, retry_after=1)
    sink.up()
    wait_until(lambda: all_acked(db_url, n), 300, f"all {n} events acked")

    assert statuses(db_url) == {"acked": n}  # nothing left pending, claimed, sent or failed
    ids = edge_ids(db_url)
    stored = {r[0] for r in sink.query("SELECT event_id FROM events")}
    assert stored == ids and len(stored) == n  # every event at the sink, by id, once
    assert sink.query("SELECT count(*) FROM events WHERE out_of_order = 1") == [(0,)]
    # consecutive_failures rose during the outage and returned to 0; no pause left.
    assert scalar(db_url, "SELECT max(consecutive_failures) FROM sync_state") == 0
    assert scalar(db_url, "SELECT count(*) FROM sync_state WHERE paused_until IS NOT NULL") == 0
    # 503s happened, and after each one that tenant sent nothing until Retry-After had passed.
    throttled = sink.query("SELECT tenant_id, answered_at, retry_after FROM batches WHERE status = 503")
    assert len(throttled) > 0
    for tenant, answered_at, retry_after in throttled:
        assert retry_after == 1
        early = sink.query("SELECT count(*) FROM batches WHERE tenant_id = ? AND received_at > ? "
                           "AND received_at < ?", (tenant, answered_at, answered_at + retry_after))
        assert early == [(0,)], (tenant, answered_at)
    # 503 answers are not failures (SPEC §3): their events were only re-counted.
    retried = scalar(db_url, "SELECT count(*) FROM sync_outbox WHERE attempt_count > 1")
    assert retried > 0
    print(f"\noutage: consecutive_failures up to {failures_in_outage} during the outage, 0 after; "
          f"{len(throttled)} batches answered 503 (Retry-After 1 s, honoured); {retried:,} events sent "
          f"more than once before their ack; {n:,} acked once, {len(stored):,} stored at the sink")


def test_link_probe_ends_a_long_pause(db_url, sink, edge):
    add_pending(db_url, 2_000, devices=10)
    sink.down()
    forwarder = edge.forwarder()
    edge.scheduler()
    # Backoff 1, 2, 4, 8 s (× jitter): after 5 failures the pause runs 8–16 s more.
    wait_until(lambda: (scalar(db_url, "SELECT max(consecutive_failures) FROM sync_state") or 0) >= 5, 120,
               "five consecutive failures")
    paused_until = scalar(db_url, "SELECT extract(epoch FROM paused_until) FROM sync_state")
    up_at = sink.up()
    wait_until(lambda: all_acked(db_url, 2_000), 120, "catch-up")
    first_ok = sink.query("SELECT min(received_at) FROM batches WHERE status = 200")[0][0]
    # The probe (GET /v1/edge/ping) ended the pause: catch-up began before the backoff ran out.
    assert up_at <= first_ok < float(paused_until)
    print(f"\nprobe: first batch accepted {first_ok - up_at:.2f} s after the sink came back; "
          f"the backoff alone would have paused until +{float(paused_until) - up_at:.1f} s")
    # Ended by the ping (event=outbox_link_up) or by the batch a paused tenant may try
    # as often as a ping (whichever of the forwarder's runs got there first).
    log = forwarder.log()
    assert "event=outbox_link_up" in log or "event=outbox_batch_ok" in log


def test_two_forwarders_never_share_an_event(db_url, sink, edge):
    n = 20_000
    add_pending(db_url, n, tenants=2, devices=40)
    sink.faults(latency_ms=20)  # longer batches overlap more
    small = {"EDGE_OUTBOX_BATCH_MAX_EVENTS": "100"}  # many batches: both processes get work
    a = edge.forwarder("outbox-a", **small)
    b = edge.forwarder("outbox-b", **small)
    # Ticks five times a second, not coalesced: with the scheduler's one tick at a time,
    # one forwarder could win every tick of a short drain and the other do nothing.
    def tick_then_check() -> bool:
        enqueue(db_url, forward_outbox.message())
        return all_acked(db_url, n)
    wait_until(tick_then_check, 300, f"all {n} events acked", interval=0.2)

    # Every event reached the sink in exactly one batch: none was in two batches,
    # overlapping or not.
    assert sink.query("SELECT count(*), count(DISTINCT event_id) FROM deliveries") == [(n, n)]
    assert sink.query("SELECT count(*) FROM events") == [(n,)]
    assert sink.query("SELECT count(*) FROM events WHERE out_of_order = 1") == [(0,)]
    assert "event=outbox_batch_ok" in a.log() and "event=outbox_batch_ok" in b.log()
    # The two processes' batches did run at the same time.
    overlapping = sink.query("""SELECT count(*) FROM batches x JOIN batches y
                                 ON x.batch_id < y.batch_id AND x.received_at < y.answered_at
                                AND y.received_at < x.answered_at""")
    assert overlapping[0][0] > 0
    batches = sink.query("SELECT count(*) FROM batches WHERE status = 200")[0][0]
    print(f"\ntwo forwarders: {n:,} events in {batches} batches, {overlapping[0][0]} overlapping pairs, "
          "every event in exactly one batch")


@pytest.mark.parametrize("point", ["outbox.after_post", "outbox.after_claim"])
def test_forwarder_killed_at_a_commit_point_loses_nothing(db_url, sink, edge, point):
    n = 3_000
    add_pending(db_url, n, devices=3)
    env = {"EDGE_OUTBOX_HTTP_TIMEOUT_SECONDS": "2", "EDGE_OUTBOX_VISIBILITY_SECONDS": "15"}
    crashing = edge.forwarder("outbox-crash", EDGE_CRASH_AT=point, **env)
    edge.scheduler()
    wait_until(lambda: not crashing.alive(), 60, f"the forwarder to die at {point}")
    claimed = edge_ids(db_url, "status = 'claimed'")
    assert len(claimed) == 1000 and statuses(db_url) == {"claimed": 1000, "pending": n - 1000}
    delivered = {r[0] for r in sink.query("SELECT event_id FROM deliveries")}
    # after_post: the batch reached the sink, the ack was never recorded; after_claim: nothing left.
    assert delivered == (claimed if point == "outbox.after_post" else set())

    edge.forwarder("outbox", **env)
    wait_until(lambda: all_acked(db_url, n), 120, "the claimed batch to come back and everything acked")
    assert sink.query("SELECT count(*) FROM events") == [(n,)]
    resent = dict(sink.query("SELECT event_id, count(*) FROM deliveries GROUP BY event_id"))
    assert all(resent[i] == (2 if point == "outbox.after_post" else 1) for i in claimed)
    assert sum(resent.values()) == n + (1000 if point == "outbox.after_post" else 0)


def test_rejected_events_fail_with_the_reason_and_redrive(db_url, sink, edge):
    add_pending(db_url, 3_000, tenants=2, devices=10)
    add_pending(db_url, 40, tenants=1, devices=4, event_type="media.stored", tenant_prefix="tenant")
    add_pending(db_url, 500, tenants=1, devices=5, tenant_prefix="other")
    sink.faults(reject_types=["media.stored"])
    metrics_port, scheduler_port = free_port(), free_port()
    edge.forwarder(EDGE_METRICS_PORT=str(metrics_port))
    edge.scheduler(EDGE_METRICS_PORT=str(scheduler_port))
    wait_until(lambda: statuses(db_url) == {"acked": 3_500, "failed": 40}, 120,
               "everything but the rejected type acked")
    metrics = scrape(metrics_port)
    assert sample(metrics, "farmiq_edge_outbox_events_total", result="acked") == 3_500
    assert sample(metrics, "farmiq_edge_outbox_events_total", result="failed") == 40
    assert sample(metrics, "farmiq_edge_outbox_batches_total", outcome="ok") >= 4
    assert sample(metrics, "farmiq_edge_outbox_batch_seconds_count") >= 4
    # What the outbox holds: database gauges the scheduler exports (workers/db_metrics.py).
    gauges = scrape(scheduler_port)
    assert sample(gauges, "farmiq_edge_outbox_backlog_events", status="failed") == 40
    assert sample(gauges, "farmiq_edge_outbox_backlog_events", status="pending") == 0
    assert sample(gauges, "farmiq_edge_outbox_paused_tenants") == 0
    reasons = scalar(db_url, "SELECT array_agg(DISTINCT last_error) FROM sync_outbox WHERE status = 'failed'")
    assert reasons == ["event type media.stored not accepted (sink --reject-type)"]
    assert edge_ids(db_url, "status = 'failed'") == edge_ids(db_url, "event_type = 'media.stored'")
    assert scalar(db_url, "SELECT count(*) FROM sync_state WHERE consecutive_failures = 0") == 3

    status = subprocess.run(edge_command("outbox", "status"), cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **outbox_env(db_url, sink)})
    assert status.returncode == 0
    assert "event type media.stored not accepted" in status.stdout

    sink.faults(reject_types=[])
    redrive = subprocess.run(edge_command("outbox", "redrive", "--all"), cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, **outbox_env(db_url, sink)})
    assert redrive.returncode == 0 and "40 failed outbox events set back to pending" in redrive.stdout
    wait_until(lambda: all_acked(db_url, 3_540), 60, "the re-driven events acked")
    assert sink.query("SELECT count(*) FROM events") == [(3_540,)]
