"""The dramatiq-pg broker, hardened for an edge box, and the process-wide broker.

Every actor module imports this module first (dramatiq rule: the broker is set
before any @actor). Stock dramatiq-pg 0.12 defects fixed here, each in a
subclass method that says so:

1. Lock leak: the stock consumer keeps one session advisory lock per consumed
   message until the consumer goes idle; a backlog of ~13k messages exhausts
   PostgreSQL's shared lock table and the whole cluster refuses connections.
   `EdgeConsumer` releases the locks of finished messages on every iteration.
2. Unbounded backlog: the stock consumer loads every unfinished message of its
   queue into memory at start. `EdgeConsumer` reads message ids in bounded
   pages, oldest first, and treats NOTIFY only as a wake-up.
3. Pool starvation: 16 connections by default, but each queue needs two
   consumers (queue + delay queue) holding two connections each. `EdgeBroker`
   grows the pool with every declared queue and with the worker threads.
4. No transactional enqueue: `EdgeBroker.enqueue_in(cursor, message)` writes
   the queue row (and its NOTIFY, which PostgreSQL delivers at COMMIT) in the
   caller's transaction, so a hand-off commits atomically with the data.
5. Rejected messages purged at random after 30 days: `auto_purge` is a no-op;
   rejected messages stay until an operator re-drives or purges them, done
   messages are removed by the retention job. Migration 0003 adds the index
   serving the per-queue lookup.
6. Big messages handled three times over: the stock enqueue JSON-encodes a
   message, decodes it and encodes it again, and the stock ACK does the same
   and writes the whole body back into the row (a jsonb parse and a TOAST
   rewrite in PostgreSQL). For a 500-event ingest batch (~150 kB) that was
   ~20% of the bridge's CPU and ~18% of the ingest worker's (py-spy, under
   `farmiq-edge bench ingest`). `enqueue_in` passes the encoder's JSON text
   once; `EdgeConsumer.ack` only marks the row done.
7. Busy loop: with every unfinished message already in hand, `EdgeConsumer`
   re-read its page of ids without pause; it now waits for a NOTIFY.
"""

import logging
import time

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import compute_backoff, current_millis, dq_name
from dramatiq.message import Message
from dramatiq.middleware import (AgeLimit, Callbacks, Pipelines, Prometheus, Retries,
                                 ShutdownNotifications, TimeLimit)
from dramatiq_pg import PostgresBroker
from dramatiq_pg.broker import QUERIES, PostgresConsumer, message_lock
from dramatiq_pg.utils import (make_pool, raise_connection_error, tidy4json, transaction,
                               wait_for_notifies)
from psycopg2.extras import Json

from actors.dead_letters import DeadLetters, retry_unless_permanent
from actors.gc_tuning import GcTuning
from models.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Connections per declared queue: a consumer for the queue and one for its
# delay queue, each with a LISTEN connection and a consume connection.
CONNECTIONS_PER_QUEUE = 4
# Unfinished message ids read from the queue table per page (ids only: the
# message body is fetched when the message is consumed).
BACKLOG_PAGE = 500
# Longest nap while all prefetched messages are still being processed.
MAX_FULL_BACKOFF_MS = 50

# Unfinished messages of one queue, oldest first (index: queue_unfinished_idx).
FETCH_PENDING_PAGE = """
    SELECT message_id::text
      FROM dramatiq.queue
     WHERE queue_name = %s AND state IN ('queued', 'consumed')
     ORDER BY mtime
     LIMIT %s
"""
# Claim one message. CASE forces the state test before the lock attempt, so a
# lock is never taken for a row that is not claimable (it would never be
# released); pg_try_advisory_lock is held while the message is processed, so
# if this consumer dies its 'consumed' messages become claimable again.
CONSUME_ONE = """
    UPDATE dramatiq.queue
       SET state = 'consumed', mtime = now()
     WHERE message_id = %s
       AND CASE WHEN state IN ('queued', 'consumed') THEN pg_try_advisory_lock(%s) ELSE false END
"""

# Mark a processed message done (and announce it on the ack channel, as the
# stock ACK does, by id). The body stays as enqueued: nobody reads a done
# message's body, and NACK (rejected, shown by `farmiq-edge dlq`) still stores it.
ACK_DONE = """
    WITH updated AS (
        UPDATE dramatiq.queue
           SET state = 'done'
         WHERE message_id = %s AND queue_name = %s AND state = 'consumed'
     RETURNING message_id)
    SELECT pg_notify(%s, jsonb_build_object('message_id', message_id)::text) FROM updated
"""


class EdgeConsumer(PostgresConsumer):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.pending_ids: list[str] = []

    @raise_connection_error
    def __next__(self):
        # Defect 1: release finished messages' locks now, not when idle.
        self.purge_locks()
        if len(self.in_processing) >= self.prefetch:
            self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=MAX_FULL_BACKOFF_MS)
            time.sleep(backoff_ms / 1000)
            return None
        self.misses = 0
        if not self.pending_ids:
            # Defect 2: the table is the source of truth, read in bounded
            # pages of ids; NOTIFY payloads are only a wake-up.
            self.pending_ids = self.fetch_pending_ids()
            if not self.pending_ids:
                self.wait_for_work()
                return None
        while self.pending_ids:
            message_id = self.pending_ids.pop(0)
            if message_id in self.in_processing:
                continue
            message = Message.decode(self.fetch_by_id(message_id).encode())
            if self.consume_one(message):
                self.in_processing.add(message.message_id)
                return MessageProxy(message)
        # Defect 7: every unfinished message on the page is in hand already
        # (ours, being processed, or locked by another consumer). Re-reading
        # the page at once was a busy loop: ~1,000 SELECTs a second against
        # PostgreSQL while a batch was processed. Wait for new work (NOTIFY),
        # or the timeout, which still re-reads for messages of a dead consumer.
        self.wait_for_work()
        return None

    def wait_for_work(self) -> None:
        """Until a NOTIFY (one may have come during the last read) or the timeout."""
        listen_conn = self.get_listen_conn()
        if not listen_conn.notifies:
            wait_for_notifies(listen_conn, self.timeout)
        listen_conn.notifies.clear()

    @raise_connection_error
    def fetch_pending_ids(self) -> list[str]:
        conn = self.get_listen_conn()
        conn.notifies.clear()  # what they announced is in the table read below
        with transaction(conn) as curs:
            curs.execute(FETCH_PENDING_PAGE, (self.queue_name, BACKLOG_PAGE))
            return [row[0] for row in curs]

    @raise_connection_error
    def consume_one(self, message):
        with transaction(self.get_consume_conn()) as curs:
            curs.execute(CONSUME_ONE, (message.message_id, message_lock(message)))
            return curs.rowcount == 1

    @raise_connection_error
    def ack(self, message):
        # Defect 6: no re-encode and rewrite of the body (see ACK_DONE).
        with transaction(self.pool) as curs:
            self.unlock_q.put_nowait(message)
            curs.execute(ACK_DONE, (message.message_id, message.queue_name,
                                    f"dramatiq.{message.queue_name}.ack"))
        self.in_processing.remove(message.message_id)

    def purge_locks(self):
        if not self.unlock_q.empty():
            super().purge_locks()

    def auto_purge(self):
        # Defect 5: never purge at random; retention and operators decide.
        return None


class EdgeBroker(PostgresBroker):
    def __init__(self, *, url: str, threads: int, middleware=None):
        # Defect 3: start with room for the worker threads (acks, enqueues)
        # and grow by CONNECTIONS_PER_QUEUE per declared queue. minconn is how
        # many idle connections the pool keeps, so it grows with maxconn.
        pool = make_pool(url, maxconn=threads + 2)
        super().__init__(pool=pool, results=False, middleware=middleware)

    def declare_queue(self, queue_name):
        if queue_name not in self.queues:
            self.pool.maxconn += CONNECTIONS_PER_QUEUE
            self.pool.minconn = self.pool.maxconn
        super().declare_queue(queue_name)

    def consume(self, queue_name, prefetch=1, timeout=30000):
        return EdgeConsumer(pool=self.pool, queue_name=queue_name, prefetch=prefetch, timeout=timeout)

    def enqueue_in(self, cursor, message: Message, *, delay: int | None = None) -> Message:
        """Enqueue `message` inside the transaction that owns `cursor` (defect 4).

        Commit point: the queue row and its NOTIFY become visible only when the
        caller commits; a rollback leaves no message behind.
        """
        if delay:
            message = message.copy(queue_name=dq_name(message.queue_name))
            message.options["eta"] = current_millis() + delay
        self.emit_before("enqueue", message, delay)
        # Defect 6: the JSON encoder's text goes in as is (a string literal
        # becomes jsonb on insert), instead of encode → decode → encode.
        body = (message.encode().decode() if isinstance(dramatiq.get_encoder(), dramatiq.JSONEncoder)
                else Json(tidy4json(message)))
        cursor.execute(QUERIES.ENQUEUE, (message.queue_name, message.message_id, body, message.message_id))
        self.emit_after("enqueue", message, delay)
        return message


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
    return EdgeBroker(url=settings.database_url, threads=settings.worker_threads,
                      middleware=edge_middleware(settings))


broker = build_broker(get_settings())
dramatiq.set_broker(broker)
