"""Keep payloads and SQL values out of dramatiq's log lines (issue 12 item 4).

dramatiq logs a failed message as `str(message)`, which is the actor call with
all its arguments: for an ingest batch, kilobytes of other devices' readings.
And a database error's message can quote values (psycopg2's DETAIL/CONTEXT
lines, e.g. the COPY line that failed). This filter, on dramatiq's worker and
consumer loggers, names a message by actor and id only, and replaces the text
of a database exception with its class and SQLSTATE (the traceback's frames
stay). Importing this module installs it, once per process.
"""

import logging
import traceback
from typing import Any

from dramatiq.broker import MessageProxy
from dramatiq.message import Message

from schema.db import DB_ERRORS, db_error_class

LOGGERS = ("dramatiq.worker.WorkerThread", "dramatiq.worker.ConsumerThread", "dramatiq.worker.Worker")


def _safe_arg(arg: Any) -> Any:
    if isinstance(arg, (Message, MessageProxy)):
        return f"{arg.actor_name}(message_id={arg.message_id})"
    return arg


class RedactPayloads(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_safe_arg(a) for a in record.args)
        if record.exc_info and isinstance(record.exc_info[1], DB_ERRORS):
            exc = record.exc_info[1]
            frames = "".join(traceback.format_tb(exc.__traceback__))
            record.exc_text = (f"Traceback (most recent call last):\n{frames}"
                               f"{db_error_class(exc)} (message not logged: it can quote values)")
            record.exc_info = None
        return True


def install() -> None:
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactPayloads) for f in logger.filters):
            logger.addFilter(RedactPayloads())


install()
