"""The reference cloud sink (`farmiq-edge cloud-sink`) holds the edge to SPEC §3."""

import gzip
import json
import uuid
from collections.abc import Iterator

import pytest
import urllib3

from tests.support.sink import TOKEN, SinkProcess

http = urllib3.PoolManager(retries=False, timeout=10)


@pytest.fixture
def sink(tmp_path) -> Iterator[SinkProcess]:
    made = SinkProcess(tmp_path)
    yield made
    made.stop()


def event(**changes: object) -> dict:
    e = {"event_id": str(uuid.uuid4()), "tenant_id": "t1", "farm_id": "f1", "barn_id": "b1",
         "device_id": "d1", "session_id": None, "event_type": "telemetry.aggregated",
         "occurred_at": "2026-11-27T10:00:00+00:00", "trace_id": None, "payload": {"count": 1}}
    e.update(changes)
    return e


def post(sink: SinkProcess, events: list[dict], *, token: str = TOKEN, compress: bool | None = None,
         key: str | None = None, batch_id: str | None = None) -> tuple[int, dict, urllib3.HTTPResponse]:
    batch_id = batch_id or str(uuid.uuid4())
    body = json.dumps({"edge_id": "e1", "batch_id": batch_id, "events": events}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}",
               "Idempotency-Key": key or batch_id}
    if compress if compress is not None else len(body) > 1024:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    r = http.request("POST", sink.url + "/v1/edge/events:batch", body=body, headers=headers)
    return r.status, json.loads(r.data), r


def test_stores_each_event_once_and_acks_repeats(sink):
    events = [event(occurred_at=f"2026-11-27T10:00:0{i}+00:00") for i in range(3)]
    assert post(sink, events)[:2] == (200, {"acked": [e["event_id"] for e in events], "rejected": []})
    status, answer, _ = post(sink, events[1:] + [event(occurred_at="2026-11-27T10:00:09+00:00")])
    assert status == 200 and len(answer["acked"]) == 3
    assert sink.query("SELECT count(*) FROM events") == [(4,)]
    assert sink.query("SELECT count(*) FROM deliveries") == [(6,)]
    assert sink.query("SELECT count(*) FROM bodies") == [(2,)]
    # A device's event older than one already stored is flagged out of order.
    post(sink, [event(occurred_at="2026-11-27T09:00:00+00:00")])
    assert sink.query("SELECT count(*) FROM events WHERE out_of_order = 1") == [(1,)]


@pytest.mark.parametrize("case, status", [
    ("bad token", 401), ("large body without gzip", 400), ("gzip header, plain body", 400),
    ("key differs from batch_id", 400), ("unknown event field", 400), ("time not RFC 3339", 400),
])
def test_rejects_what_spec_forbids(sink, case, status):
    if case == "bad token":
        got = post(sink, [event()], token="nope")
    elif case == "large body without gzip":
        got = post(sink, [event(payload={"x": "y" * 2000})], compress=False)
    elif case == "gzip header, plain body":
        body = json.dumps({"edge_id": "e", "batch_id": "b", "events": [event()]}).encode()
        r = http.request("POST", sink.url + "/v1/edge/events:batch", body=body, headers={
            "Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "b", "Content-Encoding": "gzip"})
        got = (r.status,)
    elif case == "key differs from batch_id":
        got = post(sink, [event()], key="other")
    elif case == "unknown event field":
        got = post(sink, [event(extra=1)])
    else:
        got = post(sink, [event(occurred_at="yesterday")])
    assert got[0] == status
    assert sink.query("SELECT count(*) FROM events") == [(0,)]
    assert sink.query("SELECT status FROM batches") == [(status,)]


def test_faults_on_demand(sink):
    sink.faults(reject_types=["media.stored"])
    ok, bad = event(), event(event_type="media.stored", device_id="d2")
    status, answer, _ = post(sink, [ok, bad])
    assert status == 200 and answer["acked"] == [ok["event_id"]]
    assert answer["rejected"] == [{"event_id": bad["event_id"],
                                   "reason": "event type media.stored not accepted (sink --reject-type)"}]

    sink.faults(fail_rate=1.0, status=503, retry_after=3)
    status, _, response = post(sink, [event()])
    assert (status, response.headers["Retry-After"]) == (503, "3")

    assert http.request("GET", sink.url + "/v1/edge/ping").status == 200
    sink.down()
    with pytest.raises(urllib3.exceptions.HTTPError):  # nothing listens: the link is gone
        urllib3.PoolManager(retries=False, timeout=5).request("GET", sink.url + "/v1/edge/ping")
    assert sink.stats()["down"] is True
    sink.up()
    assert http.request("GET", sink.url + "/v1/edge/ping").status == 200
