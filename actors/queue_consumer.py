"""A consumer of one queue in one worker process: claim, lease, ack.

No advisory lock, no per-message session state in PostgreSQL:

- Claim: one statement takes up to `room` due messages with
  `FOR UPDATE SKIP LOCKED`, stamps them with this consumer's id and a fresh
  claim id, and returns their bodies. Nothing is read that is not claimed,
  and two consumers never claim the same message.
- Lease: the consumer refreshes its row in `dramatiq.consumers` every
  HEARTBEAT_SECONDS. Every consumer sweeps its queue every SWEEP_SECONDS: a
  message claimed by a consumer whose heartbeat is older than LEASE_SECONDS
  goes back to 'queued'. So a kill -9 returns a consumer's messages to the
  queue within LEASE_SECONDS + SWEEP_SECONDS (12 s).
- Ack: the row is deleted (done rows do not stay). Acks and nacks arrive from
  worker threads; they are buffered and written by the consumer thread in one
  statement per batch (half the window, before the next claim, or after
  ACK_DELAY). A crash before that write means
  the message runs again (at-least-once; actors are idempotent). An ack or
  nack applies only to the claim it was given for (`claim_id`): a message that
  Retries has already put back, or that the sweep gave to another consumer, is
  left alone.
- Connection loss: the consumer reconnects by itself within RECONNECT_MAX_SECONDS
  and keeps its buffered acks; it never raises dramatiq's ConnectionError, whose
  restart would cost CONSUMER_RESTART_DELAY (3 s) and drop the acks in hand.
"""

import logging
import os
import select
import socket
import threading
import time
import uuid
from collections import deque

import orjson
import psycopg2
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.message import Message
from psycopg2.extras import Json, register_default_json

log = logging.getLogger("farmiq_edge.queue")

HEARTBEAT_SECONDS = 2.0
LEASE_SECONDS = 10.0
SWEEP_SECONDS = 2.0
RECONNECT_MAX_SECONDS = 0.5
# Longest an ack waits in memory before it is written (unless a batch fills first).
ACK_DELAY = 0.05
# Messages held (claimed, not yet acked) at least, when dramatiq's prefetch
# (2 × threads) is smaller: claims and acks are written in batches of about half.
MIN_PREFETCH = 32

# claim: up to n due messages of a queue, oldest due first, for this consumer.
CLAIM = """
    UPDATE dramatiq.queue
       SET state = 'consumed', consumer_id = %(consumer)s,
           claim_id = nextval('dramatiq.queue_claim_seq'), mtime = now()
     WHERE message_id IN (SELECT message_id
                            FROM dramatiq.queue
                           WHERE queue_name = %(queue)s AND state = 'queued' AND due_at <= now()
                           ORDER BY due_at
                           LIMIT %(n)s
                             FOR UPDATE SKIP LOCKED)
 RETURNING claim_id, due_at, message
"""
# ack: processed messages leave the table (only the claims we were given).
ACK = """
    DELETE FROM dramatiq.queue
     WHERE message_id = ANY(%(ids)s::uuid[]) AND claim_id = ANY(%(claims)s::bigint[])
"""
# nack: keep the message, with the reason dramatiq stored in its options, for `farmiq-edge dlq`.
NACK = """
    UPDATE dramatiq.queue
       SET state = 'rejected', message = %(message)s, consumer_id = NULL, mtime = now()
     WHERE message_id = %(id)s AND claim_id = %(claim)s
"""
# requeue: messages claimed but not processed (worker shutdown) are due again at once.
REQUEUE = """
    UPDATE dramatiq.queue
       SET state = 'queued', consumer_id = NULL, claim_id = NULL, mtime = now()
     WHERE message_id = ANY(%(ids)s::uuid[]) AND claim_id = ANY(%(claims)s::bigint[])
"""
# heartbeat: this consumer is alive.
HEARTBEAT = """
    INSERT INTO dramatiq.consumers (consumer_id, queue_name, hostname, pid)
    VALUES (%(consumer)s, %(queue)s, %(host)s, %(pid)s)
    ON CONFLICT (consumer_id) DO UPDATE SET beat_at = now()
"""
# sweep_dead: forget consumers whose lease ran out …
SWEEP_DEAD_CONSUMERS = """
    DELETE FROM dramatiq.consumers WHERE beat_at < now() - make_interval(secs => %(lease)s)
"""
# … and put back what they (or a consumer with no row at all) had claimed.
SWEEP_ORPHANS = """
    UPDATE dramatiq.queue AS q
       SET state = 'queued', consumer_id = NULL, claim_id = NULL, mtime = now()
     WHERE q.queue_name = %(queue)s AND q.state = 'consumed'
       AND NOT EXISTS (SELECT 1 FROM dramatiq.consumers AS c WHERE c.consumer_id = q.consumer_id)
"""
# leave: a consumer that stops cleanly removes its row.
LEAVE = "DELETE FROM dramatiq.consumers WHERE consumer_id = %(consumer)s"


class ClaimedMessage(MessageProxy):
    def __init__(self, message: Message, claim_id: int) -> None:
        super().__init__(message)
        self.claim_id = claim_id


class EdgeConsumer(Consumer):
    def __init__(self, *, url: str, queue_name: str, prefetch: int, timeout: int,
                 consumer_id: uuid.UUID) -> None:
        self.url = url
        self.queue_name = queue_name
        self.prefetch = max(prefetch, MIN_PREFETCH)
        self.timeout = timeout / 1000
        self.consumer_id = str(consumer_id)
        self.conn = None
        self.ready: deque[ClaimedMessage] = deque()  # claimed, not yet handed to dramatiq
        self.lock = threading.Lock()
        self.held = 0  # claimed and not yet acked, nacked or requeued
        self.acks: list[tuple[str, int]] = []
        self.nacks: list[ClaimedMessage] = []
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.first_ack_at = 0.0
        self.last_beat = self.last_sweep = 0.0
        self.failures = 0

    # -- dramatiq's consumer thread ------------------------------------------

    def __next__(self) -> ClaimedMessage | None:
        if self.ready:
            return self.ready.popleft()
        try:
            conn = self._connection()
            self._keep_lease(conn)
            with self.lock:
                held, acks = self.held, len(self.acks) + len(self.nacks)
            room = self.prefetch - held
            # Claim in batches: once half the window is free (or all of it).
            claim = room > 0 and (held == 0 or room >= self.prefetch // 2)
            if claim or acks >= self.prefetch // 2 or (acks and time.monotonic() - self.first_ack_at > ACK_DELAY):
                self._flush(conn)
            if claim:
                self._claim(conn, room)
            if self.ready:
                return self.ready.popleft()
            self._wait(conn)
            self.failures = 0
        except psycopg2.Error as exc:
            self._lost(exc)
        return None

    def _connection(self):
        if self.conn is None or self.conn.closed:
            self.conn = psycopg2.connect(self.url, application_name=f"farmiq-edge consumer {self.queue_name}",
                                         connect_timeout=5)
            self.conn.autocommit = True
            # Message bodies (json, ~400 KB for a full ingest batch) decoded by orjson.
            register_default_json(self.conn, loads=orjson.loads)
            with self.conn.cursor() as cur:
                # Claims, acks and heartbeats need no fsync before we go on: if
                # PostgreSQL itself crashes, a lost ack or claim only means the
                # message runs again (at-least-once). Enqueues are not affected.
                cur.execute("SET synchronous_commit = off")
                cur.execute(f'LISTEN "dramatiq.{self.queue_name}.enqueue"')
            self.last_beat = 0.0  # announce ourselves at once
            if self.failures:
                log.info("event=queue_reconnected queue=%s", self.queue_name)
        return self.conn

    def _claim(self, conn, room: int) -> None:
        with conn.cursor() as cur:
            cur.execute(CLAIM, {"consumer": self.consumer_id, "queue": self.queue_name, "n": room})
            rows = cur.fetchall()
        with self.lock:
            self.held += len(rows)
        # RETURNING keeps no order: hand them out oldest due first.
        rows.sort(key=lambda row: (row[1], row[2].get("message_timestamp", 0)))
        for claim_id, _, body in rows:
            message = Message(**body)
            message.options.pop("eta", None)  # due time is the row's; dramatiq must not delay it again
            self.ready.append(ClaimedMessage(message, claim_id))

    def _flush(self, conn) -> None:
        """Write buffered acks and nacks (commit point of 'processed')."""
        with self.lock:
            acks, self.acks = self.acks, []
            nacks, self.nacks = self.nacks, []
        try:
            with conn.cursor() as cur:
                if acks:
                    cur.execute(ACK, {"ids": [a[0] for a in acks], "claims": [a[1] for a in acks]})
                for m in nacks:
                    cur.execute(NACK, {"message": Json(m._message.asdict()), "id": m.message_id,
                                       "claim": m.claim_id})
        except psycopg2.Error:
            with self.lock:  # keep them for the next connection: they were processed
                self.acks[:0] = acks
                self.nacks[:0] = nacks
            raise

    def _keep_lease(self, conn) -> None:
        now = time.monotonic()
        if now - self.last_beat >= HEARTBEAT_SECONDS:
            with conn.cursor() as cur:
                cur.execute(HEARTBEAT, {"consumer": self.consumer_id, "queue": self.queue_name,
                                        "host": socket.gethostname(), "pid": os.getpid()})
            self.last_beat = now
        if now - self.last_sweep >= SWEEP_SECONDS:
            with conn.cursor() as cur:
                cur.execute(SWEEP_DEAD_CONSUMERS, {"lease": LEASE_SECONDS})
                cur.execute(SWEEP_ORPHANS, {"queue": self.queue_name})
                if cur.rowcount:
                    log.warning("event=queue_lease_expired queue=%s requeued=%d", self.queue_name,
                                cur.rowcount)
            self.last_sweep = now

    def _wait(self, conn) -> None:
        """Until a NOTIFY, a wake-up from a worker thread, or the timeout."""
        if conn.notifies:
            conn.notifies.clear()
            return
        with self.lock:
            room = self.held < self.prefetch
            timeout = ACK_DELAY if self.acks or self.nacks else min(self.timeout, HEARTBEAT_SECONDS)
        readable, _, _ = select.select([conn, self.wake_r] if room else [self.wake_r], [], [], timeout)
        if conn in readable:
            conn.poll()
            conn.notifies.clear()
        if self.wake_r in readable:
            try:
                os.read(self.wake_r, 4096)
            except BlockingIOError:
                pass

    def _lost(self, exc: psycopg2.Error) -> None:
        self.failures += 1
        if self.failures == 1:
            log.warning("event=queue_connection_lost queue=%s error=%s", self.queue_name,
                        type(exc).__name__)
        self._close_connection()
        time.sleep(min(0.05 * 2 ** self.failures, RECONNECT_MAX_SECONDS))

    # -- worker threads --------------------------------------------------------

    def ack(self, message: ClaimedMessage) -> None:
        with self.lock:
            self.acks.append((message.message_id, message.claim_id))
            self._finished()

    def nack(self, message: ClaimedMessage) -> None:
        with self.lock:
            self.nacks.append(message)
            self._finished()

    def _finished(self) -> None:
        # Under self.lock. Wake the consumer thread only when there is
        # something to do: room for a new claim, or a batch of acks to write.
        self.held -= 1
        pending = len(self.acks) + len(self.nacks)
        if pending == 1:
            self.first_ack_at = time.monotonic()
        if self.held == self.prefetch // 2 or self.held == 0 or pending == self.prefetch // 2:
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"!")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is pending anyway

    # -- shutdown (main thread, after the consumer thread stopped) -----------

    def requeue(self, messages) -> None:
        messages = [m for m in messages if isinstance(m, ClaimedMessage)]
        if not messages:
            return
        try:
            with self._connection().cursor() as cur:
                cur.execute(REQUEUE, {"ids": [m.message_id for m in messages],
                                      "claims": [m.claim_id for m in messages]})
        except psycopg2.Error as exc:
            # Still claimed by us: the lease sweep returns them within LEASE_SECONDS.
            log.warning("event=queue_requeue_failed queue=%s messages=%d error=%s", self.queue_name,
                        len(messages), type(exc).__name__)
            return
        with self.lock:
            self.held -= len(messages)

    def close(self) -> None:
        """Write what is buffered, give back unstarted claims, leave the lease table."""
        try:
            conn = self._connection()
            self._flush(conn)
            ready, self.ready = list(self.ready), deque()
            self.requeue(ready)
            if self.held == 0:
                # Nothing of ours is in flight. (A consumer restarted in-process
                # keeps its id and its row: its worker threads still process and
                # ack what it handed them, so those must not be swept.)
                with conn.cursor() as cur:
                    cur.execute(LEAVE, {"consumer": self.consumer_id})
        except psycopg2.Error as exc:
            log.warning("event=queue_close_failed queue=%s error=%s", self.queue_name, type(exc).__name__)
        finally:
            self._close_connection()
            for fd in (self.wake_r, self.wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _close_connection(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg2.Error:
                pass
            self.conn = None
