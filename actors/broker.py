"""The queue store: dramatiq's broker over PostgreSQL, and the process-wide broker.

Every actor module imports this module first (dramatiq rule: the broker is set
before any @actor).

Decision. We keep dramatiq (workers, middleware, Retries, actors, the CLI) and
dramatiq-pg's table, `dramatiq.queue`, so operator tools and the stock CLI
keep working; we replace dramatiq-pg's consumer and enqueue, because their
design cannot be made safe for scaled replicas: the stock consumer ties every
in-flight message to a session advisory lock, lists unfinished ids and then
claims them one by one, and keeps delayed messages in worker memory. Under
replicas and retries that leaked locks until PostgreSQL's lock table (the edge's
only database) was exhausted, and a stale id list left messages unclaimable.
The claim protocol here is the one the PostgreSQL queues that scale use
(River, procrastinate, pgmq): see `actors/queue_consumer.py` for claim, lease
and ack. This module adds:

- Delays without a delay queue: `enqueue(message, delay=…)` writes the message
  into its own queue with a due time; Retries' backoff waits in the table,
  not in memory, and holds nothing. No "<queue>.DQ" consumers exist.
- `enqueue_in(cursor, message)`: the queue row (and its NOTIFY, which
  PostgreSQL delivers at COMMIT) goes into the caller's transaction, so a
  hand-off commits atomically with the data (`enqueue_new_in`: the same by
  COPY, for the bridge's large new messages).
- One connection per thread that enqueues, opened on first use: sized by the
  real number of threads whatever CLI started the worker, never a PoolError.
- A consumer keeps one id per queue and process, so a consumer dramatiq
  restarts in-process keeps the lease of the messages its threads still hold.
- Rejected messages stay for `farmiq-edge dlq`; acked ones are deleted.

Building the broker opens no connection (every connection is made on first
use, in the process and thread that uses it), so importing an actor module for
a constant costs nothing, needs no database, and nothing crosses a fork.
"""

import io
import logging
import os
import threading
import time
import uuid

import dramatiq
import orjson
import psycopg2
from dramatiq.errors import ConnectionError as DramatiqConnectionError
from dramatiq.errors import DecodeError
from dramatiq.message import Message
from dramatiq.middleware import (AgeLimit, Callbacks, Pipelines, Prometheus, Retries,
                                 ShutdownNotifications, TimeLimit)
from psycopg2.extras import Json

import actors.log_hygiene  # noqa: F401 - no payloads or SQL values in dramatiq's logs, in every worker
from actors.queue_dead_letters import DeadLetters, retry_unless_permanent
from actors.gc_tuning import GcTuning
from actors.queue_consumer import EdgeConsumer
from models.settings import Settings, get_settings

log = logging.getLogger(__name__)

# enqueue: a new message, or a retried one coming back (same id) with its new
# body and due time; any earlier claim on it is void.
ENQUEUE = """
    INSERT INTO dramatiq.queue (queue_name, message_id, state, message, due_at)
    VALUES (%(queue)s, %(id)s, 'queued', %(message)s, now() + make_interval(secs => %(delay)s))
    ON CONFLICT (message_id) DO UPDATE
       SET queue_name = EXCLUDED.queue_name, state = 'queued', message = EXCLUDED.message,
           due_at = EXCLUDED.due_at, mtime = now(), consumer_id = NULL, claim_id = NULL
"""
# enqueue_new: a new message, due now (due_at and mtime default to now()).
COPY_NEW = "COPY dramatiq.queue (queue_name, message_id, state, message, received) FROM STDIN"
# wake: idle consumers of the queue LISTEN here (one NOTIFY per transaction and channel).
WAKE = "SELECT pg_notify(%(channel)s, '')"


def wake_channel(queue_name: str) -> str:
    return f"dramatiq.{queue_name}.enqueue"


class EdgeBroker(dramatiq.Broker):
    def __init__(self, *, url: str, middleware=None) -> None:
        super().__init__(middleware=middleware)
        self.url = url
        self._local = threading.local()
        self._consumer_ids: dict[tuple[int, str], uuid.UUID] = {}
        self._connections: list = []

    # -- dramatiq.Broker ------------------------------------------------------

    def declare_queue(self, queue_name: str) -> None:
        # No delay queue is declared: delayed messages wait in their own queue's rows.
        if queue_name not in self.queues:
            self.emit_before("declare_queue", queue_name)
            self.queues[queue_name] = True
            self.emit_after("declare_queue", queue_name)

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 30000) -> EdgeConsumer:
        consumer_id = self._consumer_ids.setdefault((os.getpid(), queue_name), uuid.uuid4())
        return EdgeConsumer(url=self.url, queue_name=queue_name, prefetch=prefetch, timeout=timeout,
                            consumer_id=consumer_id)

    def enqueue(self, message: Message, *, delay: int | None = None) -> Message:
        """Enqueue in a transaction of its own (one retry on a dropped connection)."""
        for attempt in (1, 2):
            conn = self._thread_connection()
            try:
                with conn, conn.cursor() as cursor:
                    return self.enqueue_in(cursor, message, delay=delay)
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                self._drop_thread_connection()
                if attempt == 2:
                    raise DramatiqConnectionError(f"enqueue failed: {type(exc).__name__}") from exc
        raise AssertionError("unreachable")

    def enqueue_in(self, cursor, message: Message, *, delay: int | None = None) -> Message:
        """Enqueue `message` inside the transaction that owns `cursor`.

        Commit point: the queue row and its NOTIFY become visible only when the
        caller commits; a rollback leaves no message behind.
        """
        self.emit_before("enqueue", message, delay)
        cursor.execute(ENQUEUE, {"queue": message.queue_name, "id": message.message_id,
                                 "message": _body(message), "delay": (delay or 0) / 1000})
        if not delay:  # a delayed message is claimed by the consumers' periodic wake-up
            cursor.execute(WAKE, {"channel": wake_channel(message.queue_name)})
        self.emit_after("enqueue", message, delay)
        return message

    def enqueue_new_in(self, cursor, message: Message, *, received: bytes = b"") -> Message:
        """`enqueue_in` for a message just made (a new id, no delay), by COPY,
        with the payloads its events were parsed from (`received`, read only for
        a dead letter: schema/migrations/0010_queue_body_storage.sql).

        The bridge's batches are ~130 KB of JSON: as a COPY line the body is
        sent as encoded, instead of being quoted into an SQL literal that
        PostgreSQL then has to lex. A message that is not new would violate
        the primary key (no ON CONFLICT here): use `enqueue_in` for those.
        """
        if not isinstance(dramatiq.get_encoder(), dramatiq.JSONEncoder):
            raise TypeError("enqueue_new_in needs a JSON encoder")
        self.emit_before("enqueue", message, None)
        # COPY text format: JSON text holds no raw tab, newline or carriage
        # return (JSON escapes them), so doubling backslashes is all it needs;
        # bytea goes as hex (\x…, its backslash doubled too), none as \N.
        line = b"\t".join([message.queue_name.encode(), message.message_id.encode(), b"queued",
                           message.encode().replace(b"\\", b"\\\\"),
                           b"\\\\x" + received.hex().encode() if received else b"\\N"]) + b"\n"
        cursor.copy_expert(COPY_NEW, io.BytesIO(line), size=len(line))
        cursor.execute(WAKE, {"channel": wake_channel(message.queue_name)})
        self.emit_after("enqueue", message, None)
        return message

    def flush(self, queue_name: str) -> None:
        conn = self._thread_connection()
        with conn, conn.cursor() as cursor:
            cursor.execute("DELETE FROM dramatiq.queue WHERE queue_name = %s AND state <> 'rejected'",
                           (queue_name,))

    def join(self, queue_name: str, *, timeout: int | None = None) -> None:
        """Wait until `queue_name` has no queued or claimed message (tests, benchmarks)."""
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        conn = self._thread_connection()
        while True:
            with conn, conn.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM dramatiq.queue"
                               " WHERE queue_name = %s AND state IN ('queued', 'consumed')", (queue_name,))
                if cursor.fetchone()[0] == 0:
                    return
            if deadline is not None and time.monotonic() > deadline:
                raise dramatiq.errors.QueueJoinTimeout(queue_name)
            time.sleep(0.05)

    def flush_all(self) -> None:
        for queue_name in self.queues:
            self.flush(queue_name)

    def close(self) -> None:
        for conn in self._connections:
            if not conn.closed:
                conn.close()
        self._connections.clear()

    # -- connections of enqueueing threads -------------------------------------

    def _thread_connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or getattr(self._local, "pid", None) != os.getpid():
            conn = psycopg2.connect(self.url, application_name="farmiq-edge enqueue", connect_timeout=5)
            self._local.conn, self._local.pid = conn, os.getpid()
            self._connections.append(conn)
        return conn

    def _drop_thread_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            conn.close()
        self._local.conn = None


class OrjsonEncoder(dramatiq.JSONEncoder):
    """dramatiq's JSON encoding, by orjson: the bridge encodes a ~300 KB message
    per micro-batch, several times faster than with the json module."""

    def encode(self, data: dict) -> bytes:
        return orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)

    def decode(self, data: bytes) -> dict:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DecodeError("failed to decode message", data, exc) from None


def _body(message: Message):
    # The JSON encoder's text goes in as is (a string literal becomes the json
    # column's value): encoding once, not encode → decode → encode.
    if isinstance(dramatiq.get_encoder(), dramatiq.JSONEncoder):
        return message.encode().decode()
    return Json(message.asdict())


def edge_middleware(settings: Settings) -> list:
    # after_* hooks run in reverse order: DeadLetters, listed before Retries,
    # sees Retries' verdict on a failed message.
    middleware = [GcTuning(), AgeLimit(), TimeLimit(), ShutdownNotifications(), Callbacks(), Pipelines(),
                  DeadLetters(), Retries(max_retries=10, min_backoff=500, max_backoff=300_000,
                                         retry_when=retry_unless_permanent(10))]
    if settings.metrics_port:
        # Its port and multiprocess directory are read from the environment
        # at import; `farmiq-edge worker` sets them before dramatiq starts.
        middleware.insert(0, Prometheus())
    return middleware


def build_broker(settings: Settings) -> EdgeBroker:
    return EdgeBroker(url=settings.database_url, middleware=edge_middleware(settings))


broker = build_broker(get_settings())
dramatiq.set_broker(broker)
dramatiq.set_encoder(OrjsonEncoder())
