"""A probe actor for queue-store tests, run by real `dramatiq` worker processes.

`record(i)` inserts (i, pid) into `probe_seen` in the database EDGE_DATABASE_URL
names, so a test counts by message value what was processed, and how often.
The table is created by the test; renaming it away makes every message fail
(and be retried) until it is back.
"""

from actors.broker import broker  # noqa: F401,I001 - the broker is set before any actor

import os

import dramatiq
from sqlalchemy import text

from models.settings import get_settings
from schema.db import transaction

QUEUE = "probe"
CREATE_TABLE = "CREATE TABLE probe_seen (i integer NOT NULL, pid integer NOT NULL, at timestamptz DEFAULT now())"


@dramatiq.actor(queue_name=QUEUE, max_retries=20)
def record(i: int) -> None:
    with transaction(get_settings().database_url) as conn:
        conn.execute(text("INSERT INTO probe_seen (i, pid) VALUES (:i, :pid)"), {"i": i, "pid": os.getpid()})
