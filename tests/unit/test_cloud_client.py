"""How the forwarder reads the cloud's answers (SPEC §3), without a network."""

import json

import pytest

from actors.cloud_client import classify, parse_retry_after


def test_200_gives_acked_and_rejected_with_reasons():
    body = json.dumps({"acked": ["a", "b"], "rejected": [{"event_id": "c", "reason": "unknown device"}],
                       "extra": "ignored"}).encode()
    v = classify(200, None, body)
    assert (v.kind, v.acked, v.rejected) == ("ok", ["a", "b"], {"c": "unknown device"})


@pytest.mark.parametrize("body", [b"not json", b'{"rejected": []}', b'{"acked": "a"}'])
def test_a_200_that_is_not_the_documented_json_is_a_server_error(body):
    assert classify(200, None, body).kind == "server_error"


@pytest.mark.parametrize("status, retry_after, kind, wait", [
    (503, "7", "throttled", 7.0), (429, None, "throttled", None), (503, "soon", "throttled", None),
    (500, "7", "server_error", None), (502, None, "server_error", None),
    (401, None, "client_error", None), (400, None, "client_error", None), (404, None, "client_error", None),
])
def test_statuses(status, retry_after, kind, wait):
    v = classify(status, retry_after, b"")
    assert (v.kind, v.status, v.retry_after) == (kind, status, wait)
    assert v.error == f"http {status}"


@pytest.mark.parametrize("value, seconds", [("0", 0.0), ("2.5", 2.5), ("-1", None), ("", None),
                                            (None, None), ("Wed, 21 Oct 2026 07:28:00 GMT", None)])
def test_retry_after_in_seconds(value, seconds):
    assert parse_retry_after(value) == seconds
