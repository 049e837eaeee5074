"""The retry policy: transient failures are retried, permanent ones dead-lettered at once, with a reason."""

import dramatiq
import pytest
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries

from actors.queue_dead_letters import DeadLetters, PermanentError, retry_unless_permanent


@pytest.fixture
def stub():
    broker = StubBroker(middleware=[DeadLetters(), Retries(max_retries=3, min_backoff=1, max_backoff=5,
                                                           retry_when=retry_unless_permanent(3))])
    broker.emit_after("process_boot")
    worker = Worker(broker, worker_timeout=50)
    worker.start()
    yield broker
    worker.stop()
    broker.close()


def test_permanent_error_is_dead_lettered_without_retries(stub):
    calls = []

    @dramatiq.actor(broker=stub, queue_name="t")
    def bad(x):
        calls.append(x)
        raise PermanentError("payload can never be ingested")

    bad.send(1)
    stub.join("t", fail_fast=False)
    assert calls == [1]
    [dead] = stub.dead_letters
    assert dead.options["dead_letter_reason"] == "PermanentError: payload can never be ingested"


def test_transient_errors_are_retried_then_succeed(stub):
    calls = []

    @dramatiq.actor(broker=stub, queue_name="t")
    def flaky(x):
        calls.append(x)
        if len(calls) < 3:
            raise ConnectionError("database restarting")

    flaky.send(1)
    stub.join("t", fail_fast=False)
    assert calls == [1, 1, 1] and stub.dead_letters == []


def test_retries_are_bounded(stub):
    calls = []

    @dramatiq.actor(broker=stub, queue_name="t")
    def down(x):
        calls.append(x)
        raise ConnectionError("still down")

    down.send(1)
    stub.join("t", fail_fast=False)
    assert len(calls) == 4  # the first attempt and three retries
    assert stub.dead_letters[0].options["dead_letter_reason"] == "ConnectionError: still down"
