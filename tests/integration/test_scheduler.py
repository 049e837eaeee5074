"""Scheduler slots and leadership (workers/scheduler.py) on a movable clock, no processes."""

import pytest

from actors.retention import retention_job
from tests.support.processes import SCHEDULED_SLOTS, scalar
from workers.scheduler import Job, Scheduler, jobs

T0 = 1_800_000_000.0  # a slot boundary for every interval used here


@pytest.fixture
def pair(db_url):
    table = [Job("every-2s", 2.0, retention_job, ("queue",)), Job("every-60s", 60.0, retention_job, ("dedupe",))]
    a, b = Scheduler(db_url, table, name="a"), Scheduler(db_url, table, name="b")
    yield a, b
    a.close()
    b.close()


def test_one_leader_and_one_message_per_slot(db_url, pair):
    a, b = pair
    assert a.try_lead() and not b.try_lead()
    assert [j for j, _ in a.tick(T0)] == ["every-2s", "every-60s"]
    assert a.tick(T0 + 1.9) == []              # same slots: nothing
    assert [j for j, _ in a.tick(T0 + 2.0)] == ["every-2s"]
    # Even a replica that wrongly believes it leads (a network split) cannot
    # send a slot twice: the slot row decides, in the enqueue's transaction.
    b.connect()
    assert b.tick(T0 + 2.5) == []
    assert [j for j, _ in b.tick(T0 + 4.0)] == ["every-2s"]
    assert a.tick(T0 + 4.1) == []
    slots = scalar(db_url, SCHEDULED_SLOTS)
    assert len(slots) == len(set(slots)) == 4


def test_the_standby_leads_when_the_leader_session_ends(db_url, pair):
    a, b = pair
    assert a.try_lead() and not b.try_lead()
    a.close()                                   # what a kill -9 does to its session
    assert b.try_lead()
    assert [j for j, _ in b.tick(T0)] == ["every-2s", "every-60s"]


def test_a_longer_interval_never_moves_a_slot_backwards(db_url):
    fast = Scheduler(db_url, [Job("j", 1.0, retention_job, ("queue",))])
    slow = Scheduler(db_url, [Job("j", 3600.0, retention_job, ("queue",))])
    try:
        assert fast.try_lead() and fast.tick(T0 + 7.0)
        fast.close()
        assert slow.try_lead()
        assert slow.tick(T0 + 8.0) == []        # the hour slot started before the last second slot
        assert slow.tick(T0 + 3600.0)
    finally:
        fast.close()
        slow.close()


def test_jobs_cover_every_maintenance_job():
    from actors.retention import JOBS
    names = [j.name for j in jobs()]
    assert len(names) == len(set(names)) and "aggregate" in names
    assert {f"retention.{job}" for job in JOBS} <= set(names)
    from workers.cli import build_parser
    assert [build_parser().parse_args(["retention", "run", "--job", job]).job for job in JOBS] == list(JOBS)

