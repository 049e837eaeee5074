"""Actors ride out a database restart: wait for it to answer, then retry at once.

An actor whose database connection fails (PostgreSQL restarting, a dropped
connection, a full disk) raises `dramatiq.Retry` instead of the driver's error:
dramatiq then logs no error-level traceback for a message that will succeed
on its next attempt, and Retries re-enqueues it. When the database was
actually unreachable, the worker thread first waits until it answers again
(nothing can progress meanwhile) and the retry is due at once, so work flows
again within moments of PostgreSQL accepting connections, however long it was
down, and an outage costs each message one retry, not its whole budget.
Other errors (the data's) propagate unchanged.
"""

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import dramatiq

from models.settings import get_settings
from schema.databases import database_answers
from schema.db import DB_ERRORS, db_error_class, is_connection_error

log = logging.getLogger("farmiq_edge.actors")

POLL_SECONDS = 0.2
MAX_WAIT_SECONDS = 300.0


def wait_for_database(url: str, max_wait: float = MAX_WAIT_SECONDS) -> float:
    """Block until `url` answers (or `max_wait` passes); return the seconds waited."""
    started = time.monotonic()
    while not database_answers(url, timeout_seconds=2):
        if time.monotonic() - started > max_wait:
            break
        time.sleep(POLL_SECONDS)
    return time.monotonic() - started


def ride_out_database_outage(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def actor_body(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DB_ERRORS as exc:
            if not is_connection_error(exc):
                raise
            waited = wait_for_database(get_settings().database_url)
            reason = f"database unavailable ({db_error_class(exc)})"
            log.warning("event=database_unavailable actor=%s waited=%.1fs", fn.__name__, waited)
            # Due at once after an outage; otherwise (e.g. disk full) Retries' backoff.
            raise dramatiq.Retry(reason, delay=100 if waited > POLL_SECONDS else None) from None
    return actor_body
