"""The cloud sync API as the forwarder sees it (SPEC §3): one POST, one ping, one verdict.

A kept urllib3 pool per process (connection reuse, connect and read timeouts,
no hidden retries: the forwarder decides what a failure means). Made on first
use in each process, never across a fork. Bodies over 1 KiB go gzip'd.

Every answer becomes a `Verdict`:
- `ok`: 200 with `acked` and `rejected` lists;
- `throttled`: 429/503, with Retry-After seconds when given (SPEC: back off,
  nothing changes but attempt_count/last_attempt_at);
- `server_error` (other 5xx, or a 200 that is not the documented JSON) and
  `network` (no answer): back off, the link probe may end the pause;
- `client_error` (other statuses, e.g. 401): back off without probing.
"""

import gzip
import os
import threading
from dataclasses import dataclass, field

import urllib3
from pydantic import BaseModel, ConfigDict, ValidationError

GZIP_OVER_BYTES = 1024
GZIP_LEVEL = 1  # outbox JSON compresses ~8× at level 1; higher levels cost CPU for little
CONNECT_TIMEOUT_SECONDS = 5.0
PING_TIMEOUT_SECONDS = 2.0
BATCH_PATH, PING_PATH = "/v1/edge/events:batch", "/v1/edge/ping"
REASON_MAX_CHARS = 1000


class _Rejected(BaseModel):
    # The cloud may add fields; the ones SPEC §3 names must be there.
    model_config = ConfigDict(extra="ignore", frozen=True)
    event_id: str
    reason: str


class BatchAnswer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    acked: list[str]
    rejected: list[_Rejected] = []


@dataclass
class Verdict:
    kind: str  # ok | throttled | server_error | client_error | network
    status: int | None = None
    retry_after: float | None = None
    acked: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # event_id -> reason
    error: str = ""  # for logs and sync_state.last_error: a status or an exception class


class CloudClient:
    def __init__(self, base_url: str, token: str, timeout_seconds: float, pool_size: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.timeout = urllib3.Timeout(connect=min(CONNECT_TIMEOUT_SECONDS, timeout_seconds),
                                       read=timeout_seconds)
        self.http = urllib3.PoolManager(num_pools=2, maxsize=pool_size + 1, block=False,
                                        retries=False, timeout=self.timeout)

    def post_batch(self, batch_id: str, body: bytes) -> Verdict:
        headers = {**self.headers, "Idempotency-Key": batch_id}
        if len(body) > GZIP_OVER_BYTES:
            body = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
            headers["Content-Encoding"] = "gzip"
        try:
            response = self.http.request("POST", self.base_url + BATCH_PATH, body=body, headers=headers)
        except urllib3.exceptions.HTTPError as exc:
            return Verdict("network", error=f"network: {type(exc).__name__}")
        return classify(response.status, response.headers.get("Retry-After"), response.data)

    def ping(self) -> bool:
        """The link probe: True when GET /v1/edge/ping answers 200."""
        try:
            response = self.http.request("GET", self.base_url + PING_PATH, headers=self.headers,
                                         timeout=urllib3.Timeout(connect=PING_TIMEOUT_SECONDS,
                                                                 read=PING_TIMEOUT_SECONDS))
        except urllib3.exceptions.HTTPError:
            return False
        return response.status == 200


def classify(status: int, retry_after: str | None, data: bytes) -> Verdict:
    if status == 200:
        try:
            answer = BatchAnswer.model_validate_json(data)
        except ValidationError:
            return Verdict("server_error", status, error="http 200: not the documented JSON")
        return Verdict("ok", status, acked=answer.acked,
                       rejected={r.event_id: r.reason[:REASON_MAX_CHARS] for r in answer.rejected})
    if status in (429, 503):
        return Verdict("throttled", status, retry_after=parse_retry_after(retry_after), error=f"http {status}")
    if status >= 500:
        return Verdict("server_error", status, error=f"http {status}")
    return Verdict("client_error", status, error=f"http {status}")


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (SPEC §3 uses the seconds form); None when absent or not a number."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds <= 86_400 else None


_clients: dict[tuple[int, str], CloudClient] = {}
_clients_lock = threading.Lock()


def client_for(base_url: str, token: str, timeout_seconds: float, pool_size: int) -> CloudClient:
    """This process's kept client (a pool must never cross a fork)."""
    key = (os.getpid(), base_url)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = CloudClient(base_url, token, timeout_seconds, pool_size)
        return _clients[key]
